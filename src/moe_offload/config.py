"""Configuration: frozen dataclasses, each default declared once.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))

`ModelConfig` is read from a Hugging Face `config.json`; the differences between MoE families
(key names, q/k norms, shared experts, dense layers) are resolved here, once, so that `model.py`
reads plain fields and never asks which family it is running.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "glm4_moe", "deepseek_v3",
                         "deepseek_v2", "gpt_oss")
ROPE_TYPES = ("default", "yarn", "longrope")


class ConfigError(UserError):
    """A config.json we cannot run; the message names the field and what to change."""


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling of a long-context checkpoint (config.json's `rope_scaling` or `rope_parameters`).

    yarn: each frequency blends its interpolated (divided by `factor`) and original value by how many turns it
    makes over `original_max_position`; cos and sin are scaled by `attention_factor`. longrope: each frequency is
    divided by its own factor, `short_factor` for positions before `original_max_position` and `long_factor` from
    there on, and cos and sin scaled by `short_mscale` or `long_mscale`."""

    kind: str                              # "yarn" | "longrope"
    original_max_position: int
    factor: float = 1.0
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True                  # yarn: round the blended range out to whole dimensions
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    short_mscale: float = 1.0
    long_mscale: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expert_ffn: int            # hidden width of one routed expert
    num_experts: int
    top_k: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None
    norm_topk_prob: bool = True            # renormalise the top-k router weights to sum to 1
    dense_ffn: int = 0                     # width of the MLP in dense (non-MoE) layers
    dense_layers: tuple[int, ...] = ()     # layers with a dense MLP instead of experts
    shared_expert_ffn: int = 0             # qwen2_moe: an always-on expert gated by a sigmoid
    qkv_bias: bool = False
    o_bias: bool = False                   # a bias on the attention output projection too
    qk_norm: str = "none"                  # "none" | "head" (per head, qwen3) | "full" (whole projection, olmoe)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    norm: str = "rms"                      # "rms" | "layer" (LayerNorm with a bias: phimoe)
    lm_head_bias: bool = False
    rope_dim: int = 0                      # rotated dimensions at the start of each head; 0: all of head_dim
    rope_scaling: RopeScaling | None = None
    shared_expert_gated: bool = False      # qwen2_moe: the shared expert's output scaled by sigmoid(gate(x))
    routing: str = "softmax"               # "softmax": top-k of softmax; "sparsemixer" (phimoe); "sigmoid_groups"
                                           # (glm4_moe, deepseek_v3) or "softmax_groups" (deepseek_v2): group-limited
                                           # top-k of sigmoid or softmax scores (see ops.route_grouped)
    n_group: int = 1                       # groups of experts, of which each token's top-k come from `topk_group`
    topk_group: int = 1
    score_correction_bias: bool = False    # a learned bias added to the scores when choosing (not when weighting)
    routed_scaling_factor: float = 1.0     # the routed experts' weights are multiplied by it
    router_jitter: float = 0.0             # sparsemixer: experts within 2 x this relative distance of the best mix
    # Multi-head latent attention (deepseek): queries through a rank-q_lora_rank bottleneck (0: one projection), keys
    # and values expanded per head from a rank-kv_lora_rank latent, which is what the KV cache holds (with the rope key)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0                  # 0: not latent attention
    v_head_dim: int = 0                    # latent attention's value width; head_dim: the query/key width (nope + rope)
    rope_interleave: bool = False          # rotary pairs are adjacent dimensions (deepseek), not the two halves
    attention_scale: float = 0.0           # the softmax scale of q.k; 0: 1/sqrt(head_dim)
    sliding_layers: tuple[int, ...] | None = None   # layers that use sliding_window; None: every layer
    attention_sinks: bool = False          # gpt-oss: a learned logit per head joins each softmax, taking weight
    router_bias: bool = False
    expert_bias: bool = False              # biases on w1, w2 and w3 of every routed expert
    # gpt-oss's experts: gate clamped to at most swiglu_limit, up to +-swiglu_limit, then
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate); swiglu_limit 0: plain SwiGLU
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer's attention; None: it sees every earlier key."""
        return self.sliding_window if self.sliding_layers is None or layer in self.sliding_layers else None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden = _require(hf, "hidden_size")
        heads = _require(hf, "num_attention_heads")
        num_layers = _require(hf, "num_hidden_layers")
        common = dict(
            model_type=model_type,
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            top_k=_require(hf, "num_experts_per_tok"),
        )
        if model_type == "mixtral":
            return cls(
                **common,
                expert_ffn=_require(hf, "intermediate_size"),
                num_experts=_num_experts(hf),
                sliding_window=hf.get("sliding_window"),
            )
        if model_type == "phimoe":
            if common["top_k"] != 2:
                raise ConfigError(f"config.json: num_experts_per_tok is {common['top_k']}, but phimoe's sparsemixer "
                                  f"routes every token to exactly 2 experts")
            return cls(
                **common,
                expert_ffn=_require(hf, "intermediate_size"),
                num_experts=_num_experts(hf),
                sliding_window=hf.get("sliding_window"),
                norm="layer",
                qkv_bias=bool(hf.get("attention_bias", False)),
                o_bias=bool(hf.get("attention_bias", False)),
                lm_head_bias=bool(hf.get("lm_head_bias", False)),
                routing="sparsemixer",
                router_jitter=hf.get("router_jitter_noise", 0.01),
            )
        if model_type == "glm4_moe":
            head_dim = common["head_dim"]
            return cls(
                **common,
                expert_ffn=_require(hf, "moe_intermediate_size"),
                num_experts=_require(hf, "n_routed_experts"),
                dense_ffn=_require(hf, "intermediate_size"),
                dense_layers=tuple(range(min(hf.get("first_k_dense_replace", 1), num_layers))),
                shared_expert_ffn=hf["moe_intermediate_size"] * (hf.get("n_shared_experts", 1) or 0),
                qkv_bias=bool(hf.get("attention_bias", False)),
                qk_norm="head" if hf.get("use_qk_norm") else "none",
                rope_dim=int(head_dim * _partial_rotary_factor(hf, default=0.5)),
                **_grouped_routing(hf, "sigmoid_groups", correction=True, renormalize=True),
            )
        if model_type == "gpt_oss":
            layer_types = hf.get("layer_types") or ["sliding_attention", "full_attention"] * (num_layers // 2 + 1)
            return cls(
                **common,
                expert_ffn=_require(hf, "intermediate_size"),
                num_experts=_num_experts(hf),
                sliding_window=hf.get("sliding_window"),
                sliding_layers=tuple(i for i in range(num_layers) if layer_types[i] == "sliding_attention"),
                qkv_bias=bool(hf.get("attention_bias", True)),
                o_bias=bool(hf.get("attention_bias", True)),
                attention_sinks=True,
                router_bias=True,
                expert_bias=True,
                swiglu_limit=hf.get("swiglu_limit", 7.0),
                swiglu_alpha=hf.get("swiglu_alpha", cls.swiglu_alpha),
            )
        if model_type in ("deepseek_v3", "deepseek_v2"):
            return cls(**{**common, **_deepseek(hf, model_type, num_layers)})
        if hf.get("use_sliding_window"):
            raise ConfigError(f"config.json: use_sliding_window is not supported for {model_type}; set it to false")
        if model_type == "olmoe":
            return cls(
                **common,
                expert_ffn=_require(hf, "intermediate_size"),
                num_experts=_num_experts(hf),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                qkv_bias=bool(hf.get("attention_bias", False)),
                o_bias=bool(hf.get("attention_bias", False)),
                qk_norm="full",
                clip_qkv=hf.get("clip_qkv"),
            )
        # qwen2_moe and qwen3_moe
        step = hf.get("decoder_sparse_step", 1) or 1
        only_mlp = set(hf.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0)
        return cls(
            **common,
            expert_ffn=_require(hf, "moe_intermediate_size"),
            num_experts=_num_experts(hf),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            dense_ffn=hf.get("intermediate_size", 0),
            dense_layers=dense,
            shared_expert_ffn=hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0,
            shared_expert_gated=model_type == "qwen2_moe",
            # qwen2_moe: `qkv_bias` (default true) biases q, k, v; qwen3_moe: `attention_bias` biases q, k, v and o
            qkv_bias=bool(hf.get("qkv_bias", True)) if model_type == "qwen2_moe" else bool(hf.get("attention_bias", False)),
            o_bias=model_type == "qwen3_moe" and bool(hf.get("attention_bias", False)),
            qk_norm="head" if model_type == "qwen3_moe" else "none",
        )


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json: required field {key!r} is missing")
    return hf[key]


def _num_experts(hf: dict) -> int:
    # The hub's Qwen and OLMoE configs write num_experts, Mixtral's and transformers 5's Qwen3 num_local_experts.
    return _require(hf, "num_experts" if "num_experts" in hf else "num_local_experts")


def _rope_parameters(hf: dict) -> dict:
    """The rotary settings wherever the file keeps them: transformers 5 writes `rope_parameters` (theta and
    partial factor inside), the hub's files `rope_scaling` beside a top-level `rope_theta`."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_type(params: dict) -> str:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return rope_type


def _rope_theta(hf: dict) -> float:
    return float(_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10000.0)))


def _partial_rotary_factor(hf: dict, default: float) -> float:
    return float(_rope_parameters(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", default)))


def _rope_scaling(hf: dict) -> RopeScaling | None:
    """yarn and longrope settings resolved as transformers resolves them (modeling_rope_utils)."""
    params = _rope_parameters(hf)
    kind = _rope_type(params)
    if kind == "default":
        return None
    max_position = hf.get("max_position_embeddings", 4096)
    # Phi-3 style files keep the pretraining length beside rope_scaling too, and that one wins (as in transformers)
    original = (hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                or max_position)
    if kind == "longrope":
        return RopeScaling(kind, original, short_factor=tuple(_require(params, "short_factor")),
                           long_factor=tuple(_require(params, "long_factor")),
                           short_mscale=params.get("short_mscale", RopeScaling.short_mscale),
                           long_mscale=params.get("long_mscale", RopeScaling.long_mscale))
    factor = params.get("factor") or max_position / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return RopeScaling(kind, original, factor=factor, attention_factor=attention_factor,
                       beta_fast=params.get("beta_fast") or RopeScaling.beta_fast,
                       beta_slow=params.get("beta_slow") or RopeScaling.beta_slow,
                       truncate=params.get("truncate", RopeScaling.truncate))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 mscale ln(factor) + 1 (1 for no scaling)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _deepseek(hf: dict, model_type: str, num_layers: int) -> dict:
    """DeepSeek-V3 and -V2: latent attention, shared experts, dense first layers; V3 routes by sigmoid scores with
    the correction bias in groups and renormalises, V2 by softmax (greedy, or in groups), never renormalised."""
    if hf.get("attention_bias"):
        raise ConfigError(f"config.json: attention_bias true is not supported for {model_type}")
    nope, rope = _require(hf, "qk_nope_head_dim"), _require(hf, "qk_rope_head_dim")
    scale = (nope + rope) ** -0.5
    params = _rope_parameters(hf)
    if _rope_type(params) == "yarn" and params.get("mscale_all_dim"):
        # DeepSeek scales every q.k, not only the rotary part, by YaRN's temperature squared (transformers:
        # yarn_apply_mscale)
        scale *= yarn_mscale(_rope_scaling(hf).factor, params["mscale_all_dim"]) ** 2
    if model_type == "deepseek_v3":
        routing = _grouped_routing(hf, "sigmoid_groups", correction=True, renormalize=True)
    elif hf.get("topk_method", "greedy") == "group_limited_greedy":
        routing = _grouped_routing(hf, "softmax_groups", correction=False, renormalize=False)
    else:
        routing = dict(routing="softmax", norm_topk_prob=False,
                       routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    return dict(
        head_dim=nope + rope,
        num_kv_heads=hf["num_attention_heads"],
        expert_ffn=_require(hf, "moe_intermediate_size"),
        num_experts=_require(hf, "n_routed_experts"),
        dense_ffn=_require(hf, "intermediate_size"),
        dense_layers=tuple(range(min(hf.get("first_k_dense_replace") or 0, num_layers))),
        shared_expert_ffn=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
        rope_dim=rope,
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=_require(hf, "kv_lora_rank"),
        v_head_dim=_require(hf, "v_head_dim"),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        attention_scale=scale,
        **routing,
    )


def _grouped_routing(hf: dict, routing: str, correction: bool, renormalize: bool) -> dict:
    experts = hf.get("n_routed_experts")
    groups = hf.get("n_group") or 1
    if experts % groups:
        raise ConfigError(f"config.json: n_routed_experts {experts} is not a multiple of n_group {groups}")
    return dict(routing=routing, n_group=groups, topk_group=hf.get("topk_group") or 1,
                score_correction_bias=correction, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=renormalize and bool(hf.get("norm_topk_prob", True)))


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token (temperature 0 means greedy), and what to report of the distributions.

    Log-probabilities are of the model's own distribution, log_softmax(logits), before temperature
    and any other setting here changes it (as vLLM reports them by default)."""

    max_new_tokens: int = 128   # 0: prefill only (for prompt_logprobs)
    temperature: float = 0.0
    top_k: int = 0              # 0: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0          # drop tokens less likely than min_p x the likeliest one; 0: off
    repetition_penalty: float = 1.0   # CTRL's, as transformers: logits of prompt and output tokens / it (x it if < 0)
    presence_penalty: float = 0.0     # OpenAI's: subtracted from the logit of each token already in the output
    frequency_penalty: float = 0.0    # OpenAI's: subtracted once per time the token is in the output
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None          # each new token's log-probability and this many likeliest alternatives
    prompt_logprobs: int | None = None   # the same for every prompt token after the first
    grammar: str | None = None           # only tokens that keep the text in this grammar (constrain.py's text)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.temperature < math.inf:     # also refuses nan
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def picks_on_host(self) -> bool:
        """Whether each token is picked by `generate.sample` on the host; else greedily on the device (a grammar's
        mask applied there)."""
        return self.temperature != 0 or self.penalized


DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs. "auto": cuda when available, bf16 there and fp32 on the CPU."""

    model: Path = DEFAULT_MODEL_DIR
    device: str = "auto"
    dtype: str = "auto"
    max_context: int = 4096      # KV cache length; capped by the model's max_position_embeddings
    max_batch: int = 1           # sequences decoded together (the server's continuous batching): KV cache rows
    quant: "QuantConfig | None" = None   # HQQ quantization on load (quant/); None: the checkpoint's own weights
    lora: Path | None = None     # a PEFT LoRA adapter folder applied on load (lora.py); None: the base model


@dataclass(frozen=True)
class OffloadConfig:
    """Expert offloading (offload/): experts in host RAM or on disk, an LRU cache of expert slots on
    the compute device, speculative prefetch. Sizes are bytes; offload/planner.py turns them into a plan."""

    enabled: bool = False
    gpu_memory: int | None = None        # all that lives on the compute device; None: its free memory at start
    cpu_memory: int | None = None        # host RAM for experts; None: all of them; the rest is mapped from disk
    slots_per_layer: int | None = None   # expert slots per MoE layer; None: as many as gpu_memory allows
    prefetch_experts: int | None = None  # experts predicted per layer ahead; None: the model's top-k; 0: off
    prefetch_depth: int = 1              # how many MoE layers ahead to predict
    prefetch_norm: bool = True           # apply the target layer's RMSNorm before its router when predicting
    offload_dir: Path | None = None      # folder for the disk tier's (unlinked) file; None: the system temp folder
    measure_time: bool = False           # time copies and waits with events (--stats); a little overhead per copy
    cpu_moe_layers: int = 0              # the experts of the first N MoE layers stay on the host and run on the CPU
    cpu_experts: str = "off"             # "auto": each decode miss is copied or run on the CPU, whichever the cost
                                         # model calibrated at start finishes sooner (off on a CPU device); "off"
                                         # copies every miss: the default, since on both lent GPU hosts measured
                                         # (docs/offloading.md) the CPU kernel read slower than the link
    cache: str = "lru"                   # each layer's slots (engine.CACHE_POLICIES): "lru" keeps the most recently
                                         # used experts; "none" empties them before each forward (every use a load)


LORA_TARGETS = ("attention", "router", "experts")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (lora.py): W x + (alpha / rank) B A x on each targeted matrix, B zero at the start.
    Targets: attention (q, k, v, o), router (the gate), experts (each expert's gate|up and down, its own pair)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora-rank {self.rank}: the rank must be at least 1")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"--targets {','.join(self.targets)!r}: use a comma-separated subset of "
                              f"{','.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class FinetuneConfig:
    """One LoRA fine-tune (train.py): rows of `seq_len` tokens, `batch_tokens` tokens a step (in forward and backward
    passes of `micro_batch_tokens`, their gradients accumulated), AdamW on the adapters."""

    data: Path = Path("train.jsonl")
    out: Path = Path("adapter")
    chat: bool = False            # rows are {"messages": [...]}: the chat template, loss on the assistant's turns
    seq_len: int = 512
    batch_tokens: int = 4096      # tokens a step: batch_tokens // seq_len rows
    micro_batch_tokens: int | None = None    # tokens a forward and backward; None: the whole step at once
    steps: int | None = None      # None: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    save_every: int = 50          # steps between resumable checkpoints (and at the end)
    seed: int = 0

    def __post_init__(self):
        for name in ("seq_len", "batch_tokens", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.batch_tokens < self.seq_len:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} is less than --seq-len {self.seq_len}: a step "
                              f"takes at least one row")
        if self.micro_batch_tokens is not None and not self.seq_len <= self.micro_batch_tokens <= self.batch_tokens:
            raise ConfigError(f"--micro-batch-tokens {self.micro_batch_tokens}: must be between --seq-len "
                              f"{self.seq_len} (one row a pass) and --batch-tokens {self.batch_tokens}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: must be at least 1")
        if self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs}: must be positive")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be positive")

    @property
    def rows(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def micro_rows(self) -> int:
        """Rows a forward and backward pass."""
        return (self.micro_batch_tokens or self.batch_tokens) // self.seq_len


QUANT_BITS = (2, 3, 4, 8)
QUANT_GROUP_SIZES = (16, 32, 64, 128)        # the GPU kernels step through a group 16 codes at a time
PAPER_GROUP_SIZE = {2: 16, 3: 64, 4: 64, 8: 64}   # the paper's HQQ settings (experts 2-bit g16; 3-, 4-bit g64)
PAPER_BITS = (4, 2)                          # the paper's default: 4-bit attention, 2-bit experts


@dataclass(frozen=True)
class QuantSpec:
    """How one role's weight matrices are quantized with HQQ (quant/hqq.py): `bits` per weight, groups
    of `group_size` along the input dimension, each group's scale and zero themselves quantized to
    8 bits when `quant_meta` (in runs of `meta_group_size` output rows of one group column)."""

    bits: int
    group_size: int = 0             # 0: the paper's for these bits (PAPER_GROUP_SIZE)
    quant_meta: bool = True
    meta_group_size: int = 128

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ConfigError(f"quantization: {self.bits} bits is not supported; use one of {', '.join(map(str, QUANT_BITS))}")
        if self.group_size == 0:
            object.__setattr__(self, "group_size", PAPER_GROUP_SIZE[self.bits])
        if self.group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(f"quantization: group size {self.group_size} is not supported; "
                              f"use one of {', '.join(map(str, QUANT_GROUP_SIZES))}")
        if self.meta_group_size < 1:
            raise ConfigError(f"quantization: meta group size must be at least 1, got {self.meta_group_size}")


@dataclass(frozen=True)
class QuantConfig:
    """HQQ mixed quantization: one QuantSpec per role, None keeps that role in the model's dtype.
    Embeddings are a row lookup, not a matmul, and always stay unquantized."""

    attention: QuantSpec | None = None
    experts: QuantSpec | None = None
    shared: QuantSpec | None = None     # dense MLP layers and shared experts
    router: QuantSpec | None = None
    head: QuantSpec | None = None       # lm_head

    @classmethod
    def parse(cls, text: str) -> "QuantConfig":
        """"A/E" (e.g. "4/2"): attention and shared layers at A bits, experts at E, the paper's group sizes.
        "A/EgG" (e.g. "4/2g32"): experts in groups of G weights. With 8-bit scales and zeros a group costs 16
        bits, so 2-bit experts take 3.06 bits a weight at g16 and 2.53 at g32 (llama.cpp's Q2_K: 2.625)."""
        match = re.fullmatch(r"(\d+)/(\d+)(?:g(\d+))?", text)
        if match is None:
            raise ConfigError(f"--quant {text!r}: expected ATTENTION_BITS/EXPERT_BITS, optionally gGROUP_SIZE for the "
                              f"experts, e.g. 4/2 or 4/2g32")
        attention_bits, expert_bits, group_size = match.groups()
        attention = QuantSpec(int(attention_bits))
        return cls(attention=attention, experts=QuantSpec(int(expert_bits), int(group_size or 0)), shared=attention)

    def to_json(self) -> dict:
        return {role: None if spec is None else dict(vars(spec)) for role, spec in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "QuantConfig":
        return cls(**{role: None if spec is None else QuantSpec(**spec) for role, spec in data.items()})
