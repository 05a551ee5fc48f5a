"""Quantized weights as the model uses them, and their one-buffer formats.

    fmt = PackedFormat([(shape, spec)])                  # one (N, K) matrix
    buffer = fmt.pack([weight])                          # uint8 (fmt.nbytes,) CPU
    (w,) = fmt.view(buffer.to(device))                   # QuantizedWeight, views into the buffer
    y = w.linear(x)                                      # x (..., K) -> (..., N)

    experts = HQQExpertFormat(hidden, ffn, spec)         # experts.ExpertFormat: w1, w2, w3 in one buffer

A QuantizedWeight holds, for an (N, K) matrix: each row's codes packed along K into 32-bit
words (pack.py), and a scale and a zero per group of `group_size` input columns and output row,
as fp16, or as 8-bit codes plus an fp32 (step, min) per run of `meta_group_size` rows
(hqq.MetaCodes). Words, scales and zeros are all stored with the rows innermost ((words, rows)
and (groups, rows)), the order the GPU kernel reads them: a thread's few consecutive rows are one
load. Rows are padded to pack.ROW_MULTIPLE (the pad repeats the last row, so it does not stretch
any meta run); `linear` computes only the first N.

`linear` runs the Triton kernel (kernels.py) on CUDA when Triton is installed, and elsewhere the
slow twin: dequantize to x's dtype, then matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError, QuantSpec
from ..experts import BUFFER_ALIGNMENT, Expert, TensorSlot, bias_shapes, lay_out, split_biases, with_biases
from . import pack as bitpack
from .hqq import MetaCodes, QuantizedMatrix, quantize

GROUPED_TOKENS = 32   # tokens a step at most for grouped kernels (one GEMV program set a pair); prefill dequantizes


@dataclass
class QuantizedWeight:
    shape: tuple[int, int]          # (N, K), unpadded
    spec: QuantSpec
    packed: torch.Tensor            # int32 (words per row, padded rows): pack.py's words
    scale: torch.Tensor             # (groups, padded rows): fp16, or uint8 codes with `meta`
    zero: torch.Tensor              # likewise
    meta: torch.Tensor | None       # fp32 (runs, 2 [scale, zero], 2 [step, min]) when spec.quant_meta

    @property
    def padded_rows(self) -> int:
        return self.packed.shape[1]

    def scales_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (padded rows, groups) each."""
        scale, zero = self.scale.t(), self.zero.t()
        if self.meta is None:
            return scale.float(), zero.float()
        group = self.spec.meta_group_size
        return (MetaCodes(scale, self.meta[:, 0, 0], self.meta[:, 0, 1], group).dequantize(),
                MetaCodes(zero, self.meta[:, 1, 0], self.meta[:, 1, 1], group).dequantize())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in `dtype`, computed in fp32."""
        scale, zero = self.scales_and_zeros()
        rows, k = self.padded_rows, self.shape[1]
        q = bitpack.unpack(self.packed, self.spec.bits, k)
        grouped = q.view(rows, k // self.spec.group_size, self.spec.group_size).float()
        weight = ((grouped - zero[..., None]) * scale[..., None]).view(rows, k)
        return weight[:self.shape[0]].to(dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from . import kernels
            if kernels.AVAILABLE:
                return FusedLinear.apply(x, self) if x.requires_grad else kernels.hqq_linear(x, self)
        return F.linear(x, self.dequantize(x.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero, self.meta) if t is not None)


class FusedLinear(torch.autograd.Function):
    """x W^T by the fused kernel, differentiable in x (LoRA training, train.py): the weight is frozen, and backward
    dequantizes it for grad x = grad W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        from . import kernels
        ctx.weight = weight
        return kernels.hqq_linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize(grad.dtype), None


