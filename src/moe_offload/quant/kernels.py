"""Fused HQQ dequantize-and-multiply on the GPU, in Triton (an optional, GPU-only dependency).

    y = hqq_linear(x, weight)          # x (..., K) on CUDA, weight a QuantizedWeight there -> (..., N)

One kernel, two inner products, chosen by the number of rows M of x:
- M == 1 (decode): a GEMV. Each program reads a tile of packed words once, expands it into
  PER_WORD tiles of codes with a shift and a mask, and uses sum_k (q_k - z) s x_k =
  s (sum_k q_k x_k - z sum_k x_k) per group, so the per-weight work is a shift, a mask, an
  int-to-float by bit tricks (the conversion instruction is slow) and a multiply-add. The input dimension is split over SPLIT_K programs when there
  are too few rows to fill the GPU; their fp32 partial sums are added in a fixed order
  (deterministic: the same input gives the same bits).
- M > 1 (batched decode, prefill): the tile is dequantized to x's dtype and multiplied with
  tl.dot on the tensor cores, BLOCK_M rows of x at a time.

The layout is quant/pack.py's: word (r, k) holds rows r + s * R, s < PER_WORD, of column k.
Checked on the CPU with TRITON_INTERPRET=1 (tests/test_quant_kernels.py) and timed on the GPU by
benchmarks/quant_kernels.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .pack import PER_WORD, word_bytes

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: weight.py falls back to dequantize-then-matmul
    AVAILABLE = False


@dataclass(frozen=True)
class KernelConfig:
    block_m: int       # rows of x per program (1: the GEMV)
    block_r: int       # packed rows per program; it computes block_r * PER_WORD output rows
    block_k: int       # input columns per step; a multiple of the group size
    split_k: int       # programs sharing one output tile's input dimension (GEMV only)
    num_warps: int = 4


@functools.cache
def default_config(m: int, n: int, k: int, bits: int, group_size: int, multiprocessors: int) -> KernelConfig:
    per = PER_WORD[bits]
    block_k = max(group_size, 256)
    if m == 1:
        block_r = max(1, 32 // per)
        programs = -(-n // (block_r * per))
        split = max(1, min(4 * multiprocessors // programs, k // (4 * block_k)))
        return KernelConfig(1, block_r, block_k, split)
    block_m = 16 if m <= 16 else 64
    return KernelConfig(block_m, max(1, 64 // per), max(group_size, 64), 1)


if AVAILABLE:
    @triton.jit
    def _hqq_matmul_kernel(
        x_ptr, packed_ptr, scale_ptr, zero_ptr, meta_ptr, out_ptr,
        M, N, K, R, RUNS, K_PER_SPLIT,
        stride_xm, stride_om, stride_split,
        BITS: tl.constexpr, PER: tl.constexpr, WORD_BYTES: tl.constexpr, GROUP: tl.constexpr,
        META_GROUP: tl.constexpr, QUANT_META: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        BG: tl.constexpr = BLOCK_K // GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_r, pid_m, pid_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        groups_per_row = K // GROUP

        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                 # packed rows (BLOCK_R,)
        shift = tl.arange(0, PER)                                   # code index in a word (PER,)
        rows = shift[:, None] * R + r[None, :]                      # output rows (PER, BLOCK_R)
        r_ok = r < R
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

        if BLOCK_M == 1:
            acc = tl.zeros((PER, BLOCK_R), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, PER * BLOCK_R), dtype=tl.float32)

        k_begin = pid_split * K_PER_SPLIT
        for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            word_ptr = packed_ptr + r[:, None] * K + kk[None, :]
            word_mask = r_ok[:, None] & k_ok[None, :]
            word = tl.load(word_ptr, mask=word_mask, other=0).to(tl.int32)
            for b in tl.static_range(1, WORD_BYTES):
                word |= tl.load(word_ptr + b * R * K, mask=word_mask, other=0).to(tl.int32) << (8 * b)
            q = (word[None, :, :] >> (shift[:, None, None] * BITS)) & MASK                   # (PER, BLOCK_R, BLOCK_K)
            # int -> float without the slow conversion instruction: the bits of 2^23 + q, minus 2^23 (exact, q < 2^23)
            q = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            q = tl.reshape(q, (PER, BLOCK_R, BG, GROUP))

            g = k0 // GROUP + tl.arange(0, BG)
            group_at = rows[:, :, None] * groups_per_row + g[None, None, :]      # (PER, BLOCK_R, BG)
            group_mask = r_ok[None, :, None] & (g < groups_per_row)[None, None, :]
            scale = tl.load(scale_ptr + group_at, mask=group_mask, other=0).to(tl.float32)
            zero = tl.load(zero_ptr + group_at, mask=group_mask, other=0).to(tl.float32)
            if QUANT_META:
                run = group_at // META_GROUP
                scale = tl.load(meta_ptr + RUNS + run, mask=group_mask, other=0) + \
                    scale * tl.load(meta_ptr + run, mask=group_mask, other=0)
                zero = tl.load(meta_ptr + 3 * RUNS + run, mask=group_mask, other=0) + \
                    zero * tl.load(meta_ptr + 2 * RUNS + run, mask=group_mask, other=0)

            if BLOCK_M == 1:
                x = tl.load(x_ptr + pid_m * stride_xm + kk, mask=k_ok, other=0).to(tl.float32)
                x = tl.reshape(x, (BG, GROUP))
                qx = tl.sum(q * x[None, None, :, :], axis=3)                        # (PER, BLOCK_R, BG)
                x_sum = tl.sum(x, axis=1)                                           # (BG,)
                acc += tl.sum(scale * (qx - zero * x_sum[None, None, :]), axis=2)
            else:
                x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :],
                            mask=(m < M)[:, None] & k_ok[None, :], other=0)
                w = (q - zero[:, :, :, None]) * scale[:, :, :, None]
                w = tl.reshape(w, (PER * BLOCK_R, BLOCK_K)).to(x.dtype)
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)

        out_base = out_ptr + pid_split * stride_split
        if BLOCK_M == 1:
            out_mask = r_ok[None, :] & (rows < N)
            tl.store(out_base + pid_m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            flat_rows = tl.reshape(rows, (PER * BLOCK_R,))
            flat_ok = tl.reshape(r_ok[None, :] & (rows < N), (PER * BLOCK_R,))
            out_mask = (m < M)[:, None] & flat_ok[None, :]
            tl.store(out_base + m[:, None] * stride_om + flat_rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def hqq_linear(x: torch.Tensor, weight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; `config` overrides the default tiling (benchmarks)."""
    n, k = weight.shape
    spec = weight.spec
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    config = config or default_config(m, n, k, spec.bits, spec.group_size, _multiprocessors(x.device))
    per = PER_WORD[spec.bits]
    rows_packed = weight.packed.shape[1]
    meta = weight.meta if weight.meta is not None else weight.scale   # unused without QUANT_META
    runs = weight.meta.shape[-1] if weight.meta is not None else 0

    split = config.split_k if config.block_m == 1 else 1
    k_per_split = -(-k // (split * config.block_k)) * config.block_k
    split = -(-k // k_per_split)
    if split == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(rows_packed, config.block_r), triton.cdiv(m, config.block_m), split)
    _hqq_matmul_kernel[grid](
        x2, weight.packed, weight.scale, weight.zero, meta, out,
        m, n, k, rows_packed, runs, k_per_split,
        x2.stride(0), n, m * n,
        BITS=spec.bits, PER=per, WORD_BYTES=word_bytes(spec.bits), GROUP=spec.group_size,
        META_GROUP=spec.meta_group_size, QUANT_META=weight.meta is not None,
        BLOCK_M=config.block_m, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps,
    )
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*x.shape[:-1], n)
