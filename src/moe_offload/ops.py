"""Small GPU kernels of the decode step, each beside its torch twin (the CPU, or no Triton).

    y = rms_norm(x, weight, eps)                                  # weight None: x / rms(x)
    weights, ids = route(logits, top_k, renormalize)              # softmax, top-k, renormalise
    weights, ids = route_sparsemixer(logits, jitter)              # phimoe (torch only)
    weights, ids = route_grouped(logits, top_k, groups, ...)      # sigmoid scores, group-limited top-k (torch only)
    out = sink_attention(q, keys, values, visible, sinks)         # gpt-oss's attention with sinks (torch only)
    q = rotate_and_cache(q, k, v, rope, positions, rows, keys, values)   # RoPE on q and k, k and v into the cache
    out = decode_attention(q, keys, values, positions, rows, window)     # one new token a row against the cache
    y = combine(picked, weights)                                  # each token's top-k outputs, weighted, summed

A decode step would otherwise launch dozens of tiny kernels per layer (RMSNorm alone is eight), and in
a CUDA graph each still costs a couple of microseconds; these do the same in one launch each. They
round as their twins do, step by step in the model's dtype where the twin does, but add in their own
order: CPU and GPU agree to the last bits of fp32, not bit for bit.

Decoding takes one token per row of the batch, each with its own position and KV cache row (device tensors),
so a captured graph serves every position and every placement of sequences (step.py). Decode attention
reads each row's cache only up to its position; it is split-K ("flash decoding"): programs of one KV head and
a range of keys each keep a running max, sum and weighted values for the head's group of query heads
(GQA), in fp32; a second kernel merges the ranges.
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


def fused(x: torch.Tensor) -> bool:
    """Whether x's work runs in this file's Triton kernels (CUDA with Triton), not in the torch twins: not with
    autograd on (training; the kernels have no backward, and a checkpointed layer must recompute the same ops)."""
    return x.is_cuda and AVAILABLE and not torch.is_grad_enabled()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension: normalised in fp32 as the reference implementations do,
    then scaled in x's dtype (weight None: not scaled)."""
    if fused(x) and x.is_contiguous():
        return _triton_rms_norm(x, weight, eps)
    x32 = x.float()
    normalized = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normalized if weight is None else weight * normalized


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> fp32 weights (T, k) and int64 expert ids (T, k): softmax in fp32, the top k
    (ties to the lower id on the GPU), renormalised to sum to 1 when asked."""
    if fused(logits) and logits.is_contiguous():
        return _triton_route(logits, top_k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def clamped_swiglu_activation(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation from its w1 and w3 products: gate at most `limit`, up within +-limit,
    (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def route_sparsemixer(logits: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's sparsemixer at inference, as transformers computes it: logits (T, E) -> fp32 weights and int64 ids
    (T, 2). The first expert is the best; its weight is the softmax over the experts whose logit is within
    2 jitter (relative to max(|logit|, best)) of the best. The second is the best of the others, weighted by the same
    softmax over the others."""
    scores = logits.float()
    weights, ids = [], []
    masked = scores
    for _ in range(2):
        best, choice = masked.max(dim=-1, keepdim=True)
        far = (best - scores) / scores.abs().clamp(min=best) > 2 * jitter
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, choice))
        ids.append(choice)
        masked = masked.scatter(-1, choice, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


def route_grouped(logits: torch.Tensor, top_k: int, groups: int, top_groups: int, renormalize: bool,
                  correction: torch.Tensor | None, sigmoid: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM-4.5 routing: logits (T, E) -> fp32 weights and int64 ids (T, top_k). Scores are sigmoids;
    experts are chosen by score + `correction` among the `top_groups` of `groups` equal groups whose two best
    (corrected) scores sum highest; weights are the chosen scores (without the correction), renormalised to sum
    to 1 when asked. `sigmoid` False: DeepSeek-V2's group-limited greedy, softmax scores and groups ranked by
    their best score."""
    scores = logits.float().sigmoid() if sigmoid else logits.float().softmax(dim=-1)
    choice = scores if correction is None else scores + correction
    tokens, experts = choice.shape
    grouped = choice.view(tokens, groups, experts // groups)
    group_scores = grouped.topk(min(2, experts // groups), dim=-1).values.sum(-1) if sigmoid else grouped.amax(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(top_groups, dim=-1).indices, True)
    choice = choice.masked_fill(~kept.repeat_interleave(experts // groups, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, T, head_dim) rotated by cos, sin (T, rotary_dim): the half-split layout (rotate_half) on the
    first rotary_dim dimensions of each head (all of them but for partial rotary embeddings); the rest pass."""
    if cos.shape[-1] < x.shape[-1]:
        rotary_dim = cos.shape[-1]
        return torch.cat([apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def rotate_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     positions: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One token a row: q (n, heads, 1, D), k and v (n, kv_heads, 1, D) at positions (int64 (n,)); rope the cos and
    sin tables (max_len, D) of every position. Writes RoPE(k) and v into keys, values (cache rows, kv_heads,
    max_len, D) at row rows[b] (int64 (n,)), position positions[b], and returns RoPE(q), (n, heads, 1, D).
    Tables narrower than D (partial rotary embeddings) run in the torch twin."""
    if fused(q) and rope[0].shape[-1] == q.shape[-1]:
        return _triton_rotate_and_cache(q, k, v, rope, positions, rows, keys, values)
    cos, sin = rope[0][positions][:, None, None], rope[1][positions][:, None, None]    # (n, 1, 1, D)
    keys[rows, :, positions] = apply_rotary(k, cos, sin)[:, :, 0]
    values[rows, :, positions] = v[:, :, 0]
    return apply_rotary(q, cos, sin)


def combine(picked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """picked (T * k, hidden): each (token, choice) pair's expert output; weights fp32 (T, k) -> (T, hidden):
    sum_j weights[t, j] picked[t k + j], in fp32 in choice order, then in picked's dtype."""
    if fused(picked) and picked.is_contiguous():
        return _triton_combine(picked, weights)
    top_k = weights.shape[-1]
    weighted = picked.view(-1, top_k, picked.shape[-1]).float() * weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(picked.dtype)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     rows: torch.Tensor, window: int | None) -> torch.Tensor:
    """q (n, heads, 1, D) of one token a row, at positions (int64 (n,)); keys, values (cache rows, kv_heads, max_len,
    D), row rows[b] written up to positions[b] -> (n, heads, 1, D): attention over keys p - window < j <= p."""
    if fused(q):
        return _triton_decode_attention(q, keys, values, positions, rows, window or 0)
    out = []
    for b, (row, position) in enumerate(zip(rows.tolist(), positions.tolist())):   # free on the CPU
        start = max(0, position + 1 - window) if window else 0
        out.append(F.scaled_dot_product_attention(q[b:b + 1], keys[row:row + 1, :, start:position + 1],
                                                  values[row:row + 1, :, start:position + 1],
                                                  enable_gqa=q.shape[1] != keys.shape[1]))
    return torch.cat(out) if len(out) > 1 else out[0]


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
                   sinks: torch.Tensor) -> torch.Tensor:
    """gpt-oss's attention: q (batch, heads, T, D) over keys, values (batch, kv_heads, S, D) where visible (T, S)
    (None: everywhere), each head's softmax also over a learned logit `sinks[head]` that takes weight but brings no
    value. Softmax in fp32; -> (batch, heads, T, D)."""
    batch, heads, length, dim = q.shape
    group = heads // keys.shape[1]
    k, v = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(dim)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(1, heads, 1, 1).expand(batch, heads, length, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _triton_rms_norm(x, weight, eps: float) -> torch.Tensor:
    width = x.shape[-1]
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(_rows(x),)](x, x if weight is None else weight, out, width, eps, BLOCK=block,
                                  SCALED=weight is not None, num_warps=min(16, max(1, block // 512)))
    return out


def _triton_route(logits, top_k: int, renormalize: bool):
    rows, experts = _rows(logits), logits.shape[-1]
    weights = torch.empty((rows, top_k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((rows, top_k), device=logits.device, dtype=torch.int64)
    _route_kernel[(rows,)](logits, weights, ids, experts, TOP_K=top_k, RENORMALIZE=renormalize,
                           BLOCK=triton.next_power_of_2(experts), K_BLOCK=triton.next_power_of_2(top_k))
    return weights, ids


def _triton_rotate_and_cache(q, k, v, rope, positions, rows, keys, values) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert keys.stride() == values.stride() and keys.stride(-1) == 1 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    _rotate_and_cache_kernel[(batch, heads + kv_heads)](
        q, k, v, rope[0], rope[1], positions, rows, out, keys, values,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), heads, dim // 2,
        HALF=triton.next_power_of_2(dim // 2))
    return out


def _triton_combine(picked, weights) -> torch.Tensor:
    tokens, top_k = weights.shape
    width = picked.shape[-1]
    out = torch.empty((tokens, width), device=picked.device, dtype=picked.dtype)
    block = min(1024, triton.next_power_of_2(width))
    _combine_kernel[(tokens, triton.cdiv(width, block))](picked, weights.contiguous(), out, width, TOP_K=top_k, BLOCK=block)
    return out


def _triton_decode_attention(q, keys, values, positions, rows, window: int) -> torch.Tensor:
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
        q, keys, values, positions, rows, partial, stats,
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
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, WIDTH, eps, BLOCK: tl.constexpr, SCALED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < WIDTH
        x = tl.load(x_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        normalized = (x * tl.rsqrt(tl.sum(x * x, 0) / WIDTH + eps)).to(out_ptr.dtype.element_ty)
        if SCALED:
            normalized = tl.load(w_ptr + cols, mask=inside) * normalized
        tl.store(out_ptr + row * WIDTH + cols, normalized, mask=inside)

    @triton.jit
    def _route_kernel(logits_ptr, weights_ptr, ids_ptr, EXPERTS, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                      BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        expert = tl.arange(0, BLOCK)
        logits = tl.load(logits_ptr + row * EXPERTS + expert, mask=expert < EXPERTS, other=float("-inf")).to(tl.float32)
        exps = tl.exp(logits - tl.max(logits, 0))
        left = tl.where(expert < EXPERTS, exps / tl.sum(exps, 0), -1.0)
        place = tl.arange(0, K_BLOCK)
        weights = tl.zeros((K_BLOCK,), tl.float32)
        ids = tl.zeros((K_BLOCK,), tl.int64)
        for j in tl.static_range(TOP_K):        # the largest left, the lowest id among equals; then taken out
            best = tl.max(left, 0)
            chosen = tl.min(tl.where(left == best, expert, BLOCK), 0)
            weights = tl.where(place == j, best, weights)
            ids = tl.where(place == j, chosen.to(tl.int64), ids)
            left = tl.where(expert == chosen, -1.0, left)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, 0)
        tl.store(weights_ptr + row * TOP_K + place, weights, mask=place < TOP_K)
        tl.store(ids_ptr + row * TOP_K + place, ids, mask=place < TOP_K)

    @triton.jit
    def _rotate_and_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, rows_ptr, out_ptr, keys_ptr, values_ptr,
                                 q_batch, q_head, k_batch, k_head, v_batch, v_head, cache_batch, cache_head, cache_key,
                                 HEADS, HALF_DIM, HALF: tl.constexpr):
        """Program (b, h): query head h, or for h >= HEADS key/value head h - HEADS. Rounds as apply_rotary does:
        x cos and rotate_half(x) sin each in x's dtype, then their sum."""
        b, h = tl.program_id(0), tl.program_id(1)
        position = tl.load(positions_ptr + b)
        d = tl.arange(0, HALF)
        inside = d < HALF_DIM
        table = position * (2 * HALF_DIM)
        cos_low = tl.load(cos_ptr + table + d, mask=inside, other=0.0)
        cos_high = tl.load(cos_ptr + table + HALF_DIM + d, mask=inside, other=0.0)
        sin_low = tl.load(sin_ptr + table + d, mask=inside, other=0.0)
        sin_high = tl.load(sin_ptr + table + HALF_DIM + d, mask=inside, other=0.0)
        if h < HEADS:
            source = q_ptr + b * q_batch + h * q_head
        else:
            source = k_ptr + b * k_batch + (h - HEADS) * k_head
        low = tl.load(source + d, mask=inside, other=0.0)
        high = tl.load(source + HALF_DIM + d, mask=inside, other=0.0)
        dtype = low.dtype
        out_low = low * cos_low.to(dtype) + (-high) * sin_low.to(dtype)
        out_high = high * cos_high.to(dtype) + low * sin_high.to(dtype)
        if h < HEADS:
            target = out_ptr + (b * HEADS + h) * (2 * HALF_DIM)
        else:
            cached = tl.load(rows_ptr + b) * cache_batch + (h - HEADS) * cache_head + position * cache_key
            target = keys_ptr + cached
            v_source = v_ptr + b * v_batch + (h - HEADS) * v_head
            tl.store(values_ptr + cached + d, tl.load(v_source + d, mask=inside), mask=inside)
            tl.store(values_ptr + cached + HALF_DIM + d, tl.load(v_source + HALF_DIM + d, mask=inside), mask=inside)
        tl.store(target + d, out_low, mask=inside)
        tl.store(target + HALF_DIM + d, out_high, mask=inside)

    @triton.jit
    def _combine_kernel(picked_ptr, weights_ptr, out_ptr, WIDTH, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        token, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        inside = cols < WIDTH
        total = tl.zeros((BLOCK,), tl.float32)
        for j in tl.static_range(TOP_K):
            weight = tl.load(weights_ptr + token * TOP_K + j)
            total += tl.load(picked_ptr + (token * TOP_K + j) * WIDTH + cols, mask=inside, other=0.0).to(tl.float32) * weight
        tl.store(out_ptr + token * WIDTH + cols, total.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _attention_ranges(q_ptr, k_ptr, v_ptr, positions_ptr, rows_ptr, partial_ptr, stats_ptr,
                          q_batch, q_head, kv_batch, kv_head, kv_key, scale, WINDOW, KV_HEADS,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                          KEYS: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        """One KV head's query heads over keys [split KEYS, (split + 1) KEYS) that are visible: the range's
        max score m, sum of exp(score - m) l, and sum of exp(score - m) v (fp32), or m = -inf when none is."""
        pid, split = tl.program_id(0), tl.program_id(1)
        b, h = pid // KV_HEADS, pid % KV_HEADS
        position = tl.load(positions_ptr + b)
        lo = (split * KEYS).to(tl.int64)
        hi = tl.minimum(lo + KEYS, position + 1)
        if WINDOW > 0:
            lo = tl.maximum(lo, position + 1 - WINDOW)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        q = tl.load(q_ptr + b * q_batch + (h * GROUP + g)[:, None] * q_head + d[None, :],
                    mask=(g < GROUP)[:, None] & (d < DIM)[None, :], other=0.0)
        base = tl.load(rows_ptr + b) * kv_batch + h * kv_head
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
