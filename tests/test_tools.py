"""Tool calls in the Hermes and Mistral formats: the checkpoint picks one; parsed out of replies, constrained by a
grammar, rendered back through the template."""

from __future__ import annotations

import json
import re

import llguidance
import openai
import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from moe_offload.constrain import Grammars
from moe_offload.tokenizer import Tokenizer
from moe_offload.tools import HERMES, MISTRAL

from conftest import SHIPPED_MODEL, write_tiny_mixtral
from test_tokenizer import MIXTRAL_STYLE_TEMPLATE, TOOL_CONVERSATION

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}}]
CALLS = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
         {"type": "function", "function": {"name": "now", "arguments": {}}}]
# Mistral-7B-Instruct-v0.3's way with tools, shortened: its call and result rendering, and its check of the ids.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}[INST] {{ message.content }}[/INST]"
    "{% elif message.tool_calls %}[TOOL_CALLS] [{% for call in message.tool_calls %}"
    "{% if call.id | length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{% set out = call.function | tojson %}{{ out[:-1] }}, \"id\": \"{{ call.id }}\"}"
    "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif message.role == 'tool' %}{% if message.tool_call_id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "[TOOL_RESULTS] {\"content\": {{ message.content | tojson }}, \"call_id\": \"{{ message.tool_call_id }}\"}"
    "[/TOOL_RESULTS]{% elif message.role == 'assistant' %} {{ message.content }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_mistral_tokenizer(folder, template: str | None = MISTRAL_TEMPLATE):
    """The shipped tokenizer with Mistral's call marker as a special token (id 8192), and `template`."""
    folder.mkdir(exist_ok=True)
    hf = HFTokenizer.from_file(str(SHIPPED_MODEL / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(MISTRAL.MARKER, special=True)])
    hf.save(str(folder / "tokenizer.json"))
    settings = json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())
    settings["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("calls", [HERMES, MISTRAL], ids=["hermes", "mistral"])
def test_calls_leave_the_text_and_come_in_openai_shape(calls):
    content, found = calls.parse(f"Let me add.\n{calls.calls_text(CALLS)}", TOOLS)
    assert content == "Let me add."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found] == \
        [("function", "add", {"a": 1, "b": 2}), ("function", "now", {})]
    assert len({c["id"] for c in found}) == 2


def test_mistral_call_ids_are_the_nine_letters_and_digits_its_templates_want():
    _, found = MISTRAL.parse(MISTRAL.calls_text(CALLS), TOOLS)
    assert all(re.fullmatch("[a-zA-Z0-9]{9}", call["id"]) for call in found)


def test_hermes_blocks_that_are_not_calls_of_the_tools_stay_text():
    text = "<tool_call>\nnot json\n</tool_call> <tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>" \
           "<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>"
    assert HERMES.parse(text, TOOLS) == (text, [])


@pytest.mark.parametrize("text", ["[TOOL_CALLS] not json", '[TOOL_CALLS] {"name": "now", "arguments": {}}',
                                  '[TOOL_CALLS] [{"name": "now", "arguments": {}}, {"name": "rm", "arguments": {}}]',
                                  '[TOOL_CALLS] [{"name": "add", "arguments": [1]}]', "[TOOL_CALLS] []"])
def test_a_mistral_list_that_is_not_calls_of_the_tools_stays_text_whole(text):
    assert MISTRAL.parse(text, TOOLS) == (text, [])


def accepts(tokenizer: Tokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(Grammars(tokenizer, tokenizer.vocab_size).tokenizer, grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize("calls", [HERMES, MISTRAL], ids=["hermes", "mistral"])
def test_the_grammar_admits_calls_of_the_named_tool_with_valid_arguments_only(calls, tmp_path):
    """Compact JSON, as the grammar writes it; Mistral's marker is one token of its vocabulary."""
    folder = SHIPPED_MODEL if calls is HERMES else write_mistral_tokenizer(tmp_path / "mistral")
    tokenizer = Tokenizer.from_folder(folder, eos_ids=(2,))
    assert tokenizer.tool_format is calls

    def written(*names_and_arguments) -> str:
        compact = calls.calls_text([{"function": {"name": n, "arguments": a}} for n, a in names_and_arguments])
        return compact.replace(", ", ",").replace(": ", ":").replace(",{", ", {")

    one_add = calls.grammar(TOOLS, "add", parallel=False)
    assert accepts(tokenizer, one_add, written(("add", {"a": 1, "b": 2})))
    assert not accepts(tokenizer, one_add, written(("add", {"a": 1})))
    assert not accepts(tokenizer, one_add, written(("now", {})))
    two = written(("now", {}), ("add", {"a": 1, "b": 2}))
    assert accepts(tokenizer, calls.grammar(TOOLS), two)
    assert not accepts(tokenizer, calls.grammar(TOOLS, parallel=False), two)


def test_the_checkpoint_picks_the_format_and_a_mistral_reply_keeps_its_marker(tmp_path):
    assert Tokenizer.from_folder(SHIPPED_MODEL).tool_format is HERMES
    by_template = Tokenizer.from_folder(write_mistral_tokenizer(tmp_path / "template"))
    by_vocabulary = Tokenizer.from_folder(write_mistral_tokenizer(tmp_path / "vocabulary", MIXTRAL_STYLE_TEMPLATE))
    assert by_template.tool_format is MISTRAL and by_vocabulary.tool_format is MISTRAL
    reply = MISTRAL.calls_text(CALLS[:1])
    ids = by_template.encode(reply, add_special_tokens=False)
    assert ids[0] == 8192 and by_template.decode(ids) == reply


def test_a_mistral_template_gets_call_ids_it_accepts(tmp_path):
    """OpenAI's `call_...` ids (and Anthropic's `toolu_...`) are cut to their last 9 letters and digits, the same for
    the call and its result."""
    tokenizer = Tokenizer.from_folder(write_mistral_tokenizer(tmp_path / "mistral"))
    long_id = "toolu_01AbCdEfGhIjKl"
    conversation = [{**m, **({"tool_calls": [{**m["tool_calls"][0], "id": long_id}]} if "tool_calls" in m else {}),
                     **({"tool_call_id": long_id} if m["role"] == "tool" else {})} for m in TOOL_CONVERSATION]
    text = tokenizer.render_chat(conversation, tools=TOOLS)
    assert text.count('"dEfGhIjKl"') == 2
    assert "0000call1" in tokenizer.render_chat(TOOL_CONVERSATION, tools=TOOLS)


def test_a_mistral_checkpoint_calls_tools_through_the_server_and_takes_the_result_back(tmp_path):
    """`required`: the reply is constrained to Mistral's calls, parsed into OpenAI's tool_calls; sent back as history
    with the tool's result, the template takes its ids."""
    from test_server import running_server

    folder = write_tiny_mixtral(tmp_path / "tiny", vocab_size=8200)
    write_mistral_tokenizer(folder)
    with running_server("--model", str(folder)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        messages = [{"role": "user", "content": "What time is it?"}]
        tools = [{"type": "function", "function": {"name": "now", "parameters": {
            "type": "object", "properties": {"unit": {"enum": ["s", "ms"]}}, "required": ["unit"],
            "additionalProperties": False}}}]      # a short call: the random model writes no long numbers
        out = client.chat.completions.create(model="tiny", messages=messages, tools=tools, tool_choice="required",
                                             max_tokens=40, temperature=0, parallel_tool_calls=False)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "now" and json.loads(call.function.arguments)["unit"] in ("s", "ms")
        assert re.fullmatch("[a-zA-Z0-9]{9}", call.id)
        history = [*messages, choice.message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "3"}]
        assert client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=4).choices
