"""The math of a decoder-only MoE transformer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and nothing else.

    model = Transformer(config, weights, provider)
    cache = KVCache.allocate(config, batch=1, max_len=4096, device=..., dtype=...)
    logits = model(tokens, cache, start_pos=0)       # tokens: (batch, T) -> logits (batch, T, vocab)
    logits = model(tokens, cache, positions, rows)   # decode: tokens (n, 1); positions, cache rows: int64 (n,) on the device

Family differences are plain fields of `ModelConfig` (q/k norms, qkv bias and clipping, shared
experts, dense layers). Routed experts come from an `ExpertProvider` (see experts.py); every other
weight is held here. A weight is a tensor (out, in) or a quantized object with `.linear(x)`.

With `start_pos` a device tensor, a forward decodes one token per row without reading anything back to
the host: each row's position and KV cache row come from device tensors, which RoPE, the KV write and
attention's length read on the device, so the same work can be captured once as CUDA graphs and replayed
for every token and every placement of sequences in the cache (step.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ops
from .ops import apply_rotary, rms_norm, route
from .config import ModelConfig
from .experts import Expert, ExpertBatch, ExpertFormat, ExpertProvider


# cuDNN attention builds a new plan for every key length, i.e. for every decoded token: leave it out.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ATTENTION_CHUNK = 512   # queries per attention call in a long forward: bounds its scores, should it fall back to math


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    y = weight.linear(x)
    return y if bias is None else y + bias


def swiglu(mlp: Expert, x: torch.Tensor) -> torch.Tensor:
    return linear(F.silu(linear(x, mlp.w1)) * linear(x, mlp.w3), mlp.w2)


def rotary(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` (T,), each (T, head_dim), half-split layout (rotate_half)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass
class AttentionWeights:
    wq: object
    wk: object
    wv: object
    wo: object
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # (head_dim,) or (heads * head_dim,), by config.qk_norm
    k_norm: torch.Tensor | None = None


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    attn: AttentionWeights
    mlp_norm: torch.Tensor
    router: torch.Tensor | None = None         # (num_experts, hidden); None in dense layers
    dense_mlp: Expert | None = None            # dense layers only
    shared_expert: Expert | None = None        # qwen2_moe
    shared_expert_gate: torch.Tensor | None = None  # (1, hidden)


@dataclass
class ModelWeights:
    embed: torch.Tensor      # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: object          # (vocab, hidden)


@dataclass
class KVCache:
    keys: list[torch.Tensor]    # per layer: (batch, kv_heads, max_len, head_dim)
    values: list[torch.Tensor]
    rope: tuple[torch.Tensor, torch.Tensor]   # cos, sin (max_len, head_dim) fp32: rotary(arange(max_len)), made once

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
            rope=rotary(torch.arange(max_len, device=device), config.head_dim, config.rope_theta),
        )

    def row(self, index: int) -> "KVCache":
        """One sequence's cache: row `index` of every layer's keys and values (views), for its prefill."""
        return KVCache([k[index:index + 1] for k in self.keys], [v[index:index + 1] for v in self.values], self.rope)

    @staticmethod
    def nbytes(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        per_layer = 2 * batch * config.num_kv_heads * max_len * config.head_dim
        return config.num_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def own_routing(layer: int, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The default router of every MoE layer: `route` on the layer's own gate logits."""
    return route(logits, top_k, renormalize)


