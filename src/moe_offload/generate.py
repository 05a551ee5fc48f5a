"""Prefill, then decode through the KV cache, as a generator of token ids.

    for token_id in generate(model, cache, prompt_ids, params, eos_ids, step=DecodeStep(model, cache)):
        ...

Decoding runs step.py's DecodeStep (CUDA graphs where it can). Greedy decoding without penalties picks the
next token on the device; other sampling (and penalized greedy) runs on the CPU in fp32 from a seeded
generator, so a seed gives the same tokens on any device. Stop strings are text, not ids: the engine
handles them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .config import SamplingParams
from .constrain import Constraint
from .model import KVCache, Transformer
from .step import DecodeStep

PREFILL_CHUNK = 2048  # prompt tokens per forward: each expert crosses the link at most once per forward; bounds activations


def prefill(model: Transformer, cache: KVCache, prompt_ids: list[int], device, last_only: bool = True,
            stop_requested: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """Run the prompt through the model in chunks; returns logits (1, vocab) of its last token,
    or (T, vocab) for every position when `last_only` is False; None when `stop_requested()` says so
    before a chunk."""
    pieces = []
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        if stop_requested and stop_requested():
            return None
        chunk = torch.tensor([prompt_ids[start:start + PREFILL_CHUNK]], device=device)
        is_last = start + PREFILL_CHUNK >= len(prompt_ids)
        logits = model(chunk, cache, start_pos=start, last_only=last_only)
        if not last_only:
            pieces.append(logits[0])
        elif is_last:
            return logits[0]
    return torch.cat(pieces)


def generate(model: Transformer, cache: KVCache, prompt_ids: list[int], params: SamplingParams,
             eos_ids: tuple[int, ...] = (), step: DecodeStep | None = None,
             watch: Callable[[torch.Tensor], None] | None = None,
             stop_requested: Callable[[], bool] | None = None, constraint: Constraint | None = None) -> Iterator[int]:
    """Yield new token ids until EOS (not yielded), `params.max_new_tokens`, or prompt plus new
    tokens fill the cache. `step`: the model's decode step, reused across generations (a fresh one
    runs eagerly for its first token and captures its graphs on the second). `watch(logits)`, when
    given, sees each distribution before a token is picked from it: the prompt's last position
    (1, vocab), or every position (T, vocab) when `params.prompt_logprobs` is set; then (vocab,) a step
    (a buffer the next step overwrites). For logprobs only: reading logits costs greedy decoding a sync.
    `stop_requested()`, asked between the prompt's chunks, ends the generation before its first token.
    `constraint` (params.grammar's, constrain.py): each token is picked among those it allows, after
    the step's forward is launched (so that on a GPU the mask overlaps it), and then accepted."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    step = step or DecodeStep(model, cache)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    logits = prefill(model, cache, prompt_ids, cache.keys[0].device, params.prompt_logprobs is None, stop_requested)
    if logits is None:
        return
    if watch:
        watch(logits)
    output_ids: list[int] = []
    token = sample(logits[-1], params, generator, prompt_ids, output_ids, constraint and constraint.allowed())
    step.set(token, len(prompt_ids))
    for produced in range(params.max_new_tokens):
        if token in eos_ids:
            return
        yield token
        output_ids.append(token)
        if constraint:
            constraint.accept(token)
        if produced + 1 == params.max_new_tokens or len(prompt_ids) + produced + 1 >= cache.max_len:
            return
        logits = step()
        if watch:
            watch(logits)
        if params.picks_on_host:
            token = sample(logits, params, generator, prompt_ids, output_ids, constraint and constraint.allowed())
            step.set(token)
        else:
            token = step.next_token()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           prompt_ids: list[int] = (), output_ids: list[int] = (), allowed: torch.Tensor | None = None) -> int:
    """logits (vocab,) -> one token id: only `allowed` ones (bool (vocab,), a grammar's), the penalties
    (`prompt_ids` and `output_ids`: the tokens so far), then greedy, or temperature, top-k, top-p and
    min-p (warp) and a draw from `generator`."""
    logits = logits.float().cpu()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logits = penalize(logits, params, prompt_ids, output_ids)
    if params.temperature == 0:
        return int(logits.argmax())
    warped = warp(logits, params)
    if warped is None:
        return int(logits.argmax())
    return int(torch.multinomial(warped.softmax(-1), 1, generator=generator))


def penalize(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """logits (vocab,) fp32 with the repetition penalty on every token of the prompt and the output (as
    transformers and vLLM), then the presence and frequency penalties on the output's tokens (as vLLM)."""
    if not params.penalized:
        return logits
    logits = logits.clone()
    if params.repetition_penalty != 1:
        seen = torch.tensor([*prompt_ids, *output_ids], dtype=torch.int64).unique()
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64), minlength=logits.numel())[:logits.numel()]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """Temperature, then top-k, top-p and min-p, as transformers orders them: logits (vocab,) fp32 with the
    dropped tokens at -inf; None for a temperature so small (< ~1e-37) that fp32 overflows (greedy is its limit)."""
    logits = logits / params.temperature
    if not torch.isfinite(logits.max()):
        return None
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest set reaching top_p
        drop[0] = False   # the likeliest token always stays, even for a top_p that is 0 in fp32 (5e-324)
        logits[order[drop]] = float("-inf")
    if params.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits
