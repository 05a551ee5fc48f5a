"""Request bodies of the OpenAI API, as far as we serve it, validated strictly.

    body = CompletionRequest.model_validate(json_object)      # raises pydantic.ValidationError
    message = describe(validation_error)                     # -> ("max_tokens", "max_tokens: ...")

Strict: no coercion ("5" is not an int, true is not 1), no NaN or infinity, unknown fields
rejected (a parameter the client believes has an effect must not be silently dropped). Null is
the default of every optional field, as in OpenAI's API (the SDKs send `"temperature": null` for
an unset one). OpenAI parameters we do not implement are accepted only at their neutral value
(n=1, presence_penalty=0, echo=false, ...), so clients that always send them keep working.

Defaults are OpenAI's: temperature 1.0, top_p 1.0, max_tokens 16 for completions and "the rest of
the context" for chat; no seed (then sampling draws from torch's global generator). vLLM's extra
sampling fields (top_k, min_p, repetition_penalty) are accepted too, with their neutral defaults.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_STRINGS = 4          # as OpenAI
INT64 = 2**63
COMPLETION_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
MAX_N = 128                   # completions per prompt, as OpenAI
MAX_LOGPROBS = 20             # alternatives per token, as OpenAI's chat (and vLLM)


def _optional_fields_are_nullable(schema: dict, model: type[BaseModel]) -> None:
    """The published schema says what `Strict` accepts: null for every optional field."""
    required = set(schema.get("required", ()))
    for name, field in schema.get("properties", {}).items():
        if name not in required and {"type": "null"} not in field.get("anyOf", ()):
            schema["properties"][name] = {"anyOf": [field, {"type": "null"}], "default": field.get("default")}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              json_schema_extra=_optional_fields_are_nullable)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """`"field": null` is the field's default when the field is optional (a required one stays an error)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=0)   # 0: only with completions' echo
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)                          # vLLM's: 0 or -1 keep all
    min_p: float = Field(0.0, ge=0, le=1)                 # vLLM's
    repetition_penalty: float = Field(1.0, gt=0)          # vLLM's (and transformers')
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value, handler):
        stop = _as("a string or a list of strings", value, handler)
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        return stop

    @model_validator(mode="after")
    def _neutral_values_only(self):
        unsupported = {"logit_bias": bool(self.logit_bias)}
        unsupported.update(self._unsupported())
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name}: not supported by this server; leave it at its default")
        return self

    def _unsupported(self) -> dict[str, bool]:
        return {}

    @property
    def logprobs_top(self) -> int | None:
        """Alternatives to report for each new token; None: no logprobs."""
        return None

    @property
    def prompt_logprobs_top(self) -> int | None:
        """Alternatives to report for each prompt token; None: none."""
        return None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def new_tokens_field(self) -> str:
        """The field that set the new-token limit, named in errors."""
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False                                       # the prompt before the completion (and its logprobs)
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)   # OpenAI's legacy shape, alternatives per token
    suffix: str | None = None
    add_special_tokens: bool | None = None   # vLLM's: BOS before a text prompt; default below

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value, handler):
        prompt = _as("a string, a list of strings, a list of token ids, or a list of token-id lists", value, handler)
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list is empty; send at least one prompt")
        if isinstance(prompt, list) and isinstance(prompt[0], list) and not all(prompt):
            raise ValueError(f"token-id list {prompt.index([])} is empty")
        return prompt

    def _unsupported(self) -> dict[str, bool]:
        return {"best_of": self.best_of not in (None, self.n), "suffix": self.suffix is not None}

    @model_validator(mode="after")
    def _nothing_to_do_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 new tokens only make sense with echo (the prompt's logprobs); ask for 1 or more")
        return self

    @property
    def logprobs_top(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs_top(self) -> int | None:
        return self.logprobs if self.echo else None

    @property
    def adds_bos(self) -> bool:
        """Whether a text prompt gets the tokenizer's BOS: yes to generate from it (as vLLM and llama-server do),
        no when the request scores it (echo with logprobs): the text is scored as written, a BOS written in it
        kept, so a window cut from the middle of a document (lm-eval's rolling loglikelihood) is scored as the
        same tokens are by transformers."""
        return self.add_special_tokens if self.add_special_tokens is not None else self.prompt_logprobs_top is None


class TextPart(Strict):
    type: Literal["text"]
    text: str


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"   # OpenAI's function names


class CalledFunction(Strict):
    name: str
    arguments: str            # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None    # null only in an assistant message (one that calls tools)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None       # an assistant message's calls
    tool_call_id: str | None = None                # a tool message's: the call it answers
    # The other fields of OpenAI's own replies, so that a reply resent as history (`message.model_dump()`)
    # is accepted: null, or ignored (`refusal`, `annotations`); assistant messages only.
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value, handler):
        return _as("a string or a list of {\"type\": \"text\", \"text\": ...} parts", value, handler)

    @model_validator(mode="after")
    def _fields_of_their_roles(self):
        if self.content is None and self.role != "assistant":
            raise ValueError("content: required field is missing")
        for name, what in (("audio", "audio replies"), ("function_call", "functions (use tools)")):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: {what} are not supported by this server; send null")
        for name in ("refusal", "annotations", "tool_calls"):
            if getattr(self, name) is not None and self.role != "assistant":
                raise ValueError(f"{name}: only assistant messages carry it")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: a tool message carries it (the id of the call it answers), no other")
        return self

    def as_template_message(self) -> dict:
        """The message as chat templates take it (tools.py: calls with their arguments as objects)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionSpec(Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict | None = None     # a JSON schema of the arguments; None: any object
    strict: bool | None = None         # the schema is enforced when a call is required, strict or not


class Tool(Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")   # None: any JSON object
    strict: bool | None = None                           # the schema is enforced either way


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: send it with type json_schema, and only then")
        return self

    @property
    def reply_schema(self) -> dict | None:
        """The JSON schema the reply must validate against; None: free text."""
        if self.type == "json_object" or (self.json_schema and self.json_schema.schema_ is None):
            return {"type": "object"}
        return self.json_schema.schema_ if self.json_schema else None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, value, handler):
        return _as('"none", "auto", "required" or {"type": "function", "function": {"name": ...}}', value, handler)

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: send it or max_tokens, not both")
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools: two tools have the same name")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice: needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.calls_required and self.response_format and self.response_format.reply_schema is not None:
            raise ValueError("response_format: a reply that must call a tool cannot also follow a response format")
        return self

    @property
    def tool_mode(self) -> str:
        """"none" (no tools: plain text), "auto" (text or calls), "required" (one call or more), or a tool's name."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def calls_required(self) -> bool:
        return self.tool_mode not in ("none", "auto")

    def tool_specs(self) -> list[dict] | None:
        """The tools as chat templates take them; None when the reply may not call any."""
        if self.tool_mode == "none":
            return None
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools]

    @property
    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def new_tokens_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def new_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class TokenizeRequest(Strict):
    """POST /tokenize, in vLLM's shape (`prompt` or `messages`, `add_special_tokens`) or llama-server's
    (`content`, `add_special`, `with_pieces`); exactly one of `prompt`, `messages`, `content`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    content: str | None = None
    add_special_tokens: bool | None = None    # vLLM: true for a prompt, false for messages (the template writes BOS)
    add_generation_prompt: bool = True        # vLLM, with messages
    return_token_strs: bool = False           # vLLM: also each token's text
    add_special: bool = False                 # llama-server
    with_pieces: bool = False                 # llama-server: tokens as {"id", "piece"}

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("prompt", "messages", "content") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("prompt: send exactly one of prompt, messages (vLLM) or content (llama-server)")
        llama_fields = [name for name in ("add_special", "with_pieces") if getattr(self, name)]
        if self.content is None and llama_fields:
            raise ValueError(f"{llama_fields[0]}: llama-server's fields go with content, not with prompt or messages")
        return self


class DetokenizeRequest(Strict):
    """POST /detokenize: vLLM's and llama-server's shape alike."""

    model: str | None = None
    tokens: list[int]


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _as(expected: str, value, handler):
    """Run the field's own validation, but report a union mismatch as one line naming what is expected."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {expected}") from None


def describe(error: ValidationError) -> tuple[str | None, str]:
    """The first problem of a ValidationError as (param, one-line message)."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return param, f"unrecognized field {param!r}; remove it (see /openapi.json for the accepted fields)"
    message = first["msg"].removeprefix("Value error, ")
    named = re.match(r"([a-z_]+): ", message) if first["type"] == "value_error" else None
    if named:   # a check of a whole object names its field first: "n: ..." (the request), "audio: ..." (a message)
        param = ".".join([*(str(part) for part in first["loc"]), named[1]])
        return param, f"{param}: {message.removeprefix(named[0])}"
    if first["type"] == "missing":
        message = "required field is missing"
    return param, f"{param}: {message}" if param else message
