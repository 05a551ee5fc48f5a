"""Log-probabilities of the tokens a run reads and writes, with the likeliest alternatives.

    recorder = LogprobRecorder(prompt_ids, top=5, prompt_top=5)
    for token in generate(model, cache, prompt_ids, params, watch=recorder.see):
        entry = recorder.take(token)       # TokenLogprob(token_id, logprob, top=((id, logprob), ...))
    recorder.prompt                        # entries of prompt tokens 1..T-1 (the first has no distribution)

The distribution is the model's own, log_softmax(logits) in fp32, before temperature, penalties or
top-k/top-p/min-p reshape it (what vLLM reports by default): a score of the text under the model,
the same however the text was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_AT_ONCE = 512   # prompt positions per log_softmax: the extra memory is at most 512 x vocab fp32


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]   # the likeliest tokens with their logprobs, likeliest first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """logits (N, vocab) and the N tokens that followed them -> N entries with `top` alternatives each,
    read back to the host in one transfer per ROWS_AT_ONCE rows (token ids are exact in fp32 below 2^24)."""
    entries = []
    top = min(top, logits.shape[-1])
    for start in range(0, len(token_ids), ROWS_AT_ONCE):
        rows = logits[start:start + ROWS_AT_ONCE].float().log_softmax(-1)
        ids = torch.tensor(token_ids[start:start + ROWS_AT_ONCE], device=rows.device)
        values, indices = rows.topk(top, dim=-1)
        table = torch.cat([ids[:, None].float(), rows.gather(1, ids[:, None]), values, indices.float()], 1).tolist()
        for row in table:
            alternatives = tuple((int(i), v) for v, i in zip(row[2:2 + top], row[2 + top:]))
            entries.append(TokenLogprob(int(row[0]), row[1], alternatives))
    return entries


class LogprobRecorder:
    """generate()'s `watch`: keeps the last distribution until `take` learns which token came of it."""

    def __init__(self, prompt_ids: list[int], top: int, prompt_top: int | None = None):
        self.prompt_ids, self.top, self.prompt_top = prompt_ids, top, prompt_top
        self.prompt: list[TokenLogprob] = []
        self.pending: torch.Tensor | None = None

    def see(self, logits: torch.Tensor) -> None:
        if logits.dim() == 2:   # the prompt's: every position when prompt logprobs were asked for
            if self.prompt_top is not None:
                self.prompt[:] = token_logprobs(logits[:-1], self.prompt_ids[1:], self.prompt_top)
            logits = logits[-1]
        self.pending = logits

    def take(self, token_id: int) -> TokenLogprob:
        (entry,) = token_logprobs(self.pending[None], [token_id], self.top)
        return entry
