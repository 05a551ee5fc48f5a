"""Anthropic's Messages API over the same engine: POST /v1/messages (streamed or not, with tools) and
POST /v1/messages/count_tokens, for clients that speak it (coding agents, the `anthropic` SDK).

    body = MessagesRequest.model_validate(json_object)
    messages, tools = template_messages(body), body.tool_specs()     # as chat templates take them
    reply = message_json(body, run, text, message_id, model, calls)   # the answer of a finished run (calls: tools.py's format)
    async for event in message_events(...): ...                        # or its server-sent events

Messages map onto the chat path: `system` is the first message, text blocks are joined, an
assistant's `tool_use` blocks are its tool calls and a user's `tool_result` blocks are tool messages
(tools.py renders them through the chat template). Tools are OpenAI's functions under other names
(`input_schema` is `parameters`); `tool_choice` auto / any / tool / none is auto / required / a named
tool / none. Replies are parsed for calls as chat's are and come back as `tool_use` blocks with
stop_reason "tool_use". Errors on these paths use Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ..engine import Run
from ..tools import Hermes, Mistral
from .schemas import INT64, MAX_STOP_STRINGS, TOOL_NAME, Strict

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error" if status >= 500 else
                                                                "invalid_request_error"), "message": message}}


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict | None = None    # prompt caching hints: accepted, no effect
    citations: list | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict
    cache_control: dict | None = None
    caller: dict | None = None           # in the SDK's own blocks (model_dump of a reply): null, ignored
    toolset_name: str | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: list[Block]      # a string is one text block

    @field_validator("content", mode="before")
    @classmethod
    def _text_is_a_block(cls, value):
        return [{"type": "text", "text": value}] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _blocks_of_their_roles(self):
        kinds = {block.type for block in self.content}
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("content: tool_use blocks belong to assistant messages")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("content: tool_result blocks belong to user messages")
        return self


class AnthropicTool(Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: dict | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_with_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name: send it with type tool, and only then")
        return self


class CountTokensRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None

    @model_validator(mode="after")
    def _tools_as_chosen(self):
        names = [tool.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools: two tools have the same name")
        if self.tool_choice and self.tool_choice.type in ("any", "tool") and not names:
            raise ValueError("tool_choice: needs tools")
        if self.tool_choice and self.tool_choice.type == "tool" and self.tool_choice.name not in names:
            raise ValueError(f"tool_choice: names {self.tool_choice.name!r}, which is not among the tools")
        return self

    @property
    def tool_mode(self) -> str:
        """As ChatCompletionRequest.tool_mode: "none" (no tools, or none to use), "auto", "required" or a tool's name."""
        if not self.tools:
            return "none"
        choice = self.tool_choice.type if self.tool_choice else "auto"
        return {"any": "required", "tool": self.tool_choice.name if self.tool_choice else None}.get(choice, choice)

    @property
    def parallel_tool_calls(self) -> bool:
        return not (self.tool_choice and self.tool_choice.disable_parallel_tool_use)

    def tool_specs(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's functions); None when the reply may not call any."""
        if self.tool_mode == "none":
            return None
        return [{"type": "function", "function": {"name": tool.name, "parameters": tool.input_schema,
                                                  **({"description": tool.description} if tool.description else {})}}
                for tool in self.tools]


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(Strict):
    format: OutputFormat | None = None     # structured output: the reply is JSON valid against the schema
    effort: None = None                    # a thinking budget: no model here thinks


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float = Field(1.0, ge=0, le=1)    # the SDK sends these (and seed) only in extra_body
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stream: bool = False
    metadata: dict | None = None
    output_config: OutputConfig | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)    # not Anthropic's: ours, as in the OpenAI routes

    @model_validator(mode="after")
    def _one_constraint(self):
        if self.reply_schema is not None and self.tool_mode not in ("none", "auto"):
            raise ValueError("output_config: a reply that must use a tool cannot also follow an output format")
        return self

    @property
    def reply_schema(self) -> dict | None:
        return self.output_config.format.schema_ if self.output_config and self.output_config.format else None


def template_messages(body: CountTokensRequest) -> list[dict]:
    """The conversation as chat templates take it (tools.py's shapes)."""
    system = body.system if isinstance(body.system, str) else "".join(block.text for block in body.system or ())
    out = [{"role": "system", "content": system}] if system else []
    for message in body.messages:
        text = "".join(block.text for block in message.content if block.type == "text")
        if message.role == "assistant":
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in message.content if b.type == "tool_use"]
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text}
                for b in message.content if b.type == "tool_result"]
        if text or not any(block.type == "tool_result" for block in message.content):
            out.append({"role": "user", "content": text})
    return out


def reply_blocks(body: MessagesRequest, run: Run, text: str, calls_format: Hermes | Mistral) -> tuple[list[dict], str, str | None]:
    """(content blocks, stop_reason, stop_sequence) of a finished run, its calls in `calls_format`."""
    stop_sequence = run.stop_string if run.stop_string in (body.stop_sequences or ()) else None
    stop_reason = "max_tokens" if run.finish_reason == "length" else "stop_sequence" if stop_sequence else "end_turn"
    tools = body.tool_specs()
    calls = []
    if tools:
        content, calls = calls_format.parse(text, tools)
        text = (content or "") if calls else text
    blocks = [{"type": "text", "text": text}] if text or not calls else []
    for call in calls:
        blocks.append({"type": "tool_use", "id": f"toolu_{call['id'].removeprefix('call_')}",
                       "name": call["function"]["name"], "input": json.loads(call["function"]["arguments"])})
    if calls and stop_reason == "end_turn":
        stop_reason = "tool_use"
    return blocks, stop_reason, stop_sequence


def message_json(body: MessagesRequest, run: Run, text: str, message_id: str, model: str,
                 calls_format: Hermes | Mistral) -> dict:
    blocks, stop_reason, stop_sequence = reply_blocks(body, run, text, calls_format)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage(run)}


def usage(run: Run) -> dict:
    return {"input_tokens": run.stats.prompt_tokens, "output_tokens": len(run.token_ids)}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def event(kind: str, payload: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


def message_start(message_id: str, model: str, prompt_tokens: int) -> str:
    return event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})


def block_events(index: int, block: dict) -> list[str]:
    """A whole content block as its start, one delta and its stop."""
    if block["type"] == "text":
        start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
    else:
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
    return [event("content_block_start", {"index": index, "content_block": start}),
            event("content_block_delta", {"index": index, "delta": delta}),
            event("content_block_stop", {"index": index})]


def message_end(stop_reason: str, stop_sequence: str | None, run: Run) -> list[str]:
    return [event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                    "usage": {"output_tokens": len(run.token_ids)}}),
            event("message_stop", {})]
