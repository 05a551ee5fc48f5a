"""Perplexity of a model on a text file, over non-overlapping windows.

    result = perplexity(engine, engine.tokenizer.encode(text), window=512)
    print(result.perplexity)

The method is METHOD below (also printed by `moe-offload perplexity --help`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .generate import prefill

WINDOW = 512   # the fixtures were trained on 512-token windows

METHOD = """\
Method: the file is tokenized as one sequence (with the tokenizer's BOS at its start, as
`encode` adds it), cut into consecutive, non-overlapping windows of --window tokens, and the
incomplete tail is dropped. Each window runs on its own from an empty KV cache; within it,
tokens 2..W are predicted from the tokens before them in the same window. Perplexity is
exp(mean negative log-likelihood) over all windows x (W - 1) predictions."""


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float        # nats
    predicted: int        # tokens predicted: windows * (window - 1)
    windows: int
    window: int


def windows_of(token_ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    if window < 2:
        raise UserError(f"--window must be at least 2 tokens, got {window}")
    if max_windows is not None and max_windows < 0:
        raise UserError(f"--max-windows must be 0 (all windows) or more, got {max_windows}")
    count = len(token_ids) // window
    if count == 0:
        raise UserError(f"the text has {len(token_ids)} tokens, fewer than one window of {window}; "
                        f"use a longer file or a smaller --window")
    if max_windows:
        count = min(count, max_windows)
    return [token_ids[i * window:(i + 1) * window] for i in range(count)]


def perplexity(engine, token_ids: list[int], window: int = WINDOW, max_windows: int | None = None,
               progress_bar=None) -> PerplexityResult:
    """`engine`: an engine.Engine. After the checks, `progress_bar(total)` (e.g. a tqdm factory)
    is told of each window done."""
    if window > engine.max_context:
        raise UserError(f"--window {window} exceeds the context of {engine.max_context} tokens; "
                        f"use a smaller --window or raise --max-context")
    device = engine.cache.keys[0].device
    nll_sum, predicted = 0.0, 0
    chunks = windows_of(token_ids, window, max_windows)
    with progress_bar(len(chunks)) if progress_bar else contextlib.nullcontext() as bar:
        for ids in chunks:
            logits = prefill(engine.model, engine.cache, ids, device, last_only=False)    # (W, vocab) fp32
            targets = torch.tensor(ids[1:], device=device)
            nll_sum += F.cross_entropy(logits[:-1].float(), targets, reduction="sum").item()
            predicted += len(ids) - 1
            if bar:
                bar.update(1)
    return PerplexityResult(math.exp(nll_sum / predicted), nll_sum, predicted, len(chunks), window)
