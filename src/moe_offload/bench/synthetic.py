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
experts and top-k at toy widths, so routing traces of a 32-layer model replay onto it; for tests).
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
from ..quant.weight import HQQExpertFormat, PackedFormat

_COMMON = dict(model_type="mixtral", num_layers=32, num_experts=8, top_k=2, rms_norm_eps=1e-5, rope_theta=1e6,
               max_position_embeddings=32768, bos_token_id=1, eos_token_ids=(2,))

SYNTHETIC_SHAPES = {
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                                expert_ffn=14336, **_COMMON),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, expert_ffn=128,
                        **_COMMON),
}

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

    @classmethod
    def create(cls, preset: str, quant: QuantConfig | None, device, seed: int = 0) -> "SyntheticCheckpoint":
        config = synthetic_config(preset)
        return cls(Path(f"synthetic-{preset}"), config, {}, {}, quant=quant or QuantConfig(), stored=False,
                   device=torch.device(device), seed=seed)

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

    def expert_storage(self, dtype):
        fmt = self.expert_format(dtype)
        if isinstance(fmt, HQQExpertFormat):
            return fmt, lambda layer, expert_id: random_packed(fmt.format, self.device, self._generator(layer, expert_id))
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


def expert_nbytes(config: ModelConfig, quant: QuantConfig | None, dtype: torch.dtype) -> int:
    """Bytes of one expert's buffer in the target format (what every load moves)."""
    if quant is None or quant.experts is None:
        return DenseExpertFormat(config.hidden_size, config.expert_ffn, dtype).nbytes
    return HQQExpertFormat(config.hidden_size, config.expert_ffn, quant.experts).nbytes

