"""Small GPU kernels of the decode step, each beside its torch twin (CPU, or no Triton).

    out = decode_attention(q, keys, values, position, window)   # one new token against the KV cache

Decode attention takes the token's position as a device tensor and reads the cache only up to it, so
a captured CUDA graph serves every position (step.py). It is split-K ("flash decoding"): programs of
one KV head and a range of keys each keep a running max, sum and weighted values for the head's
group of query heads (GQA), in fp32; a second kernel merges the ranges.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:
    AVAILABLE = False

KEYS_PER_SPLIT = 256    # keys a program of decode attention covers at most
KEY_BLOCK = 64          # keys it takes at a time
MIN_QUERY_ROWS = 16     # tl.dot's smallest tile: a head group's query rows are padded to it


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                     window: int | None) -> torch.Tensor:
    """q (batch, heads, 1, D) of the token at `position` (int64 (1,)); keys, values (batch, kv_heads, max_len, D),
    written up to that position -> (batch, heads, 1, D): attention over keys position - window < j <= position."""
    if q.is_cuda and AVAILABLE:
        return _triton_decode_attention(q, keys, values, position, window or 0)
    end = int(position[-1]) + 1             # the host knows it for free on the CPU
    start = max(0, end - window) if window else 0
    return F.scaled_dot_product_attention(q, keys[:, :, start:end], values[:, :, start:end],
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _triton_decode_attention(q, keys, values, position, window: int) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    kv_heads, max_len = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    group_pad = max(MIN_QUERY_ROWS, triton.next_power_of_2(group))
    dim_pad = max(16, triton.next_power_of_2(dim))
    splits = -(-max_len // KEYS_PER_SPLIT)
    partial = torch.empty((batch * kv_heads, splits, group_pad, dim_pad), device=q.device, dtype=torch.float32)
    stats = torch.empty((batch * kv_heads, splits, 2, group_pad), device=q.device, dtype=torch.float32)
    out = torch.empty((batch, heads, 1, dim), device=q.device, dtype=q.dtype)
    assert keys.stride() == values.stride() and keys.stride(-1) == 1 and q.stride(-1) == 1
    _attention_ranges[(batch * kv_heads, splits)](
        q, keys, values, position, partial, stats,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        1 / math.sqrt(dim), window, kv_heads,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, DIM_PAD=dim_pad, KEYS=KEYS_PER_SPLIT, BLOCK=KEY_BLOCK,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    _attention_merge[(batch * kv_heads,)](
        partial, stats, out, out.stride(0), out.stride(1), kv_heads, splits,
        GROUP=group, GROUP_PAD=group_pad, DIM=dim, DIM_PAD=dim_pad, SPLITS_PAD=triton.next_power_of_2(splits),
    )
    return out


if AVAILABLE:
    @triton.jit
    def _attention_ranges(q_ptr, k_ptr, v_ptr, position_ptr, partial_ptr, stats_ptr,
                          q_batch, q_head, kv_batch, kv_head, kv_key, scale, WINDOW, KV_HEADS,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                          KEYS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        """One KV head's query heads over keys [split KEYS, (split + 1) KEYS) that are visible: the range's
        max score m, sum of exp(score - m) l, and sum of exp(score - m) v (fp32), or m = -inf when none is."""
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = pid // KV_HEADS, pid % KV_HEADS
        position = tl.load(position_ptr)
        lo = split * KEYS
        hi = tl.minimum(lo + KEYS, position + 1)
        if WINDOW > 0:
            lo = tl.maximum(lo, position + 1 - WINDOW)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        q = tl.load(q_ptr + b * q_batch + (h * GROUP + g)[:, None] * q_head + d[None, :],
                    mask=(g < GROUP)[:, None] & (d < DIM)[None, :], other=0.0)
        base = b * kv_batch + h * kv_head
        top = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
        for start in range(lo, hi, BLOCK):
            key = start + tl.arange(0, BLOCK)
            visible = key < hi
            at = base + key[:, None] * kv_key + d[None, :]
            loaded = visible[:, None] & (d < DIM)[None, :]
            k = tl.load(k_ptr + at, mask=loaded, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            scores = tl.where(visible[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            weights = tl.exp(scores - new_top[:, None])
            fade = tl.exp(top - new_top)
            total = total * fade + tl.sum(weights, 1)
            v = tl.load(v_ptr + at, mask=loaded, other=0.0)
            acc = acc * fade[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        SPLITS = tl.num_programs(1)
        row = pid * SPLITS + split
        tl.store(partial_ptr + (row * GROUP_PAD + g[:, None]) * DIM_PAD + d[None, :], acc)
        tl.store(stats_ptr + (row * 2) * GROUP_PAD + g, top)
        tl.store(stats_ptr + (row * 2 + 1) * GROUP_PAD + g, total)

    @triton.jit
    def _attention_merge(partial_ptr, stats_ptr, out_ptr, out_batch, out_head, KV_HEADS, SPLITS,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                         SPLITS_PAD: tl.constexpr):
        """The ranges of one KV head merged: sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s."""
        pid = tl.program_id(0)
        b, h = pid // KV_HEADS, pid % KV_HEADS
        s = tl.arange(0, SPLITS_PAD)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        rows = pid * SPLITS + s
        used = s < SPLITS
        top = tl.load(stats_ptr + (rows * 2)[:, None] * GROUP_PAD + g[None, :], mask=used[:, None], other=float("-inf"))
        total = tl.load(stats_ptr + (rows * 2 + 1)[:, None] * GROUP_PAD + g[None, :], mask=used[:, None], other=0.0)
        overall = tl.max(top, 0)
        fade = tl.exp(top - overall[None, :])                       # (splits, group): 0 for empty ranges
        acc = tl.load(partial_ptr + ((rows[:, None, None] * GROUP_PAD + g[None, :, None]) * DIM_PAD + d[None, None, :]),
                      mask=used[:, None, None], other=0.0)
        out = tl.sum(fade[:, :, None] * acc, 0) / tl.sum(fade * total, 0)[:, None]
        tl.store(out_ptr + b * out_batch + (h * GROUP + g)[:, None] * out_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < DIM)[None, :])
