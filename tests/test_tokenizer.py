"""Tokenizer: ids as transformers makes them, chat templates as transformers renders them,
streaming that never splits a character."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from moe_offload.tokenizer import Tokenizer

from conftest import SHIPPED_MODEL

MIXTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)

TEXTS = ["def main():\n    return 0\n", "héllo wörld — naïve café", "数据 結構 🚀🎉 emoji", "  leading spaces\ttabs"]


@pytest.fixture()
def templated_folder(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(SHIPPED_MODEL / "tokenizer.json", folder / "tokenizer.json")
    settings = json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())
    settings["chat_template"] = MIXTRAL_STYLE_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(text):
    from transformers import AutoTokenizer

    assert Tokenizer.from_folder(SHIPPED_MODEL).encode(text) == AutoTokenizer.from_pretrained(SHIPPED_MODEL)(text)["input_ids"]


def test_chat_template_renders_as_transformers_does(templated_folder):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a loop."}, {"role": "assistant", "content": "for i in x: pass"},
                {"role": "user", "content": "Now in C."}]
    ours = Tokenizer.from_folder(templated_folder)
    theirs = AutoTokenizer.from_pretrained(templated_folder)
    assert ours.render_chat(messages) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(messages) == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_template_exception_becomes_a_user_error(templated_folder):
    from moe_offload.errors import UserError

    with pytest.raises(UserError, match="alternate"):
        Tokenizer.from_folder(templated_folder).render_chat([{"role": "assistant", "content": "hi"}])


def test_tokenizer_without_template_falls_back_to_a_transcript():
    tok = Tokenizer.from_folder(SHIPPED_MODEL)
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant:"
    assert "\nuser:" in tok.chat_stop_strings


@pytest.mark.parametrize("text, found", [("caf\udce9", "byte 0xe9 at character 3"),
                                         ("x\ud800y", "unpaired surrogate U+D800 at character 1")])
def test_text_without_a_utf8_form_is_a_user_error_naming_the_character(text, found):
    from moe_offload.errors import UserError

    with pytest.raises(UserError, match=re.escape(f"the text is not valid UTF-8 ({found})")):
        Tokenizer.from_folder(SHIPPED_MODEL).encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_never_splits_a_character(text):
    tok = Tokenizer.from_folder(SHIPPED_MODEL)
    ids = tok.encode(text, add_special_tokens=False)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
