"""Synthetic models: a real model's exact shapes, random weights made directly in the target format.

    ckpt = SyntheticCheckpoint.create("mixtral-8x7b", QuantConfig.parse("4/2"), device="cuda")
    weights = ckpt.dense_weights(device, torch.bfloat16)       # Checkpoint's own assembly, random tensors
    expert_format, expert_buffer = ckpt.expert_storage(torch.bfloat16)
    buffer = expert_buffer(layer, expert_id)                   # uint8 (expert_format.nbytes,) on `device`

No file and no quantizer run: a quantized weight's packed codes are random bytes, its scales and
zeros (or their 8-bit codes and fp32 meta) are set so that the dequantized weight has a standard
deviation of about 1/sqrt(fan-in), like a trained layer's; an unquantized weight is drawn from a
normal distribution of that deviation; norms are ones. So every byte that a real checkpoint of
this format would move and every kernel it would run is there, at full size, without a 90 GB
download or a quantization pass over 46 B parameters. Each (layer, expert) buffer is generated
from its own seed, so a buffer is the same whenever it is asked for.

Presets: "mixtral-8x7b" (Mixtral-8x7B's shapes: hidden 4096, expert ffn 14336, 32 layers, 8
experts, top-2, 32 heads, 8 kv heads, vocab 32000, rope theta 1e6) and "tiny" (the same depth,
experts and top-k at toy widths, so routing traces of a 32-layer model replay onto it; for tests);
"gpt-oss-120b" (read from the published config.json: hidden 2880, expert ffn 2880, 36 layers, 128 experts,
top-4, 64 heads of 64, 8 kv heads, vocab 201088, sliding and full layers alternating, attention sinks,
biases, the clamped SwiGLU, yarn) and "gpt-oss-tiny" (its structure at toy widths, for tests). gpt-oss
publishes its experts in MXFP4: without expert bits (--quant mxfp4, bf16 or none) they stay MXFP4, as
the engine keeps a real checkpoint's (random codes over every byte, scales around 2^-7, biases of
deviation 1/sqrt(fan-in)); "A/E" converts them to HQQ as for any other model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, QuantConfig
from ..errors import UserError
from ..experts import DenseExpertFormat
from ..quant.checkpoint import QuantizedCheckpoint, spec_for
from ..quant.mxfp4 import MXFP4ExpertFormat
from ..quant.weight import HQQExpertFormat, PackedFormat

_COMMON = dict(model_type="mixtral", num_layers=32, num_experts=8, top_k=2, rms_norm_eps=1e-5, rope_theta=1e6,
               max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,))

SYNTHETIC_SHAPES = {
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                                expert_ffn=14336, **_COMMON),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, expert_ffn=128,
                        **_COMMON),
}

# openai/gpt-oss-120b's config.json as published (what ModelConfig.from_hf reads from it), and a toy of its structure
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002, "experts_per_token": 4,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088,
}
GPT_OSS_TINY = {**GPT_OSS_120B, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 4, "num_local_experts": 8, "vocab_size": 512,
                "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 16,
                "eos_token_id": 2, "pad_token_id": 0}
SYNTHETIC_SHAPES["gpt-oss-120b"] = ModelConfig.from_hf(GPT_OSS_120B)
SYNTHETIC_SHAPES["gpt-oss-tiny"] = ModelConfig.from_hf(GPT_OSS_TINY)
PUBLISHED_MXFP4 = ("gpt-oss-120b", "gpt-oss-tiny")     # presets whose experts are published in MXFP4
MXFP4_SCALE = 120     # 2^-7: uniform random codes (deviation ~2.9) times it, ~1/sqrt(2880)

ROUTER_SPREAD = 1.0   # router weights' deviation times sqrt(hidden): router logits of about unit deviation


def synthetic_config(name: str) -> ModelConfig:
    if name not in SYNTHETIC_SHAPES:
        raise UserError(f"--synthetic {name!r} is not a preset; use one of: {', '.join(SYNTHETIC_SHAPES)}")
    return SYNTHETIC_SHAPES[name]


@dataclass
class SyntheticCheckpoint(QuantizedCheckpoint):
    """A QuantizedCheckpoint whose tensors are generated, on `device`, instead of read."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    published_mxfp4: bool = False    # experts published in MXFP4 (gpt-oss): kept so when the quant has no expert bits

    @classmethod
    def create(cls, preset: str, quant: QuantConfig | None, device, seed: int = 0) -> "SyntheticCheckpoint":
        config = synthetic_config(preset)
        return cls(Path(f"synthetic-{preset}"), config, {}, {}, quant=quant or QuantConfig(), stored=False,
                   device=torch.device(device), seed=seed, published_mxfp4=preset in PUBLISHED_MXFP4)

    def tensor(self, name, shape):
        raise UserError(f"{self.folder}: a synthetic model has no stored tensor {name!r}")

    def dense_tensor(self, name, shape, device, dtype):
        generator = self._generator(name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=device, dtype=dtype)
        if name.endswith("embed_tokens.weight"):
            return torch.randn(shape, generator=generator, device=self.device).to(device=device, dtype=dtype)
        spec = spec_for(self.quant, name)
        if spec is None:
            deviation = (ROUTER_SPREAD if name.endswith(".gate.weight") else 1.0) / math.sqrt(shape[-1])
            return (torch.randn(shape, generator=generator, device=self.device) * deviation).to(device=device, dtype=dtype)
        fmt = PackedFormat([(shape, spec)])
        (weight,) = fmt.view(random_packed(fmt, self.device, generator).to(device))
        return weight

    @property
    def mxfp4_experts(self) -> bool:
        return self.published_mxfp4 and self.quant.experts is None

    def expert_format(self, dtype):
        cfg = self.config
        if self.mxfp4_experts:
            return MXFP4ExpertFormat(cfg.hidden_size, cfg.expert_ffn, dtype, cfg.expert_bias,
                                     swiglu=(cfg.swiglu_alpha, cfg.swiglu_limit))
        return super().expert_format(dtype)

    def expert_storage(self, dtype):
        fmt = self.expert_format(dtype)
        if isinstance(fmt, MXFP4ExpertFormat):
            return fmt, lambda layer, expert_id: random_mxfp4(fmt, self.device, self._generator(layer, expert_id))
        if isinstance(fmt, HQQExpertFormat):
            return fmt, lambda layer, expert_id: random_hqq_expert(fmt, self.device, self._generator(layer, expert_id))
        return fmt, lambda layer, expert_id: random_dense(fmt, self.device, self._generator(layer, expert_id))

    def _generator(self, *key) -> torch.Generator:
        # A stable seed per tensor, whatever order the tensors are asked for in.
        seed = self.seed * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(repr(key))) % (1 << 40)
        return torch.Generator(device=self.device).manual_seed(seed)