def expert_outputs(expert_format: ExpertFormat, batch: ExpertBatch, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """x (T, hidden) -> (pairs of the batch, hidden): each (token, choice) pair's token through the expert in its
    slot. Decode: the format's grouped kernels, one launch per matrix for every pair, reading the slots on the
    device (one expert's pairs too, so that a product is the same whichever batch brought it). Otherwise each
    expert in turn over all of its rows (prefill: dequantize and cuBLAS)."""
    if expert_format.runs_grouped(x, top_k):
        if batch.pairs is None:
            return expert_format.grouped_swiglu(batch, x, top_k)
        one_slot = torch.full_like(batch.pairs, batch.host_slots[0], dtype=torch.int32)
        return expert_format.grouped_swiglu(batch._replace(slots=one_slot), x[batch.pairs // top_k], 1)
    slots = batch.host_slots if batch.host_slots is not None else batch.slots.tolist()
    count = Counter(slots)
    # the batch's pairs grouped by slot, ascending within a slot
    order = torch.argsort(batch.slots, stable=True) if len(count) > 1 else torch.arange(len(slots), device=x.device)
    pairs = order if batch.pairs is None else batch.pairs[order]
    out = x.new_empty(len(slots), x.shape[-1])
    start = 0
    for slot in sorted(count):
        chosen = slice(start, start + count[slot])
        out[order[chosen]] = swiglu(batch.experts[slot], x[pairs[chosen] // top_k])
        start += count[slot]
    return out


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, provider: ExpertProvider, router=own_routing):
        # router(layer, logits (T, E), top_k, renormalize) -> (weights, ids); benchmarks replace it
        # to replay recorded routing (bench/routing.py); everything else keeps `own_routing`.
        self.config = config
        self.weights = weights
        self.provider = provider
        self.router = router

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, start_pos: int | torch.Tensor,
                 rows: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens (batch, T) at positions start_pos.. in cache rows 0..batch-1 -> logits (batch, T or 1, vocab),
        fp32. Or decode: tokens (n, 1), start_pos int64 (n,) on the device (each row's position) and `rows` int64
        (n,) (each row's KV cache row), with no read back to the host."""
        cfg, w = self.config, self.weights
        batch, length = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            if length != 1 or rows is None:
                raise ValueError(f"device-side positions decode one token a row, in given cache rows; got {length}")
            positions, rope, mask = start_pos, cache.rope, None      # the kernels look each row's position up
        else:
            if start_pos + length > cache.max_len:
                raise ValueError(f"positions up to {start_pos + length} exceed the KV cache of {cache.max_len}")
            positions = torch.arange(start_pos, start_pos + length, device=tokens.device)
            rope = cache.rope[0][positions], cache.rope[1][positions]
            mask = self._attention_mask(positions, start_pos + length)
        h = w.embed[tokens]
        with sdpa_kernel(ATTENTION_BACKENDS):
            for index, layer in enumerate(w.layers):
                x = rms_norm(h, layer.attn_norm, cfg.rms_norm_eps)
                h = h + self._attention(index, layer, x, cache, start_pos, positions, rows, rope, mask)
                h = h + self._mlp(index, layer, h)
        if last_only:
            h = h[:, -1:]
        return linear(rms_norm(h, w.norm, cfg.rms_norm_eps), w.lm_head).float()

    def _attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor | None:
        """(T, kv_len) booleans: query at position p sees keys at p - window < j <= p.
        None when one query sees every key (decode inside the window): no mask, the fastest kernels."""
        window = self.config.sliding_window
        if len(positions) == 1 and (not window or kv_len <= window):
            return None
        keys = torch.arange(kv_len, device=positions.device)
        visible = keys[None, :] <= positions[:, None]
        if window:
            visible &= keys[None, :] > positions[:, None] - window
        return visible

    def _attention(self, index, layer: LayerWeights, x, cache: KVCache, start_pos, positions, rows, rope, mask):
        """rope: cos and sin of `positions` (T, head_dim), or with a device-side position the whole tables."""
        cfg, a = self.config, layer.attn
        batch, length, _ = x.shape
        q, k, v = linear(x, a.wq, a.bq), linear(x, a.wk, a.bk), linear(x, a.wv, a.bv)
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, a.q_norm, cfg.rms_norm_eps), rms_norm(k, a.k_norm, cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.view(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = rms_norm(q, a.q_norm, cfg.rms_norm_eps), rms_norm(k, a.k_norm, cfg.rms_norm_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, T, head_dim)
        if isinstance(start_pos, torch.Tensor):
            keys, values = cache.keys[index], cache.values[index]
            q = ops.rotate_and_cache(q, k, v, rope, positions, rows, keys, values)
            out = ops.decode_attention(q, keys, values, positions, rows, cfg.sliding_window)
        else:
            keys, values = cache.keys[index][:batch], cache.values[index][:batch]
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            end = start_pos + length
            keys[:, :, start_pos:end], values[:, :, start_pos:end] = k, v
            pieces = []
            for first in range(0, length, ATTENTION_CHUNK):
                last = min(first + ATTENTION_CHUNK, length)
                visible = start_pos + last           # queries see no key past their own position
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, first:last], keys[:, :, :visible], values[:, :, :visible],
                    attn_mask=None if mask is None else mask[first:last, :visible],
                    enable_gqa=cfg.num_heads != cfg.num_kv_heads))
            out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        out = out.transpose(1, 2).reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return linear(out, a.wo, a.bo)

    def _mlp(self, index, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, layer.mlp_norm, self.config.rms_norm_eps)
        if layer.dense_mlp is not None:
            return swiglu(layer.dense_mlp, x)
        shape = x.shape
        x, residual = x.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])
        y = self._routed_experts(index, layer, x, residual)
        if layer.shared_expert is not None:
            y = y + torch.sigmoid(linear(x, layer.shared_expert_gate)) * swiglu(layer.shared_expert, x)
        return y.view(shape)

    def _routed_experts(self, index, layer: LayerWeights, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> weighted sum of each token's top-k experts, (T, hidden).

        Each (token, choice) pair has its own row of `picked`, and the rows are summed in choice order at the
        end: the result does not depend on which batch an expert came in, nor on the order of the batches.
        """
        top_k = self.config.top_k
        weights, ids = self.router(index, linear(x, layer.router), top_k, self.config.norm_topk_prob)
        picked = None
        for batch in self.provider.experts(index, ids, residual):
            outputs = expert_outputs(self.provider.expert_format, batch, x, top_k)
            if batch.pairs is None:
                picked = outputs
                continue
            if picked is None:
                picked = x.new_empty(ids.numel(), x.shape[-1])
            picked[batch.pairs] = outputs
        return ops.combine(picked, weights)
