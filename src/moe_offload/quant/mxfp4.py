"""MXFP4, the OCP microscaling 4-bit float format gpt-oss publishes its experts in, as an expert format.

    codes, scales = quantize(weight)                       # (N, K) -> uint8 (N, K/2), uint8 (N, K/32)
    weight = dequantize(codes, scales, torch.bfloat16)     # exact: every value is a code times a power of two
    fmt = MXFP4ExpertFormat(hidden, ffn, torch.bfloat16, biases=True)   # experts.ExpertFormat, one buffer an expert

Each group of 32 consecutive input columns of a row shares a power of two (a uint8 exponent biased by 127);
each weight is an e2m1 code (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6), two codes
a byte with the even column in the low nibble: the byte layout of the hub's `*_blocks` (E, N, K/32, 16) and
`*_scales` (E, N, K/32) tensors, one expert and matrix at a time. 4.25 bits a weight.

Quantizing values that are already MXFP4 (a published checkpoint, read and dequantized by checkpoint.py) gives
them back exactly: a group's largest code times its power of two fixes the same grid. `MXFP4Weight.linear`
is the slow twin (dequantize, then matmul) and what runs off CUDA; on CUDA with Triton, up to 8 rows of x run the
dequantize-and-multiply GEMV of kernel_mxfp4.py. With the SwiGLU it serves (`swiglu`: gpt-oss's clamped one),
MXFP4ExpertFormat runs a decode step's experts grouped, one launch for w1 and w3 of every pair and one for w2, the
biases added in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..experts import Expert, bias_shapes, lay_out, split_biases, with_biases
from ..ops import clamped_swiglu_activation

GROUP = 32           # weights sharing one scale
EXPONENT_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
LARGEST_EXPONENT = 2  # of e2m1: 6 = 1.5 x 2^2


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> codes uint8 (N, K/2), scales uint8 (N, K/32): each group's power of two puts its largest magnitude
    in [4, 8), each value rounds to the nearest code (6 at most)."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // GROUP, GROUP)
    largest = groups.abs().amax(dim=-1, keepdim=True)
    exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)) - LARGEST_EXPONENT,
                           torch.full_like(largest, -EXPONENT_BIAS)).clamp(-EXPONENT_BIAS, EXPONENT_BIAS)
    scaled = groups / torch.exp2(exponent)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)     # ties to the smaller magnitude
    codes = (nearest + 8 * (scaled < 0)).to(torch.uint8).reshape(rows, cols)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), (exponent.squeeze(-1) + EXPONENT_BIAS).to(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes uint8 (N, K/2), scales uint8 (N, K/32) -> (N, K) in `dtype`, computed in fp32."""
    rows = codes.shape[0]
    table = torch.tensor(FP4_VALUES, device=codes.device)
    values = torch.stack([table[(codes & 0x0F).long()], table[(codes >> 4).long()]], dim=-1).reshape(rows, -1, GROUP)
    exponent = scales.to(torch.int32) - EXPONENT_BIAS
    return torch.ldexp(values, exponent.unsqueeze(-1)).reshape(rows, -1).to(dtype)


@dataclass
class MXFP4Weight:
    codes: torch.Tensor    # uint8 (N, K/2)
    scales: torch.Tensor   # uint8 (N, K/32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not x.requires_grad:
            from . import kernel_mxfp4
            if kernel_mxfp4.AVAILABLE:
                return kernel_mxfp4.mxfp4_linear(x, self)
        return F.linear(x, self.dequantize(x.dtype))


