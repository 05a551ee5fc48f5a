"""MXFP4 matrix products on the GPU, in Triton (an optional, GPU-only dependency): gpt-oss's experts as published.

    y = mxfp4_linear(x, weight)        # x (..., K) on CUDA, weight an mxfp4.MXFP4Weight there -> (..., N)
    mxfp4_gemv(x, weight, out)         # 1 to MAX_ROWS rows of x, into out
    mxfp4_grouped_gemv(x, weight, slots, out, slot_stride, ...)     # many experts' products in one launch

The weight is as mxfp4.py stores it (the hub's layout): codes uint8 (N, K/2), two e2m1 codes a byte with the
even column in the low nibble, and scales uint8 (N, K/32), a power of two 2^(s - 127) a group of 32 columns.

A program owns BLOCK_N output rows and walks its share of the K groups BLOCK_G at a time: per row a load of
BLOCK_G x 16 contiguous code bytes and BLOCK_G scale bytes. A nibble n becomes an fp16 by bit placement,
((n & 8) << 12) | ((n & 7) << 9): sign, the 2 exponent bits and the mantissa bit land where fp16 keeps them,
which is the e2m1 value times 2^-14 exactly (e = 0 gives the fp16 subnormal m 2^-15: 0.5 m 2^-14). The group's
scale, times 2^14, is the fp32 whose exponent field is s + 14: exact for every s up to 240 (beyond, 2^113 and
up, and e8m0's NaN 255, are not in any real checkpoint). The low nibbles multiply the even columns of x, the
high ones the odd columns; a group's 32 products are summed in fp32, multiplied by its scale, and added into
fp32 sums per (row, group slot), reduced over the groups at the end. Every row of x (up to MAX_ROWS) reuses
the decoded codes.

With SPLITS > 1 programs divide K and write fp32 partial sums, added by one torch sum in a fixed order (no
atomics): the same input gives the same bits, which offloaded-equals-resident relies on. A bias (gpt-oss's
experts have one on each matrix) is added in fp32 before the one rounding to out's dtype (by split 0 when K
is split).

More than MAX_ROWS rows (prefill) dequantize (the slow twin's dequantize, on the device) and use cuBLAS.
Checked on the CPU with TRITON_INTERPRET=1 (tests/test_mxfp4_kernel.py) and timed on the GPU by
benchmarks/mxfp4_gemv.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: mxfp4.py falls back to dequantize-then-matmul
    AVAILABLE = False

MAX_ROWS = 8          # rows of x the GEMV takes; more: dequantize + cuBLAS
GROUP = 32


class MXFP4Config(NamedTuple):
    """Launch shape of one GEMV: rows a program, groups a loop step, programs along K (0: chosen from the GPU's
    streaming multiprocessors), warps a program."""

    block_n: int = 16
    block_g: int = 8
    splits: int = 0
    warps: int = 4


DEFAULT_CONFIG = MXFP4Config()
PROGRAMS_PER_SM = 4   # splits K until a launch has at least this many programs a streaming multiprocessor


@functools.cache
def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def splits_for(n: int, k: int, products: int, config: MXFP4Config, sm_count: int | None) -> int:
    """Programs along K: config.splits, or (0) enough for PROGRAMS_PER_SM programs a multiprocessor, at most one a
    loop step of groups; 1 off CUDA (the interpreter)."""
    steps = -(-(k // GROUP) // config.block_g)
    if config.splits:
        return max(1, min(config.splits, steps))
    if sm_count is None:
        return 1
    programs = -(-n // config.block_n) * products
    return max(1, min(steps, -(-PROGRAMS_PER_SM * sm_count // programs)))


if AVAILABLE:
    @triton.jit
    def _e2m1(nibble):
        """uint8 codes 0..15 -> their e2m1 values times 2^-14, fp32 (exact: bits placed into an fp16)."""
        n = nibble.to(tl.uint16)
        bits = ((n & 8) << 12) | ((n & 7) << 9)
        return bits.to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _mxfp4_gemv_kernel(
        x_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, partial_ptr,
        N, K, GROUPS_PER_SPLIT,
        slots_ptr, SLOT_STRIDE, MATRIX_STRIDE, BIAS_MATRIX_STRIDE, MATRICES, X_PER_ROW,
        X_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr,
        HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
    ):
        """Grid (row blocks, SPLITS, products). GROUPED: product e = (pair, j) is matrix j of the expert in slot
        slots[pair] (its codes, scales and bias SLOT_STRIDE bytes on from slot to slot; codes and scales
        MATRIX_STRIDE bytes on from matrix to matrix, the bias BIAS_MATRIX_STRIDE) with row pair // X_PER_ROW of x,
        into row e of out. Otherwise one product of X_ROWS rows of x. SPLITS > 1: fp32 partial sums into
        partial_ptr (products, SPLITS, X_ROWS, N), which the caller adds."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        product = 0
        if GROUPED:
            product = tl.program_id(2)
            pair = product // MATRICES
            slot = tl.load(slots_ptr + pair).to(tl.int64)
            offset = slot * SLOT_STRIDE + (product % MATRICES) * MATRIX_STRIDE
            codes_ptr += offset
            scales_ptr += offset
            if HAS_BIAS:
                bias_ptr = (bias_ptr.to(tl.pointer_type(tl.uint8)) + slot * SLOT_STRIDE
                            + (product % MATRICES) * BIAS_MATRIX_STRIDE).to(bias_ptr.dtype)
            x_ptr += (pair // X_PER_ROW).to(tl.int64) * K
            out_ptr += product.to(tl.int64) * N
        groups = K // 32
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        j = tl.arange(0, 16)
        g_block = tl.arange(0, BLOCK_G)
        first = split * GROUPS_PER_SPLIT
        last = tl.minimum(first + GROUPS_PER_SPLIT, groups)
        acc = ()
        for m in tl.static_range(X_ROWS):
            acc = acc + (tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32),)
        for g0 in range(first, last, BLOCK_G):
            g = g0 + g_block
            g_ok = g < last
            ok = row_ok[:, None] & g_ok[None, :]
            byte = rows64[:, None, None] * (K // 2) + (g * 16)[None, :, None] + j[None, None, :]
            codes = tl.load(codes_ptr + byte, mask=ok[:, :, None], other=0)
            s = tl.load(scales_ptr + rows64[:, None] * groups + g[None, :], mask=ok, other=0)
            scale = ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)       # 2^(s - 127) 2^14
            low, high = _e2m1(codes & 0x0F), _e2m1(codes >> 4)
            column = (g * 32)[:, None] + 2 * j[None, :]                              # even columns (BLOCK_G, 16)
            new_acc = ()
            for m in tl.static_range(X_ROWS):
                x_even = tl.load(x_ptr + m * K + column, mask=g_ok[:, None], other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + m * K + column + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
                dots = tl.sum(low * x_even[None, :, :] + high * x_odd[None, :, :], axis=2)
                new_acc = new_acc + (acc[m] + dots * scale,)
            acc = new_acc
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=row_ok & (rows * 0 + split == 0), other=0.0).to(tl.float32)
        for m in tl.static_range(X_ROWS):
            total = tl.sum(acc[m], axis=1) + bias
            if SPLITS == 1:
                tl.store(out_ptr + m * N + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
            else:
                place = ((product * SPLITS + split) * X_ROWS + m).to(tl.int64) * N
                tl.store(partial_ptr + place + rows, total, mask=row_ok)


def _launch(x, weight, out, bias, config, rows_of_x, grouped=None) -> None:
    n, k = weight.shape
    config = config or DEFAULT_CONFIG
    slots, slot_stride, matrix_stride, bias_matrix_stride, matrices, x_per_row = grouped or (None, 0, 0, 0, 1, 1)
    products = slots.shape[0] * matrices if grouped else 1
    splits = splits_for(n, k, products, config, _sm_count(x.device))
    steps = -(-(k // GROUP) // config.block_g)
    groups_per_split = -(-steps // splits) * config.block_g
    splits = -(-(k // GROUP) // groups_per_split)          # none left empty
    partial = (torch.empty((products, splits, rows_of_x, n), device=x.device, dtype=torch.float32)
               if splits > 1 else out)
    _mxfp4_gemv_kernel[(-(-n // config.block_n), splits, products)](
        x, weight.codes, weight.scales, bias if bias is not None else weight.scales, out, partial,
        n, k, groups_per_split,
        slots if slots is not None else weight.scales, slot_stride, matrix_stride, bias_matrix_stride, matrices,
        x_per_row,
        X_ROWS=rows_of_x, BLOCK_N=config.block_n, BLOCK_G=config.block_g, SPLITS=splits,
        HAS_BIAS=bias is not None, GROUPED=grouped is not None, num_warps=config.warps,
    )
    if splits > 1:
        out.view(products, rows_of_x, n).copy_(partial.sum(dim=1))


def _check(weight) -> None:
    if not (weight.codes.is_contiguous() and weight.scales.is_contiguous()):
        raise ValueError("the MXFP4 GEMV reads contiguous codes and scales")


def mxfp4_gemv(x: torch.Tensor, weight, out: torch.Tensor, bias: torch.Tensor | None = None,
               config: MXFP4Config | None = None) -> None:
    """out (M, N) = x (M, K) @ weight.T (+ bias) for 1 to MAX_ROWS rows, in out's dtype; x and out contiguous."""
    _check(weight)
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"the MXFP4 GEMV takes 1 to {MAX_ROWS} rows of x, not {x.shape[0]}")
    _launch(x, weight, out, bias, config, x.shape[0])


def mxfp4_grouped_gemv(x: torch.Tensor, weight, slots: torch.Tensor, out: torch.Tensor, slot_stride: int,
                       bias: torch.Tensor | None = None, matrices: int = 1, matrix_stride: int = 0,
                       bias_matrix_stride: int = 0, x_per_row: int = 1, config: MXFP4Config | None = None) -> None:
    """Many experts' products in one launch: out[p, j] (N,) = (matrix j of the expert in slot slots[p]) @
    x[p // x_per_row] (+ its bias), for every pair p of the int32 device table `slots` and j < matrices.

    `weight` (and `bias`) are matrix 0 as it sits in slot 0 of a layer's slot buffer (views into it); the same
    tensors of slot s lie s * slot_stride bytes further, those of matrix j j * matrix_stride bytes (the bias
    j * bias_matrix_stride) after matrix 0's. Each product is the one mxfp4_gemv computes for one row of x with
    the same config, bit for bit. x (rows, K) and out (pairs, matrices, N) contiguous."""
    _check(weight)
    _launch(x, weight, out, bias, config, 1, (slots, slot_stride, matrix_stride, bias_matrix_stride, matrices, x_per_row))


def mxfp4_linear(x: torch.Tensor, weight, config: MXFP4Config | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype: the GEMV for up to MAX_ROWS rows, else dequantize and matmul."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] > MAX_ROWS:
        return (x2 @ weight.dequantize(x.dtype).t()).view(*x.shape[:-1], n)
    out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    mxfp4_gemv(x2, weight, out, config=config)
    return out.view(*x.shape[:-1], n)
