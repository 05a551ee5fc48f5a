"""Tool calls in the Hermes format (Qwen2.5, Qwen3 and Hermes chat templates write it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    messages = plain_messages(messages, tools)          # for a chat template that knows no tools
    grammar = tool_call_grammar(tools, name=None)         # constrain.py: one call or more, of these tools only
    content, calls = parse_tool_calls(text, tools)        # a reply -> its text and its calls

`tools` are OpenAI's function tools as chat templates take them: [{"type": "function", "function":
{"name", "description", "parameters"}}]. Messages are as chat templates take them too: an assistant
message's `tool_calls` are [{"type": "function", "function": {"name", "arguments": {...}}}], a tool's
result is {"role": "tool", "content", "tool_call_id"}. A template that renders `tools` itself gets
them as they are; for any other (and the plain transcript) `plain_messages` describes the tools in
the system message (or before the first message: some templates refuse system messages), writes
earlier calls into the assistant's text and results as user turns in <tool_response> tags, as
Qwen's template does.
"""

from __future__ import annotations

import json
import re
import uuid

from .constrain import JSON_OPTIONS, lark_grammar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_PATTERN = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def plain_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation with tools, calls and results written as text, for a template that knows none of them."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], calls]))})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:   # after the system message, or before the first message (templates may refuse a system one)
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out[0] = {**out[0], "content": f"{described}\n\n{out[0]['content']}"}
    return out


def call_text(name: str, arguments) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """The grammar of a reply that is only tool calls: of the tool `name`, or (None) of any of `tools`;
    one, or with `parallel` one or more, each its arguments valid against the tool's parameters."""
    schemas = [_call_schema(tool["function"]) for tool in tools if name in (None, tool["function"]["name"])]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": JSON_OPTIONS}
    call = f'"{CALL_OPEN}\\n" %json {json.dumps(schema)} "\\n{CALL_CLOSE}"'
    repeat = ' ("\\n" call)*' if parallel else ""
    return lark_grammar(f"start: call{repeat}\ncall: {call}\n")


def _call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """A reply -> (its text outside the calls, or None; its calls in OpenAI's shape). A block that is not
    a JSON call of one of `tools` stays in the text."""
    names = {tool["function"]["name"] for tool in tools}
    calls, kept = [], []
    last = 0
    for match in CALL_PATTERN.finditer(text):
        call = _call(match[1], names)
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


def _call(block: str, names: set[str]) -> dict | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
