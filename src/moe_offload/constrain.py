"""Constrained decoding: each token is drawn only from those that keep the text inside a grammar
(a JSON schema, a Lark grammar), with llguidance.

    grammar = json_schema_grammar({"type": "object", ...})     # llguidance's grammar text; GrammarError if bad
    grammars = Grammars(tokenizer, vocab_size)                  # one per engine: the token table, built once
    grammars.check(grammar)                                     # GrammarError with a one-line reason
    constraint = grammars.constraint(grammar)                   # one per generation
    constraint.fill(bitmask_row)                                # int32 (words,): bit i of word w allows token 32w + i
    allowed = constraint.allowed()                              # the same, as bool (vocab,)
    constraint.accept(token_id)

SamplingParams.grammar carries the grammar text and the engine builds the Constraint. A token picked on the
host (sampled, penalized, or the first one after the prompt) is drawn from sample() with the others at -inf;
a greedy one of the decode step is picked on the device: generate.Batch uploads the step's bitmasks (4 bytes
per 32 tokens, pinned, without waiting) and takes the argmax among the allowed tokens there, before the one
read of the step's tokens, so the logits never come back to the host (masked_greedy). The mask of a step is
computed on the CPU after the step's forward is launched, so on a GPU it overlaps the forward;
benchmarks/constrained_mask.py measures it and the pick (docs/server.md, "Structured output"). JSON is compact (no free whitespace), so a model cannot stall a JSON
answer in endless blank lines. Once the grammar is complete only EOS is allowed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import UserError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False}     # compact JSON: `{"a":1}`, as json.dumps(separators=(",", ":"))


class GrammarError(UserError):
    """A schema or grammar that cannot be compiled; the message is one line."""


def json_schema_grammar(schema: dict) -> str:
    """llguidance's grammar for JSON that validates against `schema` (compact, no free whitespace)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(_one_line(str(e))) from None


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


class Grammars:
    """The tokenizer's side of constrained decoding, for one engine (building its token table takes ~1 s at 152k)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        import llguidance

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size,
                                                eos_token=list(tokenizer.eos_ids) or None)

    def check(self, grammar: str) -> None:
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise GrammarError(_one_line(messages[0]))

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


class Constraint:
    """One generation's place in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(grammars.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_one_line(self.matcher.get_error()))
        self.bitmask = torch.zeros(bitmask_words(grammars.vocab_size), dtype=torch.int32)
        self.vocab_size = grammars.vocab_size

    def fill(self, bitmask: torch.Tensor) -> None:
        """The tokens that keep the text inside the grammar, into `bitmask`: int32 (words,), contiguous, on the CPU."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask[None])

    def allowed(self) -> torch.Tensor:
        """bool (vocab,): the tokens that keep the text inside the grammar."""
        self.fill(self.bitmask)
        return unpack_bitmask(self.bitmask, self.vocab_size)

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} is outside the grammar: {self.matcher.get_error()}")


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 (..., words) -> bool (..., vocab_size), on the bitmask's device: bit i of word w is token 32w + i."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[..., None] >> bits) & 1).flatten(-2)[..., :vocab_size].bool()


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "invalid grammar"

