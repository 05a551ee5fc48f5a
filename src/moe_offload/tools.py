"""Tool calls as models write them, in two formats; the checkpoint picks one (`tool_format`).

Hermes (Qwen2.5, Qwen3 and Hermes chat templates write it), a block a call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Mistral (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct-v0.1: templates that write `[TOOL_CALLS]`, a
special token of their vocabulary), the reply's calls in one JSON list after the marker:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

    calls = tool_format(chat_template, vocabulary_has_marker)  # HERMES or MISTRAL
    messages = plain_messages(messages, tools, calls)     # for a chat template that knows no tools
    messages = calls.history(messages)                    # for one that does (Mistral's wants its own ids)
    grammar = calls.grammar(tools, name=None)             # constrain.py: one call or more, of these tools only
    content, found = calls.parse(text, tools)             # a reply -> its text and its calls, OpenAI's shape

`tools` are OpenAI's function tools as chat templates take them: [{"type": "function", "function":
{"name", "description", "parameters"}}]. Messages are as chat templates take them too: an assistant
message's `tool_calls` are [{"id", "type": "function", "function": {"name", "arguments": {...}}}], a tool's
result is {"role": "tool", "content", "tool_call_id"}. A template that renders `tools` itself gets
them as they are; for any other (and the plain transcript) `plain_messages` describes the tools in
the system message (or before the first message: some templates refuse system messages), writes
earlier calls into the assistant's text in the format and results as user turns in <tool_response>
tags, as Qwen's template does.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid

from .constrain import JSON_OPTIONS, lark_grammar

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

{how}"""


class Hermes:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    PATTERN = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
    HOW = """For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""

    def calls_text(self, calls: list[dict]) -> str:
        """Calls in template messages' shape, as the model writes them."""
        return "\n".join(f"{self.OPEN}\n{json.dumps(_name_and_arguments(call), ensure_ascii=False)}\n{self.CLOSE}"
                         for call in calls)

    def grammar(self, tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
        """The grammar of a reply that is only tool calls: of the tool `name`, or (None) of any of `tools`;
        one, or with `parallel` one or more, each its arguments valid against the tool's parameters."""
        call = f'"{self.OPEN}\\n" %json {json.dumps(_calls_schema(tools, name))} "\\n{self.CLOSE}"'
        repeat = ' ("\\n" call)*' if parallel else ""
        return lark_grammar(f"start: call{repeat}\ncall: {call}\n")

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
        """A reply -> (its text outside the calls, or None; its calls in OpenAI's shape). A block that is not
        a JSON call of one of `tools` stays in the text."""
        names = {tool["function"]["name"] for tool in tools}
        calls, kept = [], []
        last = 0
        for match in self.PATTERN.finditer(text):
            call = _openai_call(_json_or_none(match[1]), names, self.new_id)
            if call is None:
                continue
            kept.append(text[last:match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        return "".join(kept).strip() or None, calls

    def history(self, messages: list[dict]) -> list[dict]:
        return messages

    @staticmethod
    def new_id() -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


class Mistral:
    MARKER = "[TOOL_CALLS]"
    HOW = f"""To call functions, answer with {MARKER} and a JSON list of the calls, each with the function's name and arguments:
{MARKER} [{{"name": <function-name>, "arguments": <args-json-object>}}]"""
    ID_LENGTH = 9          # the templates refuse other call ids: "alphanumeric strings with length 9"

    def calls_text(self, calls: list[dict]) -> str:
        return f"{self.MARKER} {json.dumps([_name_and_arguments(call) for call in calls], ensure_ascii=False)}"

    def grammar(self, tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
        """As Hermes.grammar: the marker, then a list of one call (or, with `parallel`, one or more)."""
        repeat = ' (", " call)*' if parallel else ""
        call = f"%json {json.dumps(_calls_schema(tools, name))}"
        return lark_grammar(f'start: "{self.MARKER} [" call{repeat} "]"\ncall: {call}\n')

    def parse(self, text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
        """As Hermes.parse: the list after the marker holds the calls; a list that is not JSON calls of `tools`
        stays in the text, whole."""
        at = text.find(self.MARKER)
        if at < 0:
            return text.strip() or None, []
        start = len(text) - len(text[at + len(self.MARKER):].lstrip())
        try:
            found, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return text.strip() or None, []
        names = {tool["function"]["name"] for tool in tools}
        calls = [_openai_call(call, names, self.new_id) for call in found] if isinstance(found, list) else [None]
        if not calls or None in calls:
            return text.strip() or None, []
        return (text[:at] + text[end:]).strip() or None, calls

    def history(self, messages: list[dict]) -> list[dict]:
        """Call ids cut to the templates' 9 letters and digits (their last ones), as vLLM cuts them."""
        out = []
        for message in messages:
            if message.get("tool_calls"):
                message = {**message, "tool_calls": [{**call, "id": self._template_id(call.get("id") or "")}
                                                     for call in message["tool_calls"]]}
            if message.get("tool_call_id") is not None:
                message = {**message, "tool_call_id": self._template_id(message["tool_call_id"])}
            out.append(message)
        return out

    @classmethod
    def _template_id(cls, call_id: str) -> str:
        return re.sub(r"[^a-zA-Z0-9]", "", call_id)[-cls.ID_LENGTH:].rjust(cls.ID_LENGTH, "0")

    @classmethod
    def new_id(cls) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(cls.ID_LENGTH))


HERMES, MISTRAL = Hermes(), Mistral()


def tool_format(chat_template: str | None, has_mistral_marker: bool) -> Hermes | Mistral:
    """Mistral's when the chat template writes its marker or the vocabulary has it as a token; else Hermes'."""
    return MISTRAL if has_mistral_marker or Mistral.MARKER in (chat_template or "") else HERMES


def plain_messages(messages: list[dict], tools: list[dict] | None, calls: Hermes | Mistral) -> list[dict]:
    """The conversation with tools, calls and results written as text, for a template that knows none of them."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            text = calls.calls_text(message["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], text]))})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:   # after the system message, or before the first message (templates may refuse a system one)
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
                                        how=calls.HOW)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out[0] = {**out[0], "content": f"{described}\n\n{out[0]['content']}"}
    return out


def _name_and_arguments(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def _calls_schema(tools: list[dict], name: str | None) -> dict:
    """A JSON call of the tool `name`, or (None) of any of `tools`, compact."""
    schemas = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                 "arguments": tool["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}
               for tool in tools if name in (None, tool["function"]["name"])]
    return {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": JSON_OPTIONS}


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _openai_call(call, names: set[str], new_id) -> dict | None:
    """A parsed {"name", "arguments"} of one of the tools `names` -> OpenAI's tool call; anything else -> None."""
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"id": new_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
