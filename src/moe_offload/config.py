"""Configuration: frozen dataclasses, each default declared once.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))

`ModelConfig` is read from a Hugging Face `config.json`; the differences between MoE families
(key names, q/k norms, shared experts, dense layers) are resolved here, once, so that `model.py`
reads plain fields and never asks which family it is running.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class ConfigError(UserError):
    """A config.json we cannot run; the message names the field and what to change."""


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

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

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


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json: rope_type {rope_type!r} is not supported; only 'default' rotary embeddings are")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


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
        """Whether each token is picked by `generate.sample` on the host; else greedily on the device."""
        return self.temperature != 0 or self.penalized or self.grammar is not None


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
        """"A/E" (e.g. "4/2"): attention and shared layers at A bits, experts at E, the paper's group sizes."""
        try:
            attention_bits, expert_bits = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--quant {text!r}: expected ATTENTION_BITS/EXPERT_BITS, e.g. 4/2") from None
        attention = QuantSpec(attention_bits)
        return cls(attention=attention, experts=QuantSpec(expert_bits), shared=attention)

    def to_json(self) -> dict:
        return {role: None if spec is None else dict(vars(spec)) for role, spec in vars(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "QuantConfig":
        return cls(**{role: None if spec is None else QuantSpec(**spec) for role, spec in data.items()})
