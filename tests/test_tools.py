"""Tool calls in the Hermes format: parsed out of replies, constrained by a grammar."""

from __future__ import annotations

import json

import llguidance

from moe_offload.constrain import Grammars
from moe_offload.tokenizer import Tokenizer
from moe_offload.tools import call_text, parse_tool_calls, tool_call_grammar

from conftest import SHIPPED_MODEL

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}}]


def test_calls_leave_the_text_and_come_in_openai_shape():
    text = f"Let me add.\n{call_text('add', {'a': 1, 'b': 2})}\n{call_text('now', {})}"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me add."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "add", {"a": 1, "b": 2}), ("function", "now", {})]
    assert len({c["id"] for c in calls}) == 2


def test_blocks_that_are_not_calls_of_the_tools_stay_text():
    text = "<tool_call>\nnot json\n</tool_call> <tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>" \
           "<tool_call>{\"name\": \"add\", \"arguments\": [1]}</tool_call>"
    assert parse_tool_calls(text, TOOLS) == (text, [])


def accepts(grammar: str, text: str) -> bool:
    tokenizer = Tokenizer.from_folder(SHIPPED_MODEL, eos_ids=(2,))
    matcher = llguidance.LLMatcher(Grammars(tokenizer, 8192).tokenizer, grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def test_the_grammar_admits_calls_of_the_named_tool_with_valid_arguments_only():
    one_add = tool_call_grammar(TOOLS, "add", parallel=False)
    assert accepts(one_add, '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>')
    assert not accepts(one_add, '<tool_call>\n{"name":"add","arguments":{"a":1}}\n</tool_call>')
    assert not accepts(one_add, '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>')
    two = '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>\n<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    assert accepts(tool_call_grammar(TOOLS), two)
    assert not accepts(tool_call_grammar(TOOLS, parallel=False), two)