class WeightLayout:
    """The tensors of one quantized (N, K) matrix: their shapes and dtypes, and how to fill them."""

    def __init__(self, shape: tuple[int, int], spec: QuantSpec):
        n, k = shape
        if k % spec.group_size:
            raise ConfigError(f"quantization: a ({n}, {k}) weight cannot be cut into groups of {spec.group_size} "
                              f"input columns; choose a group size that divides {k}")
        self.shape, self.spec = (n, k), spec
        self.padded_rows = bitpack.padded_rows(n)
        groups = k // spec.group_size
        specs = [((bitpack.words_per_row(k, spec.bits), self.padded_rows), torch.int32)]
        meta_shape = (groups, self.padded_rows)
        if spec.quant_meta:
            runs = -(-self.padded_rows * groups // spec.meta_group_size)
            specs += [(meta_shape, torch.uint8)] * 2 + [((runs, 2, 2), torch.float32)]
        else:
            specs += [(meta_shape, torch.float16)] * 2
        self.tensor_specs = specs

    def quantize(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """weight (N, K) -> the layout's tensors, on weight's device."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"expected a weight of shape {list(self.shape)}, got {list(weight.shape)}")
        matrix: QuantizedMatrix = quantize(bitpack.pad_rows(weight), self.spec)
        tensors = [bitpack.pack(matrix.q, self.spec.bits)]
        if self.spec.quant_meta:
            scale, zero = matrix.scale, matrix.zero
            meta = torch.stack([scale.step, scale.minimum, zero.step, zero.minimum], -1).view(-1, 2, 2)
            return tensors + [scale.codes.t().contiguous(), zero.codes.t().contiguous(), meta]
        return tensors + [matrix.scale.t().contiguous(), matrix.zero.t().contiguous()]

    def assemble(self, tensors: Sequence[torch.Tensor]) -> QuantizedWeight:
        packed, scale, zero, *meta = tensors
        return QuantizedWeight(self.shape, self.spec, packed, scale, zero, meta[0] if meta else None)


class PackedFormat:
    """Several quantized matrices in ONE contiguous uint8 buffer (each tensor 64-byte aligned)."""

    def __init__(self, matrices: Sequence[tuple[tuple[int, int], QuantSpec]]):
        self.layouts = [WeightLayout(shape, spec) for shape, spec in matrices]
        slots, self.nbytes = lay_out([s for layout in self.layouts for s in layout.tensor_specs])
        self.slots: list[list[TensorSlot]] = []
        for layout in self.layouts:
            self.slots.append(slots[:len(layout.tensor_specs)])
            slots = slots[len(layout.tensor_specs):]

    def pack(self, weights: Sequence[torch.Tensor], device=None) -> torch.Tensor:
        """Full-precision matrices -> uint8 (nbytes,) CPU buffer; quantized on `device` (default: where they are)."""
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        for layout, slots, weight in zip(self.layouts, self.slots, weights):
            for slot, tensor in zip(slots, layout.quantize(weight.to(device) if device is not None else weight)):
                slot.view(buffer).copy_(tensor)
        return buffer

    def view(self, buffer: torch.Tensor) -> list[QuantizedWeight]:
        if buffer.dtype != torch.uint8 or buffer.shape != (self.nbytes,):
            raise ValueError(f"expected a uint8 buffer of {self.nbytes} bytes, got {buffer.dtype} {list(buffer.shape)}")
        return [layout.assemble([slot.view(buffer) for slot in slots]) for layout, slots in zip(self.layouts, self.slots)]


class HQQExpertFormat:
    """experts.ExpertFormat for HQQ: w1, w2, w3 of one expert quantized with `spec`, in one buffer; with `biases`,
    their biases follow in fp32 (a stored folder's buffers do not depend on the dtype it is run in)."""

    def __init__(self, hidden_size: int, expert_ffn: int, spec: QuantSpec, device=None, biases: bool = False):
        self.spec = spec
        self.device = device   # where pack() quantizes; the buffer always comes back on the CPU
        shapes = ((expert_ffn, hidden_size), (hidden_size, expert_ffn), (expert_ffn, hidden_size))
        self.format = PackedFormat([(shape, spec) for shape in shapes])
        bias_slots, bias_bytes = lay_out([(shape, torch.float32) for shape in bias_shapes(hidden_size, expert_ffn)]
                                         if biases else [])
        start = -(-self.format.nbytes // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT if biases else self.format.nbytes
        self.bias_slots = [TensorSlot(start + slot.offset, slot.shape, slot.dtype) for slot in bias_slots]
        self.nbytes = start + bias_bytes

    def pack(self, expert: Expert) -> torch.Tensor:
        weights, biases = split_biases(expert)
        packed = self.format.pack(weights, self.device)
        if not self.bias_slots:
            return packed
        buffer = torch.zeros(self.nbytes, dtype=torch.uint8)
        buffer[:self.format.nbytes] = packed
        for slot, bias in zip(self.bias_slots, biases):
            slot.view(buffer).copy_(bias)
        return buffer

    def view(self, buffer: torch.Tensor) -> Expert:
        return with_biases(self.format.view(buffer[:self.format.nbytes]), [slot.view(buffer) for slot in self.bias_slots])

    def runs_grouped(self, x: torch.Tensor, top_k: int) -> bool:
        """A decode step's tokens (at most GROUPED_TOKENS) on CUDA with Triton, groups the GEMV tiles, rows of x and
        of the hidden activations that the GEMV can read 16 bytes at a time, and no biases (the grouped GEMV has no
        epilogue for them)."""
        if not (x.is_cuda and x.shape[0] <= GROUPED_TOKENS) or self.bias_slots:
            return False
        from . import kernels
        from .kernel_config import gemv_tiles
        ffn, hidden = self.format.layouts[0].shape
        return (kernels.AVAILABLE and gemv_tiles(self.spec.bits, self.spec.group_size)
                and all(width * x.element_size() % 16 == 0 for width in (ffn, hidden)))

    def grouped_swiglu(self, batch, x: torch.Tensor, top_k: int) -> torch.Tensor:
        """Every pair of the batch at once: one launch for w1 and w3 of all of them, one for w2."""
        from . import kernels
        first = batch.experts[0]                 # the matrices of slot 0: the base the slot table moves from
        ffn, hidden = first.w1.shape
        pairs = batch.slots.shape[0]
        stride = batch.memory.stride(0)
        gate_up = torch.empty((pairs, 2, ffn), device=x.device, dtype=x.dtype)
        kernels.hqq_grouped_gemv(x, first.w1, batch.slots, gate_up, stride, matrices=2,
                                 matrix_stride=self.w3_offset, x_per_row=top_k)
        activations = F.silu(gate_up[:, 0]) * gate_up[:, 1]
        out = torch.empty((pairs, hidden), device=x.device, dtype=x.dtype)
        kernels.hqq_grouped_gemv(activations, first.w2, batch.slots, out, stride)
        return out

    @property
    def w3_offset(self) -> int:
        """Bytes from each tensor of w1 to the same tensor of w3 (the same layout, so the same for every tensor)."""
        w1, _, w3 = self.format.slots
        offsets = {b.offset - a.offset for a, b in zip(w1, w3)}
        assert len(offsets) == 1, offsets
        return offsets.pop()
