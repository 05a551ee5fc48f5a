"""HQQ (half-quadratic quantization) of weight matrices: no calibration data, seconds per matrix.

    q = quantize(weight, QuantSpec(bits=2, group_size=16))     # weight (out, in), any float dtype
    approx = q.dequantize()                                    # (out, in) fp32

A weight matrix W (N, K) is cut into groups of `group_size` consecutive input columns; each group
gets a scale s and a zero z, and W ~ (Q - z) * s with integer Q in [0, 2^bits - 1]. HQQ starts
from min-max and refines z (s fixed) with a half-quadratic solver of min |W - (Q - z) s|_p^p,
p = 0.7, which fits the heavy-tailed weights better than least squares (Badri & Shaji, 2023).
This is the algorithm of the `hqq` package's default optimiser (`optimize_weights_proximal`,
the version that stops when the error stops falling), written for our layout and keeping the
best zero it saw. With `quant_meta`, the scales and zeros are then quantized to 8 bits by
min-max over runs of `meta_group_size` values (as the paper does for Mixtral; our runs go down
the output rows of one group column, see MetaCodes), and `dequantize` uses those 8-bit values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantSpec

# The hqq package's defaults for its proximal solver.
LP_NORM, BETA, KAPPA, ITERATIONS = 0.7, 10.0, 1.01, 20
META_BITS = 8


@dataclass
class MetaCodes:
    """A matrix (N, G) of per-group values quantized to 8 bits by min-max over runs of `group`
    consecutive rows of one column (the column-major order): value = min + code * step. Runs go
    down the output rows so that the GPU kernel, which owns a block of rows for one group at a
    time, finds one (step, min) for the whole block."""

    codes: torch.Tensor   # uint8 (N, G)
    step: torch.Tensor    # fp32 (runs,)
    minimum: torch.Tensor  # fp32 (runs,)
    group: int

    def dequantize(self) -> torch.Tensor:
        flat = self.codes.t().flatten().float()
        runs = self.step.numel()
        padded = torch.cat([flat, flat.new_zeros(runs * self.group - flat.numel())]).view(runs, self.group)
        values = self.minimum[:, None] + padded * self.step[:, None]
        return values.flatten()[:flat.numel()].view(self.codes.t().shape).t()


@dataclass
class QuantizedMatrix:
    """One quantized matrix before bit packing: integer codes and per-group scales and zeros."""

    q: torch.Tensor                      # uint8 (N, K), values in [0, 2^bits)
    scale: torch.Tensor | MetaCodes      # (N, K // group_size): fp16, or 8-bit codes
    zero: torch.Tensor | MetaCodes       # (N, K // group_size): fp16, or 8-bit codes
    spec: QuantSpec

    def scales_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (N, K // group_size) each, exactly as every kernel sees them."""
        return tuple(v.dequantize() if isinstance(v, MetaCodes) else v.float() for v in (self.scale, self.zero))

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scales_and_zeros()
        n, k = self.q.shape
        grouped = self.q.view(n, k // self.spec.group_size, self.spec.group_size).float()
        return ((grouped - zero[..., None]) * scale[..., None]).view(n, k)


def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedMatrix:
    """weight (N, K) on any device -> QuantizedMatrix on that device. K must be a multiple of the group size."""
    n, k = weight.shape
    if k % spec.group_size:
        raise ValueError(f"a matrix with {k} input columns cannot be cut into groups of {spec.group_size}")
    groups = weight.float().reshape(-1, spec.group_size)           # (N * K / g, g)
    q, inverse_scale, zero = optimize(groups, spec.bits)
    scale = (1.0 / inverse_scale).view(n, k // spec.group_size)
    zero = zero.view(n, k // spec.group_size)
    if spec.quant_meta:
        scale, zero = quantize_meta(scale, spec.meta_group_size), quantize_meta(zero, spec.meta_group_size)
    else:
        scale, zero = scale.half(), zero.half()
    return QuantizedMatrix(q.view(n, k).to(torch.uint8), scale, zero, spec)


def optimize(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups (G, g) fp32 -> codes (G, g), inverse scale (G, 1), zero (G, 1): W ~ (Q - zero) / inverse_scale.

    Half-quadratic splitting: alternate the closest codes for the current zero, a shrunk error
    W_e = shrink_p(W - W_r) (the proximal step of |.|_p), and the zero that best explains W - W_e;
    beta grows by kappa each step, and the loop ends when the mean absolute error stops falling.
    """
    top = 2 ** bits - 1
    low = groups.min(dim=1, keepdim=True).values
    high = groups.max(dim=1, keepdim=True).values
    span = high - low
    inverse_scale = torch.where(span.abs() <= 1e-4, torch.ones_like(span), top / span).clamp(max=2e4)
    zero = -low * inverse_scale

    beta, best_error, best_zero = BETA, float("inf"), zero
    for _ in range(ITERATIONS):
        q = torch.round(groups * inverse_scale + zero).clamp_(0, top)
        approx = (q - zero) / inverse_scale
        error = (groups - approx).abs().mean().item()
        if error >= best_error:
            break
        best_error, best_zero = error, zero
        shrunk = _shrink_lp(groups - approx, beta)
        zero = torch.mean(q - (groups - shrunk) * inverse_scale, dim=1, keepdim=True)
        beta *= KAPPA
    q = torch.round(groups * inverse_scale + best_zero).clamp_(0, top)
    return q, inverse_scale, best_zero


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal operator of |x|_p / beta for p < 1."""
    magnitude = x.abs()
    return torch.sign(x) * (magnitude - magnitude.pow(LP_NORM - 1) / beta).clamp_min(0.0)


def quantize_meta(values: torch.Tensor, group: int) -> MetaCodes:
    """values (N, G) -> min-max 8-bit codes over runs of `group` consecutive values in column-major
    order (down the rows of a column; a run may continue into the next column, the last may be short)."""
    flat = values.float().t().flatten()
    runs = -(-flat.numel() // group)
    padded = torch.cat([flat, flat[-1:].expand(runs * group - flat.numel())]).view(runs, group)
    minimum = padded.min(dim=1).values
    span = padded.max(dim=1).values - minimum
    step = torch.where(span > 0, span / (2 ** META_BITS - 1), torch.ones_like(span))
    codes = torch.round((padded - minimum[:, None]) / step[:, None]).clamp_(0, 2 ** META_BITS - 1)
    codes = codes.flatten()[:flat.numel()].to(torch.uint8).view(values.t().shape).t()
    return MetaCodes(codes, step, minimum, group)