def zero_bytes(nbytes: int, device) -> torch.Tensor:
    # Zeroed as 8-byte words: byte-wise zeroing of small buffers is split over CPU threads, which
    # costs milliseconds per expert on a busy machine. Packed sizes are multiples of 64 bytes.
    return torch.zeros(nbytes // 8, dtype=torch.int64, device=device).view(torch.uint8)


def random_dense(fmt: DenseExpertFormat, device, generator) -> torch.Tensor:
    """A DenseExpertFormat buffer of normal weights, deviation 1/sqrt(fan-in)."""
    buffer = zero_bytes(fmt.nbytes, device)
    for slot in fmt.slots:
        slot.view(buffer).normal_(0.0, 1.0 / math.sqrt(slot.shape[-1]), generator=generator)
    return buffer


def random_biases(slots, buffer: torch.Tensor, generator) -> None:
    """Biases of deviation 1/sqrt(their width), into their slots of the buffer."""
    for slot in slots:
        slot.view(buffer).normal_(0.0, 1.0 / math.sqrt(slot.shape[-1]), generator=generator)


def random_mxfp4(fmt: MXFP4ExpertFormat, device, generator) -> torch.Tensor:
    """An MXFP4ExpertFormat buffer: codes uniform over every byte, scales 2^-8 .. 2^-6, biases normal."""
    buffer = zero_bytes(fmt.nbytes, device)
    for codes, scales in zip(fmt.slots[0:6:2], fmt.slots[1:6:2]):
        codes.view(buffer).random_(0, 256, generator=generator)
        scales.view(buffer).random_(MXFP4_SCALE - 1, MXFP4_SCALE + 2, generator=generator)
    random_biases(fmt.slots[6:], buffer, generator)
    return buffer


def random_hqq_expert(fmt: HQQExpertFormat, device, generator) -> torch.Tensor:
    """An HQQExpertFormat buffer: random_packed's matrices, then the biases (if any)."""
    packed = random_packed(fmt.format, device, generator)
    if not fmt.bias_slots:
        return packed
    buffer = zero_bytes(fmt.nbytes, device)
    buffer[:fmt.format.nbytes] = packed
    random_biases(fmt.bias_slots, buffer, generator)
    return buffer


def random_packed(fmt: PackedFormat, device, generator) -> torch.Tensor:
    """A PackedFormat buffer whose matrices dequantize to weights of deviation ~1/sqrt(fan-in):
    random codes, zeros around the middle code, scales around the step that gives that deviation."""
    buffer = zero_bytes(fmt.nbytes, device)
    for layout, slots in zip(fmt.layouts, fmt.slots):
        spec, fan_in = layout.spec, layout.shape[1]
        levels = 2 ** spec.bits
        # codes uniform on [0, levels): deviation levels / sqrt(12); scale brings it to 1/sqrt(fan_in)
        scale = math.sqrt(12) / levels / math.sqrt(fan_in)
        middle = (levels - 1) / 2
        packed, scale_slot, zero_slot, *meta_slot = slots
        packed.view(buffer).random_(0, 256, generator=generator)
        if spec.quant_meta:
            # 8-bit codes with value = minimum + code * step: scales in [0.5, 1.5] x scale, zeros middle -/+ 0.5
            scale_slot.view(buffer).random_(0, 256, generator=generator)
            zero_slot.view(buffer).random_(0, 256, generator=generator)
            meta = meta_slot[0].view(buffer)            # fp32 (runs, 2 [scale, zero], 2 [step, minimum])
            meta[:, 0, 0], meta[:, 0, 1] = scale / 255, 0.5 * scale
            meta[:, 1, 0], meta[:, 1, 1] = 1 / 255, middle - 0.5
        else:
            shape = scale_slot.shape
            scale_slot.view(buffer).copy_(scale * (0.5 + torch.rand(shape, generator=generator, device=device)))
            zero_slot.view(buffer).copy_(middle - 0.5 + torch.rand(shape, generator=generator, device=device))
    return buffer


def expert_nbytes(config: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype, mxfp4: bool = False) -> int:
    """Bytes of one expert's buffer in the target format (what every load moves); `mxfp4`: experts published so."""
    biases = config.expert_bias
    if quant is None or quant.experts is None:
        if mxfp4:
            return MXFP4ExpertFormat(config.hidden_size, config.expert_ffn, dtype, biases).nbytes
        return DenseExpertFormat(config.hidden_size, config.expert_ffn, dtype, biases).nbytes
    return HQQExpertFormat(config.hidden_size, config.expert_ffn, quant.experts, biases=biases).nbytes

