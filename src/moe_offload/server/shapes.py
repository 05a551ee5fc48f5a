"""The JSON of answers and stream chunks: /v1/completions' and /v1/chat/completions', logprobs included.

    writer = ChoiceWriter(ChatShape, job, tokenizer)
    writer.opening(run)        # the chunks before the first piece: chat's role, completions' echo
    writer.piece(run, text)    # the chunk of one text piece, with its tokens' logprobs
    writer.end(run)            # the last chunk of the choice: finish_reason, the logprobs not yet sent
    writer.whole(run, text)    # or, not streamed, the whole choice

A reply that may call tools (the job has tools) is parsed for calls when it ends (tools.py, in the
checkpoint's format): streamed,
it comes whole in its last chunk, with `tool_calls` and finish_reason "tool_calls" when it has calls.

Logprobs are of the model's raw distribution (logprobs.py). Each token is reported with its share of
the text (Tokenizer.token_texts), so completions' `tokens` join to the text and `text_offset` points
into it; a token that ends inside a character has the text "" and the one that completes it carries
the character. Alternatives are named by their own text (Tokenizer.token_text). Chat's `bytes` are the
UTF-8 of the token's text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import Run
from ..logprobs import TokenLogprob
from ..tokenizer import Tokenizer
from .choices import Job


@dataclass(frozen=True)
class TokenReport:
    text: str
    offset: int                  # where `text` starts in the choice's text
    entry: TokenLogprob | None   # None: the prompt's first token, which no distribution predicts


class CompletionShape:
    """/v1/completions: `text`, and OpenAI's legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"
    role_delta = False

    @staticmethod
    def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    delta = choice

    @staticmethod
    def logprobs(reports: list[TokenReport], tokenizer: Tokenizer) -> dict:
        """Each token's alternatives as {text: logprob}, the token itself among them (so up to `logprobs` + 1)."""
        def top(entry: TokenLogprob | None):
            if entry is None:
                return None
            alternatives = {}
            for token_id, logprob in (*entry.top, (entry.token_id, entry.logprob)):
                alternatives.setdefault(tokenizer.token_text(token_id), logprob)
            return alternatives

        return {"tokens": [r.text for r in reports],
                "token_logprobs": [None if r.entry is None else r.entry.logprob for r in reports],
                "top_logprobs": [top(r.entry) for r in reports],
                "text_offset": [r.offset for r in reports]}


class ChatShape:
    """/v1/chat/completions: `message` / `delta`, and logprobs as {"content": [{token, logprob, bytes, top_logprobs}]}."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"
    role_delta = True

    @staticmethod
    def choice(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
               calls: list[dict] | None = None) -> dict:
        message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def delta(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
              calls: list[dict] | None = None) -> dict:
        delta = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def logprobs(reports: list[TokenReport], tokenizer: Tokenizer) -> dict:
        def token(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**token(r.text, r.entry.logprob),
                             "top_logprobs": [token(tokenizer.token_text(i), lp) for i, lp in r.entry.top]}
                            for r in reports], "refusal": None}


class ChoiceWriter:
    """One choice's JSON, streamed piece by piece or whole; logprobs when its params ask for them."""

    def __init__(self, shape, job: Job, tokenizer: Tokenizer):
        self.shape, self.job, self.tokenizer = shape, job, tokenizer
        self.echo = job.echo or ""
        self.decoder = tokenizer.stream_decoder()   # the engine's texts of the new tokens, token by token
        self.reported = 0                           # new tokens whose logprobs went out
        self.offset = len(self.echo)
        self.pieces = 0
        self.withheld: list[str] = []               # a reply that may call tools is parsed when it ends

    @property
    def wants_logprobs(self) -> bool:
        return self.job.params.logprobs is not None

    def opening(self, run: Run) -> list[dict]:
        index, deltas = self.job.index, []
        if self.shape.role_delta:
            deltas.append({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None})
        if self.job.echo is not None:
            prompt = self._prompt_reports(run)
            deltas.append(self.shape.delta(index, self.echo, None, self._format(prompt) if prompt else None))
        return deltas

    def piece(self, run: Run, text: str) -> dict | None:
        """The chunk of a piece; None while a reply that may call tools is withheld."""
        end = run.piece_ends[self.pieces]
        self.pieces += 1
        if self.job.tools is not None:
            self.withheld.append(text)
            return None
        return self.shape.delta(self.job.index, text, None, self._format(self._new_reports(run, end, final=False)))

    def end(self, run: Run) -> dict:
        logprobs = self._format(self._new_reports(run, len(run.token_ids), final=True))
        if self.job.tools is not None:
            return self.shape.delta(self.job.index, *self._tool_reply(run, "".join(self.withheld), logprobs))
        return self.shape.delta(self.job.index, "", run.finish_reason, logprobs)

    def whole(self, run: Run, text: str) -> dict:
        logprobs = None
        if self.wants_logprobs:
            reports = self._prompt_reports(run) + self._new_reports(run, len(run.token_ids), final=True)
            logprobs = self.shape.logprobs(reports, self.tokenizer)
        if self.job.tools is not None:
            return self.shape.choice(self.job.index, *self._tool_reply(run, text, logprobs))
        return self.shape.choice(self.job.index, self.echo + text, run.finish_reason, logprobs)

    def _tool_reply(self, run: Run, text: str, logprobs: dict | None) -> tuple:
        """(content, finish_reason, logprobs, calls): calls found in the text leave the content; finish_reason
        "tool_calls" when the reply ended by itself (a reply cut at max_tokens stays "length")."""
        content, calls = self.tokenizer.tool_format.parse(text, self.job.tools)
        if not calls:
            return text, run.finish_reason, logprobs, None
        return content, "tool_calls" if run.finish_reason == "stop" else run.finish_reason, logprobs, calls

    def _format(self, reports: list[TokenReport]) -> dict | None:
        return self.shape.logprobs(reports, self.tokenizer) if reports else None

    def _prompt_reports(self, run: Run) -> list[TokenReport]:
        """The echoed prompt's tokens, when the params asked for prompt logprobs."""
        if self.job.params.prompt_logprobs is None:
            return []
        reports, offset = [], 0
        entries = [None, *run.prompt_logprobs]
        for text, entry in zip(self.tokenizer.token_texts(self.job.prompt_ids), entries):
            reports.append(TokenReport(text, offset, entry))
            offset += len(text)
        return reports

    def _new_reports(self, run: Run, end: int, final: bool) -> list[TokenReport]:
        """New tokens from the last reported one up to `end`."""
        if not self.wants_logprobs:
            return []
        entries = run.logprobs[self.reported:end]
        self.reported = end
        texts = [self.decoder.push(entry.token_id) for entry in entries]
        if final and texts:
            texts[-1] += self.decoder.flush()
        reports = []
        for text, entry in zip(texts, entries):
            reports.append(TokenReport(text, self.offset, entry))
            self.offset += len(text)
        return reports
