"""HQQ matrix products on the GPU, in Triton (an optional, GPU-only dependency).

    y = hqq_linear(x, weight)          # x (..., K) on CUDA, weight a QuantizedWeight there -> (..., N)

Decode (one row of x) is a fused dequantize-and-multiply GEMV, built so that each quantized
weight costs three instructions: a LOP3 that keeps one code and ORs in the exponent of 2^23, an
FADD that takes 2^23 away (int -> float without the slow conversion instruction; the code
comes out as q * 2^pos, exact), and an FFMA with x_k. The layout (pack.py) makes this possible:
a word holds 16 / 10 / 8 / 4 rows of one input column, words are stored k-major, and a thread
owns 1 to 4 consecutive packed rows, so it reads one x_k per word and keeps every sum over a
group's k inside its registers; per group it then adds s (sum_k q_k x_k - z sum_k x_k), decoding the
8-bit scale and zero once per group and row.

The input dimension is shared by the warps of a program and by SPLITS programs per block of
rows (enough warps to fill the GPU: a Mixtral expert matrix has only 256-1792 packed rows).
The warps add up through shared memory; the programs write fp32 partial sums, and the last one
to finish (an atomic counter) adds them in a fixed order, so a call is one kernel and the same
input gives the same bits.

Up to MAX_GEMV_ROWS rows of x run the GEMV once per row; more (batched decode, prefill)
dequantize the matrix with a second kernel and use cuBLAS, whose tensor cores then win.

Checked on the CPU with TRITON_INTERPRET=1 (tests/test_quant_kernels.py) and timed on the GPU by
benchmarks/quant_kernels.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .pack import PER_WORD

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: weight.py falls back to dequantize-then-matmul
    AVAILABLE = False

MAGIC = 0x4B000000          # the bits of 2^23: OR-ing a code into its mantissa gives 2^23 + code
MAX_GEMV_ROWS = 4           # more rows of x than this: dequantize, then cuBLAS


@dataclass(frozen=True)
class KernelConfig:
    block_r: int           # packed rows per program: 128, 64 or 32 (4, 2 or 1 per thread)
    warps: int             # warps per program, each on its own range of groups
    groups_per_warp: int   # quantization groups each warp sums before the programs' partials are added


@dataclass(frozen=True)
class Segments:
    """A word's codes as at most three runs of slots, each at most 16 bits wide after a shift (so
    every code sits below the float mantissa's 23 bits), with a power-of-two number of slots."""

    slots: int           # in the first two segments
    second_shift: int    # where the second segment starts
    tail: int            # slots in a third segment at bit 24 (3 bits: slots 8 and 9), else 0


SEGMENTS = {2: Segments(8, 16, 0), 3: Segments(4, 12, 2), 4: Segments(4, 16, 0), 8: Segments(2, 16, 0)}


