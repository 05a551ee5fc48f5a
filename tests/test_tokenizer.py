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

# Qwen2.5's way with tools, shortened: tools in the system turn, calls in <tool_call> tags, results as user turns.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|system|>Tools:{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|user|><tool_response>{{ message.content }}</tool_response>\n"
    "{%- elif message.tool_calls %}<|assistant|>{{ message.content }}{% for call in message.tool_calls %}"
    "<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}\n"
    "{%- else %}<|{{ message.role }}|>{{ message.content }}\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
]

TEXTS = ["def main():\n    return 0\n", "héllo wörld — naïve café", "数据 結構 🚀🎉 emoji", "  leading spaces\ttabs"]


def folder_with_template(folder, template: str):
    folder.mkdir()
    shutil.copy(SHIPPED_MODEL / "tokenizer.json", folder / "tokenizer.json")
    settings = json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())
    settings["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture()
def templated_folder(tmp_path):
    return folder_with_template(tmp_path / "tok", MIXTRAL_STYLE_TEMPLATE)


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


def test_a_template_that_renders_tools_gets_them_as_transformers_passes_them(tmp_path):
    from transformers import AutoTokenizer

    folder = folder_with_template(tmp_path / "tools", TOOLS_TEMPLATE)
    ours = Tokenizer.from_folder(folder)
    assert ours.renders_tools
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours.render_chat(TOOL_CONVERSATION, tools=TOOLS) == expected
    assert '"name": "get_weather"' in expected and "<tool_response>18 C</tool_response>" in expected


def test_a_template_without_tools_gets_them_calls_and_results_written_as_text(templated_folder):
    """The Mixtral-style template refuses system messages and wants user/assistant turns: tools go before
    the first user message, the result is a user turn."""
    tok = Tokenizer.from_folder(templated_folder)
    assert not tok.renders_tools
    text = tok.render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert text.startswith("<s>[INST] # Tools")
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call></s>' in text
    assert text.endswith("[INST] <tool_response>\n18 C\n</tool_response> [/INST]")


def test_the_plain_transcript_writes_tools_as_text_too():
    text = Tokenizer.from_folder(SHIPPED_MODEL).render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert text.startswith("user: # Tools") and "\nassistant: <tool_call>" in text
    assert text.endswith("user: <tool_response>\n18 C\n</tool_response>\nassistant:")


def test_a_text_that_starts_with_bos_gets_no_second_one():
    tok = Tokenizer.from_folder(SHIPPED_MODEL)
    ids = tok.encode("def main():")
    assert ids[0] == 1 and ids[1] != 1
    assert tok.encode("<s>def main():") == ids
    assert tok.encode("<s>def main():", add_special_tokens=False) == ids
