"""Prefill, then decode through the KV cache, as a generator of token ids.

    for token_id in generate(model, cache, prompt_ids, params, eos_ids, step=DecodeStep(model, cache)):
        ...

Decoding runs step.py's DecodeStep (CUDA graphs where it can). Greedy decoding picks the next token on the
device; other sampling runs on the CPU in fp32 from a seeded generator, so a seed gives the same tokens on
any device. Stop strings are text, not ids: the engine handles them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .config import SamplingParams
from .model import KVCache, Transformer
from .step import DecodeStep

PREFILL_CHUNK = 2048  # prompt tokens per forward: each expert crosses the link at most once per forward; bounds activations


def prefill(model: Transformer, cache: KVCache, prompt_ids: list[int], device, last_only: bool = True) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns logits (1, vocab) of its last token,
    or (T, vocab) for every position when `last_only` is False."""
    pieces = []
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
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
             watch: Callable[[torch.Tensor], None] | None = None) -> Iterator[int]:
    """Yield new token ids until EOS (not yielded), `params.max_new_tokens`, or prompt plus new
    tokens fill the cache. `step`: the model's decode step, reused across generations (a fresh one
    runs eagerly for its first token and captures its graphs on the second). `watch(logits)`, when
    given, sees each distribution before a token is picked from it: the prompt's last position
    (1, vocab), or every position (T, vocab) when `params.prompt_logprobs` is set; then (vocab,) a step
    (a buffer the next step overwrites). For logprobs only: reading logits costs greedy decoding a sync."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    step = step or DecodeStep(model, cache)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    logits = prefill(model, cache, prompt_ids, cache.keys[0].device, last_only=params.prompt_logprobs is None)
    if watch:
        watch(logits)
    token = sample(logits[-1], params, generator)
    step.set(token, len(prompt_ids))
    for produced in range(params.max_new_tokens):
        if token in eos_ids:
            return
        yield token
        if produced + 1 == params.max_new_tokens or len(prompt_ids) + produced + 1 >= cache.max_len:
            return
        logits = step()
        if watch:
            watch(logits)
        if params.temperature == 0:
            token = step.next_token()
        else:
            token = sample(logits, params, generator)
            step.set(token)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits (vocab,) -> one token id; temperature, then top-k, then top-p, as transformers orders them."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return int(logits.argmax())
    scaled = logits / params.temperature
    if not torch.isfinite(scaled).all():   # a temperature so small (< ~1e-37) that fp32 overflows: greedy is its limit
        return int(logits.argmax())
    logits = scaled
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest set reaching top_p
        drop[0] = False   # the likeliest token always stays, even for a top_p that is 0 in fp32 (5e-324)
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
