"""The math of a decoder-only MoE transformer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Phi-3.5-MoE, GLM-4.5,
DeepSeek-V2/V3, gpt-oss), and nothing else.

    model = Transformer(config, weights, provider)
    cache = KVCache.allocate(config, batch=1, max_len=4096, device=..., dtype=...)
    logits = model(tokens, cache, start_pos=0)       # tokens: (batch, T) -> logits (batch, T, vocab)
    logits = model(tokens, cache, positions, rows)   # decode: tokens (n, 1); positions, cache rows: int64 (n,) on the device

Family differences are plain fields of `ModelConfig` (q/k norms, qkv bias and clipping, shared
experts, dense layers, norms, rotary scaling, routing functions, latent attention, attention sinks,
per-layer windows, expert biases and activation). Routed experts come from an `ExpertProvider` (see
experts.py); every other weight is held here. A weight is a tensor (out, in) or a quantized object
with `.linear(x)`.

With `start_pos` a device tensor, a forward decodes one token per row without reading anything back to
the host: each row's position and KV cache row come from device tensors, which RoPE, the KV write and
attention's length read on the device, so the same work can be captured once as CUDA graphs and replayed
for every token and every placement of sequences in the cache (step.py).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ops
from .ops import apply_rotary, rms_norm, route
from .config import ModelConfig, RopeScaling
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


def clamped_swiglu(mlp: Expert, x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert: gate at most `limit`, up within +-limit, (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = linear(x, mlp.w1).clamp(max=limit)
    up = linear(x, mlp.w3).clamp(-limit, limit)
    return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), mlp.w2)


def rotary(positions: torch.Tensor, head_dim: int, theta: float,
           scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` (T,), each (T, head_dim), half-split layout (rotate_half); `scaling` as
    config.RopeScaling describes it (longrope: each position with the factors of its side of the boundary).
    Frequencies are computed as transformers computes them, in the same order: far positions amplify their rounding."""
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    if scaling is None:
        return _cos_sin(positions, 1.0 / wavelengths, 1.0)
    if scaling.kind == "yarn":
        return _cos_sin(positions, _yarn_frequencies(wavelengths, head_dim, theta, scaling), scaling.attention_factor)
    factors = wavelengths.new_tensor(scaling.short_factor), wavelengths.new_tensor(scaling.long_factor)
    short = _cos_sin(positions, 1.0 / (factors[0] * wavelengths), scaling.short_mscale)
    long = _cos_sin(positions, 1.0 / (factors[1] * wavelengths), scaling.long_mscale)
    beyond = (positions >= scaling.original_max_position)[:, None]
    return torch.where(beyond, long[0], short[0]), torch.where(beyond, long[1], short[1])


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def _yarn_frequencies(wavelengths: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN: frequencies that turn more than beta_fast times over the pretraining length are kept, those that turn
    less than beta_slow times are divided by the factor, and the ones between blend linearly."""
    def turns_to_dim(turns):
        return dim * math.log(s.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_to_dim(s.beta_fast), turns_to_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=wavelengths.device) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)
    kept = 1 - ramp
    return 1.0 / (s.factor * wavelengths) * (1 - kept) + 1.0 / wavelengths * kept


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
    # latent attention (config.kv_lora_rank): wq is q_proj, or q_b_proj after wq_a and q_a_norm; wk and wv are None
    wq_a: object = None                 # (q_lora_rank, hidden)
    q_a_norm: torch.Tensor | None = None
    wkv_a: object = None                # (kv_lora_rank + rope, hidden): the latent and the shared rope key
    kv_a_norm: torch.Tensor | None = None
    wkv_b: torch.Tensor | None = None   # (heads * (nope + v_head_dim), kv_lora_rank): keys' nope part and values
    sinks: torch.Tensor | None = None   # (heads,): config.attention_sinks


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    attn: AttentionWeights
    mlp_norm: torch.Tensor
    router: torch.Tensor | None = None         # (num_experts, hidden); None in dense layers
    dense_mlp: Expert | None = None            # dense layers only
    shared_expert: Expert | None = None        # qwen2_moe, glm4_moe
    shared_expert_gate: torch.Tensor | None = None  # (1, hidden); None: the shared expert is not gated
    attn_norm_bias: torch.Tensor | None = None      # LayerNorm's (config.norm "layer")
    mlp_norm_bias: torch.Tensor | None = None
    score_correction: torch.Tensor | None = None    # (num_experts,) fp32, config.score_correction_bias
    router_bias: torch.Tensor | None = None         # (num_experts,)


@dataclass
class ModelWeights:
    embed: torch.Tensor      # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: object          # (vocab, hidden)
    norm_bias: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None


@dataclass
class KVCache:
    keys: list[torch.Tensor]    # per layer: (batch, kv_heads, max_len, head_dim)
    values: list[torch.Tensor]
    rope: tuple[torch.Tensor, torch.Tensor]   # cos, sin (max_len, rotary_dim) fp32: rotary(arange(max_len)), made once

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        rope = rotary(torch.arange(max_len, device=device), config.rotary_dim, config.rope_theta, config.rope_scaling)
        if config.kv_lora_rank:
            # latent attention: per layer ONE (batch, 1, max_len, kv_lora_rank + rope) tensor, each token's latent and
            # its rotated rope key (the same for every head); `values` view the latent part
            shape = (batch, 1, max_len, config.kv_lora_rank + config.rotary_dim)
            keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
            return cls(keys=keys, values=[k[..., :config.kv_lora_rank] for k in keys], rope=rope)
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)],
            rope=rope,
        )

    def row(self, index: int) -> "KVCache":
        """One sequence's cache: row `index` of every layer's keys and values (views), for its prefill."""
        return KVCache([k[index:index + 1] for k in self.keys], [v[index:index + 1] for v in self.values], self.rope)

    @staticmethod
    def nbytes(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        if config.kv_lora_rank:
            per_layer = batch * max_len * (config.kv_lora_rank + config.rotary_dim)
        else:
            per_layer = 2 * batch * config.num_kv_heads * max_len * config.head_dim
        return config.num_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def own_routing(layer: int, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing on the layer's own gate logits (config.routing "softmax"), for callers without a model."""
    return route(logits, top_k, renormalize)


def expert_outputs(expert_format: ExpertFormat, batch: ExpertBatch, x: torch.Tensor, top_k: int,
                   mlp=swiglu) -> torch.Tensor:
    """x (T, hidden) -> (pairs of the batch, hidden): each (token, choice) pair's token through the expert in its
    slot, or the product the batch brings for it (`batch.computed`)."""
    computed = batch.computed
    if computed is not None and computed.mask is None:
        return computed.rows
    out = slot_outputs(expert_format, batch, x, top_k, mlp)
    return out if computed is None else torch.where(computed.mask[:, None], computed.rows, out)


def slot_outputs(expert_format: ExpertFormat, batch: ExpertBatch, x: torch.Tensor, top_k: int, mlp) -> torch.Tensor:
    """Each pair of the batch through the expert in its slot. Decode: the format's grouped kernels, one launch per
    matrix for every pair, reading the slots on the device (one expert's pairs too, so that a product is the same
    whichever batch brought it). Otherwise each expert in turn over all of its rows (prefill: dequantize and
    cuBLAS), through `mlp(expert, x)`."""
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
        out[order[chosen]] = mlp(batch.experts[slot], x[pairs[chosen] // top_k])
        start += count[slot]
    return out


def visible_keys(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(T, kv_len) booleans, on the positions' device: query at position p sees keys at p - window < j <= p."""
    keys = torch.arange(kv_len, device=positions.device)
    visible = keys[None, :] <= positions[:, None]
    if window:
        visible &= keys[None, :] > positions[:, None] - window
    return visible


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, provider: ExpertProvider, router=None, pairs=None):
        # router(layer, logits (T, E), top_k, renormalize) -> (weights, ids); benchmarks replace it
        # to replay recorded routing (bench/routing.py); everything else keeps the config's (`route`).
        # pairs(layer, ids, x, residual) -> each (token, choice) pair's expert output; training replaces it
        # to stream the experts again in backward (train.py); everything else keeps `pair_outputs`.
        self.config = config
        self.weights = weights
        self.provider = provider
        self.router = router or self.route
        self.pairs = pairs or self.pair_outputs
        self.expert_mlp = (partial(clamped_swiglu, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
                           if config.swiglu_limit else swiglu)

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
            mask = self._attention_mask(positions, start_pos + length, cfg.sliding_window)
        h = w.embed[tokens]
        with sdpa_kernel(ATTENTION_BACKENDS):
            for index in range(len(w.layers)):
                h = self.layer(index, h, cache, start_pos, positions, rows, rope, mask)
        return self.head(h[:, -1:] if last_only else h)

    def layer(self, index: int, h: torch.Tensor, cache: KVCache, start_pos, positions, rows, rope, mask) -> torch.Tensor:
        """The residual stream h (batch, T, hidden) through decoder layer `index`."""
        layer = self.weights.layers[index]
        x = self._norm(h, layer.attn_norm, layer.attn_norm_bias)
        h = h + self._attention(index, layer, x, cache, start_pos, positions, rows, rope, mask)
        return h + self._mlp(index, layer, h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and lm_head: h (batch, T, hidden) -> fp32 logits (batch, T, vocab)."""
        w = self.weights
        return linear(self._norm(h, w.norm, w.norm_bias), w.lm_head, w.lm_head_bias).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.config.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.config.rms_norm_eps)
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def route(self, layer: int, logits: torch.Tensor, top_k: int,
              renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The config's routing of a MoE layer's gate logits (T, E) -> fp32 weights and int64 ids (T, top_k)."""
        cfg = self.config
        if cfg.routing == "sparsemixer":
            weights, ids = ops.route_sparsemixer(logits, cfg.router_jitter)
        elif cfg.routing in ("sigmoid_groups", "softmax_groups"):
            weights, ids = ops.route_grouped(logits, top_k, cfg.n_group, cfg.topk_group, renormalize,
                                             self.weights.layers[layer].score_correction,
                                             sigmoid=cfg.routing == "sigmoid_groups")
        else:
            weights, ids = route(logits, top_k, renormalize)
        return (weights if cfg.routed_scaling_factor == 1 else weights * cfg.routed_scaling_factor), ids

    @staticmethod
    def _attention_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor | None:
        """(T, kv_len) booleans: query at position p sees keys at p - window < j <= p.
        None when one query sees every key (decode inside the window): no mask, the fastest kernels."""
        if len(positions) == 1 and (not window or kv_len <= window):
            return None
        return visible_keys(positions, kv_len, window)

    def _attention(self, index, layer: LayerWeights, x, cache: KVCache, start_pos, positions, rows, rope, mask):
        """rope: cos and sin of `positions` (T, head_dim), or with a device-side position the whole tables."""
        cfg, a = self.config, layer.attn
        if cfg.kv_lora_rank:
            return self._latent_attention(index, layer, x, cache, start_pos, positions, rows, rope, mask)
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
        window = cfg.window(index)
        if isinstance(start_pos, torch.Tensor):
            keys, values = cache.keys[index], cache.values[index]
            q = ops.rotate_and_cache(q, k, v, rope, positions, rows, keys, values)
            if a.sinks is not None:    # over each row's whole cache, what its token sees masked on the device
                visible = visible_keys(positions, cache.max_len, window)[:, None, None, :]
                out = ops.sink_attention(q, keys[rows], values[rows], visible, a.sinks)
            else:
                out = ops.decode_attention(q, keys, values, positions, rows, window)
        else:
            keys, values = cache.keys[index][:batch], cache.values[index][:batch]
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            end = start_pos + length
            keys[:, :, start_pos:end], values[:, :, start_pos:end] = k, v
            if window != cfg.sliding_window:     # this layer's window is not the forward's (gpt-oss: every other)
                mask = self._attention_mask(positions, end, window)
            pieces = []
            for first in range(0, length, ATTENTION_CHUNK):
                last = min(first + ATTENTION_CHUNK, length)
                visible = start_pos + last           # queries see no key past their own position
                if a.sinks is not None:
                    pieces.append(ops.sink_attention(q[:, :, first:last], keys[:, :, :visible], values[:, :, :visible],
                                                     None if mask is None else mask[first:last, :visible], a.sinks))
                    continue
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, first:last], keys[:, :, :visible], values[:, :, :visible],
                    attn_mask=None if mask is None else mask[first:last, :visible],
                    enable_gqa=cfg.num_heads != cfg.num_kv_heads))
            out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        out = out.transpose(1, 2).reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return linear(out, a.wo, a.bo)

    def _latent_attention(self, index, layer: LayerWeights, x, cache: KVCache, start_pos, positions, rows, rope, mask):
        """Multi-head latent attention (DeepSeek-V2/V3) with the up-projection absorbed: each head's query is mapped
        into the latent space (q_nope W_uk), attends over the cached latents and rope keys as one shared key/value
        head, and the weighted latent is mapped out per head (W_uv). The cache never holds per-head keys or values.
        With a device-side position the query attends over the whole cache under a mask built on the device."""
        cfg, a = self.config, layer.attn
        batch, length, _ = x.shape
        rank, rope_dim = cfg.kv_lora_rank, cfg.rotary_dim
        nope = cfg.head_dim - rope_dim
        queries = x if a.wq_a is None else rms_norm(linear(x, a.wq_a), a.q_a_norm, cfg.rms_norm_eps)   # bottleneck
        q = linear(queries, a.wq)
        q_nope, q_rope = q.view(batch, length, cfg.num_heads, cfg.head_dim).transpose(1, 2).split([nope, rope_dim], -1)
        latent, k_rope = linear(x, a.wkv_a).split([rank, rope_dim], -1)
        latent, k_rope = rms_norm(latent, a.kv_a_norm, cfg.rms_norm_eps).unsqueeze(1), k_rope.unsqueeze(1)
        if cfg.rope_interleave:      # pairs (0, 1), (2, 3), ...: the evens and odds as the two halves
            q_rope, k_rope = (torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1) for t in (q_rope, k_rope))
        w_uk, w_uv = a.wkv_b.view(cfg.num_heads, nope + cfg.v_head_dim, rank).split([nope, cfg.v_head_dim], dim=1)
        if isinstance(start_pos, torch.Tensor):    # one token a row, in cache rows `rows`
            cos, sin = rope[0][positions][:, None, None], rope[1][positions][:, None, None]
            q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
            cache.keys[index][rows, :, positions] = torch.cat([latent, k_rope], dim=-1)[:, :, 0]
            cached = cache.keys[index][rows]                  # (n, 1, max_len, rank + rope_dim)
            mask, visible = visible_keys(positions, cache.max_len, None)[:, None, None, :], cache.max_len
        else:
            cached = cache.keys[index][:batch]                # (batch, 1, max_len, rank + rope_dim)
            q_rope, k_rope = apply_rotary(q_rope, *rope), apply_rotary(k_rope, *rope)
            cached[:, :, start_pos:start_pos + length] = torch.cat([latent, k_rope], dim=-1)
            visible = start_pos + length
        query = torch.cat([torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        first = None if isinstance(start_pos, torch.Tensor) else start_pos
        out = self._chunked_attention(query, cached[:, :, :visible], cached[:, :, :visible, :rank], first, mask,
                                      cfg.attention_scale)
        out = torch.einsum("bhtr,hvr->bhtv", out, w_uv)
        return linear(out.transpose(1, 2).reshape(batch, length, cfg.num_heads * cfg.v_head_dim), a.wo, a.bo)

    @staticmethod
    def _chunked_attention(q, keys, values, start_pos: int | None, mask, scale: float) -> torch.Tensor:
        """SDPA of queries at start_pos.. over keys, ATTENTION_CHUNK queries at a time, each seeing no key past its
        own position; mask (T, keys) or None (every key visible). start_pos None (decode): the mask alone decides,
        as it is (it may hold one row a sequence: (n, 1, 1, keys))."""
        length = q.shape[2]
        pieces = []
        for first in range(0, length, ATTENTION_CHUNK):
            last = min(first + ATTENTION_CHUNK, length)
            visible = keys.shape[2] if start_pos is None else start_pos + last
            pieces.append(F.scaled_dot_product_attention(
                q[:, :, first:last], keys[:, :, :visible], values[:, :, :visible],
                attn_mask=mask if mask is None or start_pos is None else mask[first:last, :visible], scale=scale or None,
                enable_gqa=q.shape[1] != keys.shape[1]))
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    def _mlp(self, index, layer: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        x = self._norm(h, layer.mlp_norm, layer.mlp_norm_bias)
        if layer.dense_mlp is not None:
            return swiglu(layer.dense_mlp, x)
        shape = x.shape
        x, residual = x.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])
        y = self._routed_experts(index, layer, x, residual)
        if layer.shared_expert is not None:
            shared = swiglu(layer.shared_expert, x)
            y = y + (shared if layer.shared_expert_gate is None else torch.sigmoid(linear(x, layer.shared_expert_gate)) * shared)
        return y.view(shape)

    def _routed_experts(self, index, layer: LayerWeights, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) -> weighted sum of each token's top-k experts, (T, hidden).

        Each (token, choice) pair has its own row of `picked`, and the rows are summed in choice order at the
        end: the result does not depend on which batch an expert came in, nor on the order of the batches.
        """
        weights, ids = self.router(index, linear(x, layer.router, layer.router_bias), self.config.top_k,
                                   self.config.norm_topk_prob)
        return ops.combine(self.pairs(index, ids, x, residual), weights)

    def pair_outputs(self, index: int, ids: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """ids (T, top_k) -> (T * top_k, hidden): each (token, choice) pair's token x through its expert, in whatever
        batches the provider brings them."""
        top_k = ids.shape[-1]
        picked = None
        for batch in self.provider.experts(index, ids, residual, x):
            outputs = expert_outputs(self.provider.expert_format, batch, x, top_k, self.expert_mlp)
            if batch.pairs is None:
                picked = outputs
                continue
            if picked is None:
                picked = x.new_empty(ids.numel(), x.shape[-1])
            picked[batch.pairs] = outputs
        return picked