class MXFP4ExpertFormat:
    """experts.ExpertFormat: w1, w2, w3 as MXFP4 codes and scales, then (with `biases`) their biases in `dtype`,
    in one buffer. Widths must be multiples of 32 (gpt-oss: 2880).

    `swiglu` (alpha, limit) is the expert's activation as the model computes it (model.clamped_swiglu; limit 0:
    plain SwiGLU): given, a decode step on CUDA runs grouped (grouped_swiglu); None, every expert runs on its own
    through the model's own mlp."""

    def __init__(self, hidden_size: int, expert_ffn: int, dtype: torch.dtype, biases: bool = False,
                 swiglu: tuple[float, float] | None = None):
        self.swiglu = swiglu
        shapes = ((expert_ffn, hidden_size), (hidden_size, expert_ffn), (expert_ffn, hidden_size))
        if hidden_size % GROUP or expert_ffn % GROUP:
            raise ValueError(f"MXFP4 needs widths that are multiples of {GROUP}, got {hidden_size} and {expert_ffn}")
        specs = [spec for rows, cols in shapes for spec in (((rows, cols // 2), torch.uint8),
                                                            ((rows, cols // GROUP), torch.uint8))]
        specs += [(shape, dtype) for shape in bias_shapes(hidden_size, expert_ffn)] if biases else []
        self.slots, self.nbytes = lay_out(specs)

    def pack(self, expert: Expert) -> torch.Tensor:
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        weights, biases = split_biases(expert)
        for slot, tensor in zip(self.slots, [t for w in weights for t in quantize(w)] + biases):
            slot.view(buffer).copy_(tensor)
        return buffer

    def view(self, buffer: torch.Tensor) -> Expert:
        views = [slot.view(buffer) for slot in self.slots]
        return with_biases([MXFP4Weight(*views[i:i + 2]) for i in range(0, 6, 2)], views[6:])

    def runs_grouped(self, x: torch.Tensor, top_k: int) -> bool:
        """A decode step's tokens (at most weight.GROUPED_TOKENS) on CUDA with Triton, the activation known."""
        from .weight import GROUPED_TOKENS
        if self.swiglu is None or not (x.is_cuda and x.shape[0] <= GROUPED_TOKENS):
            return False
        from . import kernel_mxfp4
        return kernel_mxfp4.AVAILABLE

    def grouped_swiglu(self, batch, x: torch.Tensor, top_k: int) -> torch.Tensor:
        """Every pair of the batch at once: one launch for w1 and w3 of all of them (biases added in the kernel),
        the activation, one launch for w2."""
        from .kernel_mxfp4 import mxfp4_grouped_gemv
        weights, biases = split_biases(batch.experts[0])    # slot 0's: the base the slot table moves from
        w1, w2, _ = weights
        b1, b2, _ = biases or (None, None, None)
        ffn, hidden = w1.shape
        pairs = batch.slots.shape[0]
        stride = batch.memory.stride(0)
        x = x.contiguous()
        gate_up = torch.empty((pairs, 2, ffn), device=x.device, dtype=x.dtype)
        mxfp4_grouped_gemv(x, w1, batch.slots, gate_up, stride, bias=b1, matrices=2, matrix_stride=self.w3_offset,
                           bias_matrix_stride=self.b3_offset, x_per_row=top_k)
        alpha, limit = self.swiglu
        gate, up = gate_up[:, 0], gate_up[:, 1]
        activations = (clamped_swiglu_activation(gate, up, alpha, limit) if limit else F.silu(gate) * up).contiguous()
        out = torch.empty((pairs, hidden), device=x.device, dtype=x.dtype)
        mxfp4_grouped_gemv(activations, w2, batch.slots, out, stride, bias=b2)
        return out

    @property
    def w3_offset(self) -> int:
        """Bytes from w1's codes (and scales) to w3's."""
        w1_codes, w1_scales, _, _, w3_codes, w3_scales = self.slots[:6]
        assert w3_codes.offset - w1_codes.offset == w3_scales.offset - w1_scales.offset
        return w3_codes.offset - w1_codes.offset

    @property
    def b3_offset(self) -> int:
        """Bytes from w1's bias to w3's (0 without biases)."""
        return self.slots[8].offset - self.slots[6].offset if len(self.slots) > 6 else 0

