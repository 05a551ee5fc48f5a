"""Text <-> token ids, from a checkpoint's tokenizer.json and tokenizer_config.json.

    tok = Tokenizer.from_folder(model_dir)
    ids = tok.encode("def main():")                          # BOS added as the tokenizer declares
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    stream = tok.stream_decoder(); text = stream.push(token_id)   # never splits a character
    texts = tok.token_texts(ids)                             # each token's share of decode(ids)
    tok.token_text(token_id)                                 # one token's text on its own

Chat templates are rendered the way transformers renders them (sandboxed Jinja, trim_blocks,
lstrip_blocks, its `tojson` and `raise_exception`). A tokenizer without a template gets a plain
"role: content" transcript.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError
from .tools import MISTRAL, plain_messages, tool_format

FALLBACK_ROLE_PREFIX = "\n{role}: "


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, settings: dict, eos_ids: tuple[int, ...] = ()):
        self.settings = settings
        self.chat_template = _select_template(settings.get("chat_template"))
        self.tool_format = tool_format(self.chat_template, tokenizer.token_to_id(MISTRAL.MARKER) is not None)
        # Replies keep Mistral's call marker when decoded, special token or not (vLLM decodes them with
        # skip_special_tokens=False when tools are offered), so that their calls can be parsed.
        self.hf = _not_special(tokenizer, MISTRAL.MARKER) if self.tool_format is MISTRAL else tokenizer
        self.bos_token = _token_text(settings.get("bos_token"))
        self.eos_token = _token_text(settings.get("eos_token"))
        declared_eos = self.hf.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = tuple(dict.fromkeys([*eos_ids, *([declared_eos] if declared_eos is not None else [])]))

    @classmethod
    def from_folder(cls, folder: str | Path, eos_ids: tuple[int, ...] = ()) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: missing; the model folder needs a tokenizer.json")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: cannot be read as a tokenizer ({e})") from None
        settings_path = folder / "tokenizer_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        if "chat_template" not in settings and template_path.is_file():
            settings["chat_template"] = template_path.read_text()
        # generation_config.json may list more ends than config.json (Qwen: <|im_end|> and <|endoftext|>),
        # and transformers' generate stops at all of them.
        generation_path = folder / "generation_config.json"
        if generation_path.is_file():
            more = json.loads(generation_path.read_text()).get("eos_token_id")
            more = [] if more is None else more if isinstance(more, list) else [more]
            eos_ids = (*eos_ids, *more)
        return cls(tokenizer, settings, eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """BOS is never doubled: a text that starts with it (one decoded with its special tokens, as lm-eval
        sends them) keeps only its own, as llama.cpp and lm-eval's hf backend do."""
        check_utf8(text, "the text")
        if add_special_tokens and self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's piece of `decode(ids)`, in order: they join to the whole text. A token that ends
        inside a character has "" and the one that completes the character carries all of it."""
        decoder = self.stream_decoder()
        texts = [decoder.push(token_id) for token_id in ids]
        if texts:
            texts[-1] += decoder.flush()
        return texts

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, special tokens by name, with the leading space that decoding the
        token alone can drop (it is decoded after an anchor token, whose text is then cut off)."""
        text = self.hf.decode([*self._anchor, token_id], skip_special_tokens=False)
        return text[len(self._anchor_text):]

    @cached_property
    def _anchor(self) -> list[int]:
        return self.hf.encode("a", add_special_tokens=False).ids[-1:]

    @cached_property
    def _anchor_text(self) -> str:
        return self.hf.decode(self._anchor, skip_special_tokens=False)

    def info(self) -> dict:
        """The special tokens and chat template, as vLLM's GET /tokenizer_info gives them."""
        return {"tokenizer_class": self.settings.get("tokenizer_class"), "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": _token_text(self.settings.get("pad_token")),
                "unk_token": _token_text(self.settings.get("unk_token")), "chat_template": self.chat_template}

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes tools, tool calls and tool results itself (it reads `tools`)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI's function tools; a template that does not render them gets them, and the
        conversation's calls and results, written as text (tools.py)."""
        if self.renders_tools:
            messages = self.tool_format.history(messages)
        else:
            messages, tools = plain_messages(messages, tools, self.tool_format), None
        if self.chat_template is None:
            return _fallback_transcript(messages, add_generation_prompt)
        try:
            return self._compiled_template.render(
                messages=messages,
                **({"tools": tools} if tools else {}),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                unk_token=_token_text(self.settings.get("unk_token")) or "",
                pad_token=_token_text(self.settings.get("pad_token")) or "",
            )
        except Exception as e:  # jinja errors, raise_exception() from the template itself
            raise UserError(f"chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools)
        if self.chat_template is None:
            return self.encode(text)
        # Templates write their own BOS, as transformers assumes.
        return self.encode(text, add_special_tokens=False)

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Strings that end an assistant turn in the fallback transcript (templates end with EOS)."""
        if self.chat_template is not None:
            return ()
        return tuple(FALLBACK_ROLE_PREFIX.format(role=r).rstrip() for r in ("user", "system"))

    @cached_property
    def _compiled_template(self):
        return _compile_template(self.chat_template)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a multi-byte character.

    Decoding is done on a short window of recent ids so the cost per token stays constant; text
    is held back while it ends in U+FFFD (an incomplete byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_start = 0   # window start: decoded for context only
        self.emitted_upto = 0   # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_start:self.emitted_upto])
        full = decode(self.ids[self.prefix_start:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_start, self.emitted_upto = self.emitted_upto, len(self.ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_start:self.emitted_upto])
        full = decode(self.ids[self.prefix_start:])
        self.prefix_start = self.emitted_upto = len(self.ids)
        return full[len(prefix):]


def check_utf8(text: str, what: str) -> None:
    """Refuse text that has no UTF-8 form. Python hands over the bytes of a command line or a terminal
    that are not UTF-8 as lone surrogates (U+DC80-U+DCFF, "surrogateescape"), which the tokenizer
    cannot take; `what` names the text in the message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"unpaired surrogate U+{code:04X}"
        raise UserError(f"{what} is not valid UTF-8 ({found} at character {e.start}); use UTF-8 text") from None


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # older configs store AddedToken dicts
        return token.get("content")
    return token


def _not_special(tokenizer: HFTokenizer, content: str) -> HFTokenizer:
    """`tokenizer` with the added token `content` no longer special, so that decoding keeps it (the tokenizers
    library keeps the flag of a token added again, so the tokenizer is rebuilt from its JSON)."""
    data = json.loads(tokenizer.to_str())
    for added in data.get("added_tokens", ()):
        if added["content"] == content:
            added["special"] = False
    return HFTokenizer.from_str(json.dumps(data))


def _select_template(template):
    if isinstance(template, list):  # named templates: use the default one
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def _fallback_transcript(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(FALLBACK_ROLE_PREFIX.format(role=m["role"]) + m["content"] for m in messages).lstrip("\n")
    if add_generation_prompt:
        text += FALLBACK_ROLE_PREFIX.format(role="assistant").rstrip(" ")
    return text


def _compile_template(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