@functools.cache
def default_config(k: int, group_size: int) -> KernelConfig:
    """One packed row per thread and one group per warp, 8 warps a program for groups of 16 and 4
    for larger ones: the best tilings of benchmarks/quant_kernels.py's sweep on an H200."""
    warps = min(8 if group_size == 16 else 4, k // group_size)
    return KernelConfig(32, 1 << (warps.bit_length() - 1), 1)


if AVAILABLE:
    MAGIC_BITS = tl.constexpr(MAGIC)

    @triton.jit
    def _codes(word, magic, SHIFT: tl.constexpr, SLOTS: tl.constexpr, BITS: tl.constexpr):
        """words (W, BLOCK_R) -> codes of slots at bits SHIFT + i * BITS, as floats q * 2^(i * BITS): (SLOTS, W, BLOCK_R)."""
        MASK: tl.constexpr = (1 << BITS) - 1
        keep = (MASK << (tl.arange(0, SLOTS) * BITS)) | MAGIC_BITS
        # `magic` arrives as an argument so that the compiler cannot fold the two ORs into one
        # LOP3 with two constants (it would spend a MOV on every code)
        return (((word >> SHIFT) | magic)[None, :, :] & keep[:, None, None]).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _word_at(k, r, R, TILE: tl.constexpr):
        """Offsets of words (k, r) in pack.py's tiles of 16 columns by TILE rows; k (A, 1), r (1, B) -> (A, B)."""
        return ((k // 16) * (R // TILE) + r // TILE) * (16 * TILE) + (k % 16) * TILE + r % TILE

    @triton.jit
    def _runs(g, r, pid_r, slots, R, ROWS, META_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, RUN_PER_BLOCK: tl.constexpr):
        """The meta run of each (slot, warp's group, row): (S, W, 1) when one run covers the block of rows."""
        if RUN_PER_BLOCK:
            return ((slots[:, None] * R + (g * ROWS + pid_r * BLOCK_R)[None, :]) // META_GROUP)[:, :, None]
        else:
            return (slots[:, None, None] * R + g[None, :, None] * ROWS + r[None, None, :]) // META_GROUP

    @triton.jit
    def _scale_and_zero(at, s_ptr, z_ptr, meta_ptr, run, RUNS, QUANT_META: tl.constexpr, r_ok):
        """The fp32 scales and zeros at `at` (8-bit codes decoded with their run's step and min)."""
        ok = r_ok[None, None, :]
        if QUANT_META:
            scale = tl.load(s_ptr + at, mask=ok, other=0).to(tl.int32)
            zero = tl.load(z_ptr + at, mask=ok, other=0).to(tl.int32)
            scale = ((scale | MAGIC_BITS).to(tl.float32, bitcast=True) - 8388608.0) * tl.load(meta_ptr + run) + \
                tl.load(meta_ptr + RUNS + run)
            zero = ((zero | MAGIC_BITS).to(tl.float32, bitcast=True) - 8388608.0) * tl.load(meta_ptr + 2 * RUNS + run) + \
                tl.load(meta_ptr + 3 * RUNS + run)
        else:
            scale = tl.load(s_ptr + at, mask=ok, other=0).to(tl.float32)
            zero = tl.load(z_ptr + at, mask=ok, other=0).to(tl.float32)
        return scale, zero

    @triton.jit
    def _scaled(acc, p, xs, scale, zero, SLOTS: tl.constexpr, BITS: tl.constexpr):
        """acc + s (p / 2^pos - z xs) for one segment; p, scale, zero (SLOTS, W, BLOCK_R), xs (W,)."""
        pos = (1 << (tl.arange(0, SLOTS) * BITS)).to(tl.float32)
        return acc + (scale / pos[:, None, None]) * (p - zero * (pos[:, None] * xs[None, :])[:, :, None])

    @triton.jit
    def _sum_partials(partial_ptr, rows, r_ok, SPLITS, ROWS_PADDED, BATCH: tl.constexpr):
        """sum over the programs' partial sums at `rows` (S, BLOCK_R), BATCH at a time, in a fixed order."""
        total = tl.zeros(rows.shape, dtype=tl.float32)
        batch = tl.arange(0, BATCH)
        for first in range(0, SPLITS, BATCH):
            split = first + batch
            at = partial_ptr + split[:, None, None] * ROWS_PADDED + rows[None, :, :]
            ok = (split < SPLITS)[:, None, None] & r_ok[None, None, :]
            total += tl.sum(tl.load(at, mask=ok, other=0, cache_modifier=".cg"), axis=0)
        return total

    @triton.jit
    def _store_out(out_ptr, rows0, rows1, rows2, y0, y1, y2, N, r_ok, TAIL: tl.constexpr):
        """The three segments' sums (slots, BLOCK_R) into the output rows below N, in the output's dtype."""
        tl.store(out_ptr + rows0, y0.to(out_ptr.dtype.element_ty), mask=(rows0 < N) & r_ok[None, :])
        tl.store(out_ptr + rows1, y1.to(out_ptr.dtype.element_ty), mask=(rows1 < N) & r_ok[None, :])
        if TAIL > 0:
            tl.store(out_ptr + rows2, y2.to(out_ptr.dtype.element_ty), mask=(rows2 < N) & r_ok[None, :])

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, meta_ptr, partial_ptr, count_ptr, out_ptr, magic,
        N, K, R, ROWS, RUNS, GROUPS_PER_WARP, SPLITS,
        BITS: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, META_GROUP: tl.constexpr,
        QUANT_META: tl.constexpr, RUN_PER_BLOCK: tl.constexpr,
        SLOTS: tl.constexpr, SHIFT1: tl.constexpr, TAIL: tl.constexpr,
        TILE: tl.constexpr, BLOCK_R: tl.constexpr, WARPS: tl.constexpr, SPLIT_BATCH: tl.constexpr,
    ):
        PER: tl.constexpr = 32 // BITS
        TAIL_SLOTS: tl.constexpr = TAIL if TAIL > 0 else 1      # tensors need a size; unused without a tail
        pid_r, pid_split = tl.program_id(0), tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < R
        warp = tl.arange(0, WARPS)
        first_group = (pid_split * WARPS + warp) * GROUPS_PER_WARP                  # (W,)
        slot = tl.arange(0, SLOTS)
        tail = 2 * SLOTS + tl.arange(0, TAIL_SLOTS)

        # (slots, warps, rows): the warps then fall on the warps axis, and a thread keeps every slot of its rows
        acc0 = tl.zeros((SLOTS, WARPS, BLOCK_R), dtype=tl.float32)
        acc1 = tl.zeros((SLOTS, WARPS, BLOCK_R), dtype=tl.float32)
        acc2 = tl.zeros((TAIL_SLOTS, WARPS, BLOCK_R), dtype=tl.float32)
        for i in range(GROUPS_PER_WARP):
            g = first_group + i                                                          # (W,)
            g_ok = g * GROUP < K
            g_safe = tl.where(g_ok, g, 0)
            # the group's scales and zeros first, so that their loads wait alongside the words'
            base = (g_safe[None, :, None] * (R // 4) + r[None, None, :] // 4) * PER
            at0 = (base + slot[:, None, None]) * 4 + r[None, None, :] % 4
            s0, z0 = _scale_and_zero(at0, s_ptr, z_ptr, meta_ptr,
                                     _runs(g_safe, r, pid_r, slot, R, ROWS, META_GROUP, BLOCK_R, RUN_PER_BLOCK),
                                     RUNS, QUANT_META, r_ok)
            s1, z1 = _scale_and_zero(at0 + 4 * SLOTS, s_ptr, z_ptr, meta_ptr,
                                     _runs(g_safe, r, pid_r, slot + SLOTS, R, ROWS, META_GROUP, BLOCK_R, RUN_PER_BLOCK),
                                     RUNS, QUANT_META, r_ok)
            if TAIL > 0:
                s2, z2 = _scale_and_zero((base + tail[:, None, None]) * 4 + r[None, None, :] % 4, s_ptr, z_ptr, meta_ptr,
                                         _runs(g_safe, r, pid_r, tail, R, ROWS, META_GROUP, BLOCK_R, RUN_PER_BLOCK),
                                         RUNS, QUANT_META, r_ok)
            # sums over the group, started from the accumulators so that they take their layout
            p0, p1, p2 = acc0 * 0.0, acc1 * 0.0, acc2 * 0.0
            xs = tl.zeros((WARPS,), dtype=tl.float32)
            for c in range(0, GROUP, CHUNK):
                for j in tl.static_range(CHUNK):
                    k = g * GROUP + c + j                                                # (W,)
                    word = tl.load(w_ptr + _word_at(k[:, None], r[None, :], R, TILE), mask=g_ok[:, None] & r_ok[None, :],
                                   other=0)
                    xk = tl.load(x_ptr + k, mask=g_ok, other=0).to(tl.float32)
                    xs += xk
                    p0 += _codes(word, magic, 0, SLOTS, BITS) * xk[None, :, None]
                    p1 += _codes(word, magic, SHIFT1, SLOTS, BITS) * xk[None, :, None]
                    if TAIL > 0:
                        p2 += _codes(word, magic, 24, TAIL, BITS) * xk[None, :, None]
            acc0 = _scaled(acc0, p0, xs, s0, z0, SLOTS, BITS)
            acc1 = _scaled(acc1, p1, xs, s1, z1, SLOTS, BITS)
            if TAIL > 0:
                acc2 = _scaled(acc2, p2, xs, s2, z2, TAIL, BITS)

        rows0 = slot[:, None] * R + r[None, :]                                          # (SLOTS, BLOCK_R)
        rows1 = rows0 + SLOTS * R
        rows2 = tail[:, None] * R + r[None, :]
        sum0, sum1, sum2 = tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1)
        if SPLITS == 1:
            _store_out(out_ptr, rows0, rows1, rows2, sum0, sum1, sum2, N, r_ok, TAIL)
        else:
            # each program writes its partial sums; the last of a block of rows adds them in order
            ROWS_PADDED = R * PER
            mine = partial_ptr + pid_split * ROWS_PADDED
            tl.store(mine + rows0, sum0, mask=r_ok[None, :])
            tl.store(mine + rows1, sum1, mask=r_ok[None, :])
            if TAIL > 0:
                tl.store(mine + rows2, sum2, mask=r_ok[None, :])
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid_r, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                total0 = _sum_partials(partial_ptr, rows0, r_ok, SPLITS, ROWS_PADDED, SPLIT_BATCH)
                total1 = _sum_partials(partial_ptr, rows1, r_ok, SPLITS, ROWS_PADDED, SPLIT_BATCH)
                total2 = sum2 * 0.0
                if TAIL > 0:
                    total2 = _sum_partials(partial_ptr, rows2, r_ok, SPLITS, ROWS_PADDED, SPLIT_BATCH)
                _store_out(out_ptr, rows0, rows1, rows2, total0, total1, total2, N, r_ok, TAIL)
                tl.atomic_xchg(count_ptr + pid_r, 0)    # ready for the next call

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, meta_ptr, out_ptr, N, K, R, ROWS, RUNS,
                           BITS: tl.constexpr, GROUP: tl.constexpr, META_GROUP: tl.constexpr,
                           QUANT_META: tl.constexpr, TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """One (BLOCK_K, BLOCK_R) tile of words, inside one group -> out (K, N) (the transposed weight), all slots."""
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        k0 = tl.program_id(0) * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < R
        word = tl.load(w_ptr + _word_at(k[:, None], r[None, :], R, TILE), mask=r_ok[None, :], other=0)
        g = k0 // GROUP
        for s in tl.static_range(PER):
            at = ((g * (R // 4) + r // 4) * PER + s) * 4 + r % 4                        # (BLOCK_R,)
            if QUANT_META:
                run = (g * ROWS + s * R + r) // META_GROUP
                scale = tl.load(s_ptr + at, mask=r_ok, other=0).to(tl.float32) * tl.load(meta_ptr + run, mask=r_ok, other=0) + \
                    tl.load(meta_ptr + RUNS + run, mask=r_ok, other=0)
                zero = tl.load(z_ptr + at, mask=r_ok, other=0).to(tl.float32) * tl.load(meta_ptr + 2 * RUNS + run, mask=r_ok, other=0) + \
                    tl.load(meta_ptr + 3 * RUNS + run, mask=r_ok, other=0)
            else:
                scale = tl.load(s_ptr + at, mask=r_ok, other=0).to(tl.float32)
                zero = tl.load(z_ptr + at, mask=r_ok, other=0).to(tl.float32)
            q = ((word >> (s * BITS)) & MASK).to(tl.float32)
            row = s * R + r
            tl.store(out_ptr + k[:, None] * N + row[None, :], ((q - zero[None, :]) * scale[None, :]).to(out_ptr.dtype.element_ty),
                     mask=(row < N)[None, :] & r_ok[None, :])


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, blocks: int) -> torch.Tensor:
    """Zeroed int32 counters, one per block of rows, that every GEMV leaves zeroed again.
    Kernels that share them must run in order (one stream), as the model's matmuls do."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < blocks:
        counters = _COUNTERS[device] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=device)
    return counters


def _meta_args(weight) -> tuple[torch.Tensor, int]:
    if weight.meta is None:
        return weight.scale, 0           # not read without QUANT_META
    return weight.meta, weight.meta.shape[-1]


def hqq_gemv(x: torch.Tensor, weight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (K,) -> (N,) in x's dtype."""
    n, k = weight.shape
    spec = weight.spec
    rows = weight.packed_rows
    config = config or default_config(k, spec.group_size)
    groups = k // spec.group_size
    splits = -(-groups // (config.warps * config.groups_per_warp))
    blocks = -(-rows // config.block_r)
    meta, runs = _meta_args(weight)
    segments = SEGMENTS[spec.bits]
    padded_rows = rows * PER_WORD[spec.bits]
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    partial = torch.empty((splits, padded_rows) if splits > 1 else (1,), device=x.device, dtype=torch.float32)
    run_per_block = spec.meta_group_size % config.block_r == 0 and rows % config.block_r == 0
    _gemv_kernel[(blocks, splits)](
        x, weight.packed, weight.scale, weight.zero, meta, partial, _counters(x.device, blocks), out, MAGIC,
        n, k, rows, padded_rows, runs, config.groups_per_warp, splits,
        BITS=spec.bits, GROUP=spec.group_size, CHUNK=min(spec.group_size, 16), META_GROUP=spec.meta_group_size,
        QUANT_META=weight.meta is not None, RUN_PER_BLOCK=run_per_block,
        SLOTS=segments.slots, SHIFT1=segments.second_shift, TAIL=segments.tail,
        TILE=weight.packed.shape[3], BLOCK_R=config.block_r, WARPS=config.warps, SPLIT_BATCH=16, num_warps=config.warps,
    )
    return out


def dequantize_transposed(weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a (K, N) matrix in `dtype`, by the dequantize kernel."""
    n, k = weight.shape
    spec = weight.spec
    rows = weight.packed_rows
    meta, runs = _meta_args(weight)
    out = torch.empty((k, n), device=weight.packed.device, dtype=dtype)
    block_k, block_r = 16, 128          # block_k divides every group size
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(rows, block_r))](
        weight.packed, weight.scale, weight.zero, meta, out, n, k, rows, rows * PER_WORD[spec.bits], runs,
        BITS=spec.bits, GROUP=spec.group_size, META_GROUP=spec.meta_group_size, QUANT_META=weight.meta is not None,
        TILE=weight.packed.shape[3], BLOCK_K=block_k, BLOCK_R=block_r,
    )
    return out


def hqq_linear(x: torch.Tensor, weight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; `config` overrides the GEMV's default tiling (benchmarks)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= MAX_GEMV_ROWS:
        out = torch.stack([hqq_gemv(row, weight, config) for row in x2])
    else:
        out = x2 @ dequantize_transposed(weight, x2.dtype)
    return out.view(*x.shape[:-1], n)
