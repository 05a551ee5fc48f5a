"""Configuration: frozen dataclasses, each default declared once.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))

`ModelConfig` is read from a Hugging Face `config.json`; the differences between MoE families
(key names, q/k norms, shared experts, dense layers) are resolved here, once, so that `model.py`
reads plain fields and never asks which family it is running.
"""

from __future__ import annotations

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
                num_experts=_require(hf, "num_local_experts"),
                sliding_window=hf.get("sliding_window"),
            )
        if hf.get("use_sliding_window"):
            raise ConfigError(f"config.json: use_sliding_window is not supported for {model_type}; set it to false")
        if model_type == "olmoe":
            return cls(
                **common,
                expert_ffn=_require(hf, "intermediate_size"),
                num_experts=_require(hf, "num_experts"),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
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
            num_experts=_require(hf, "num_experts"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            dense_ffn=hf.get("intermediate_size", 0),
            dense_layers=dense,
            shared_expert_ffn=hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0,
            qkv_bias=model_type == "qwen2_moe" or bool(hf.get("attention_bias", False)),
            qk_norm="head" if model_type == "qwen3_moe" else "none",
        )


def _require(hf: dict, key: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json: required field {key!r} is missing")
    return hf[key]


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
    """How to pick the next token. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0              # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs. "auto": cuda when available, bf16 there and fp32 on the CPU."""

    model: Path = DEFAULT_MODEL_DIR
    device: str = "auto"
    dtype: str = "auto"
    max_context: int = 4096      # KV cache length; capped by the model's max_position_embeddings
