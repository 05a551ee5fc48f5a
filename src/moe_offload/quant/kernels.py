"""HQQ matrix products on the GPU, in Triton (an optional, GPU-only dependency).

    y = hqq_linear(x, weight)          # x (..., K) on CUDA, weight a QuantizedWeight there -> (..., N)

Decode (one row of x) is a fused dequantize-and-multiply GEMV. A thread owns a few consecutive
output rows (KernelConfig.rows_per_thread); their words (pack.py: each row's codes along K, words
stored with the rows innermost) arrive in one vector load per word, and x is the same for every
thread, so a group's dot products stay in the thread's registers. Each code costs three
instructions: a LOP3 that keeps the code and ORs in an exponent chosen so that the code's
lowest bit weighs 1 (the float is then 2^m + code, exact), an FADD that takes 2^m away (an
int -> float conversion without the slow instruction), and an FFMA with x_k. Codes sit at most at
bit 15 of a 32-bit window (the word, or the word shifted by 16 bits, or two words' halves for a
3-bit code that straddles them), so every code fits the float's 23-bit mantissa. Per group a thread
then adds s (sum_k q_k x_k - z sum_k x_k), decoding each row's 8-bit scale and zero once. A
thread loads the next group's words, scales and zeros before it works on the current group, so
the loads' latency hides behind the arithmetic.

The input dimension is shared by SPLITS programs per block of rows (a Mixtral expert matrix has
4096-14336 rows: too few threads to fill the GPU). The programs write fp32 partial sums; the last
one to finish (an atomic counter) adds them in a fixed order, so a call is one kernel and the
same input gives the same bits.

Up to MAX_GEMV_ROWS rows of x (batched decode) share one GEMV: each code is decoded once and
multiplied into every row's sums. More rows (prefill), and groups the GEMV does not tile (3-bit
groups of 16 codes end mid-word), dequantize the matrix with a second kernel and use cuBLAS,
whose tensor cores then win.

Checked on the CPU with TRITON_INTERPRET=1 (tests/test_quant_kernels.py) and timed on the GPU by
benchmarks/quant_kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: weight.py falls back to dequantize-then-matmul
    AVAILABLE = False

MAGIC = 0x4B000000          # the bits of 2^23: with a code ORed into the mantissa, 2^23 + code
MAX_GEMV_ROWS = 8           # more rows of x than this: dequantize, then cuBLAS
SPLIT_COLUMNS = 128         # input columns a program covers by default


@dataclass(frozen=True)
class KernelConfig:
    rows_per_thread: int    # consecutive output rows a thread owns (one vector load of words)
    warps: int              # warps per program, each on its own rows
    groups_per_split: int   # quantization groups each program sums before the programs' partials are added


def default_config(group_size: int) -> KernelConfig:
    """4 rows a thread, 4 warps, SPLIT_COLUMNS input columns a program: the best tilings of
    benchmarks/quant_kernels.py's sweep on an H200 for groups of 16 and 64."""
    return KernelConfig(4, 4, max(1, SPLIT_COLUMNS // group_size))


def codes_per_step(bits: int) -> int:
    """Codes the GEMV decodes from one run of whole words: 16 (1, 2 or 4 words), or 32 in 3 words at 3 bits."""
    return 32 if bits == 3 else 16


def gemv_tiles(bits: int, group_size: int) -> bool:
    """Whether a group is a whole number of the GEMV's steps (not so for 3-bit groups of 16)."""
    return group_size % codes_per_step(bits) == 0


if AVAILABLE:
    @triton.jit
    def _code(words, first: tl.constexpr, c: tl.constexpr, magic, BITS: tl.constexpr):
        """Code c of the stream that starts at words[first] -> fp32, exact; words: tuple of uint32 tensors."""
        MASK: tl.constexpr = (1 << BITS) - 1
        WORD: tl.constexpr = first + c * BITS // 32
        BIT: tl.constexpr = c * BITS % 32
        if BIT + BITS <= 23:
            window = words[WORD]
            POS: tl.constexpr = BIT
        elif BIT + BITS > 32:      # 3 bits: the code straddles two words
            window = (words[WORD] >> 16) | (words[WORD + 1] << 16)
            POS: tl.constexpr = BIT - 16
        else:
            window = words[WORD] >> 16
            POS: tl.constexpr = BIT - 16
        # the exponent of 2^(23 - POS), from `magic` at run time so that the compiler keeps the OR
        # and the AND in one LOP3 instead of materialising a second constant for every code
        exponent = (magic - (POS << 23)).to(tl.uint32, bitcast=True)
        OFFSET: tl.constexpr = float(2 ** (23 - POS))
        return ((window & (MASK << POS)) | exponent).to(tl.float32, bitcast=True) - OFFSET

    @triton.jit
    def _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, g, first_row, rows, ok, NP, RUNS,
               BITS: tl.constexpr, GROUP: tl.constexpr, META_GROUP: tl.constexpr, QUANT_META: tl.constexpr,
               ROWS_PER_THREAD: tl.constexpr):
        """What group g's sums read from memory: its words (a tuple), scale and zero codes, and meta."""
        first_word = g * (GROUP * BITS // 32)
        words = ()
        for i in tl.static_range(GROUP * BITS // 32):
            words = words + (tl.load(w_ptr + (first_word + i) * NP + rows, mask=ok, other=0).to(tl.uint32, bitcast=True),)
        at = g * NP + rows
        scale = tl.load(s_ptr + at, mask=ok, other=0)
        zero = tl.load(z_ptr + at, mask=ok, other=0)
        meta = ()
        if QUANT_META:
            if META_GROUP % ROWS_PER_THREAD == 0:
                run = ((g * NP + first_row) // META_GROUP)[:, None]      # a thread's rows share one run
            else:
                run = (g * NP + rows) // META_GROUP
            meta = _meta(meta_ptr, run, RUNS)
        return words, scale, zero, meta

    @triton.jit
    def _meta(meta_ptr, run, RUNS):
        """The (scale step, scale min, zero step, zero min) of meta runs `run`: a tuple."""
        return (tl.load(meta_ptr + run), tl.load(meta_ptr + RUNS + run),
                tl.load(meta_ptr + 2 * RUNS + run), tl.load(meta_ptr + 3 * RUNS + run))

    @triton.jit
    def _decode(code, meta, first: tl.constexpr, magic, QUANT_META: tl.constexpr):
        """A scale or zero as fp32: an 8-bit code times its run's step plus min, or fp16 as it is."""
        if QUANT_META:
            return ((code.to(tl.int32) | magic).to(tl.float32, bitcast=True) - 8388608.0) * meta[first] + meta[first + 1]
        else:
            return code.to(tl.float32)

    @triton.jit
    def _splat(value, X_ROWS: tl.constexpr):
        """(value,) * X_ROWS: one per row of x."""
        values = ()
        for _ in tl.static_range(X_ROWS):
            values = values + (value,)
        return values

    @triton.jit
    def _group_sums(words, x_ptr, g, K, magic, zeros, BITS: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr,
                    X_ROWS: tl.constexpr):
        """For each row m of x: (sum_k q_k x_mk over group g, (THREADS, ROWS)), and sum_k x_mk: two tuples."""
        STEP_WORDS: tl.constexpr = STEP * BITS // 32
        dots = _splat(zeros, X_ROWS)
        x_sums = _splat(0.0, X_ROWS)
        for step in tl.static_range(GROUP // STEP):
            for c in tl.static_range(STEP):
                k = g * GROUP + step * STEP + c
                q = _code(words, step * STEP_WORDS, c, magic, BITS)      # decoded once, used by every row of x
                new_dots = ()
                new_sums = ()
                for m in tl.static_range(X_ROWS):
                    xk = tl.load(x_ptr + m * K + k).to(tl.float32)
                    new_dots = new_dots + (dots[m] + q * xk,)
                    new_sums = new_sums + (x_sums[m] + xk,)
                dots, x_sums = new_dots, new_sums
        return dots, x_sums

    @triton.jit
    def _sum_partials(partial_ptr, rows, ok, SPLITS, STRIDE, BATCH: tl.constexpr):
        """The programs' partial sums at `rows` (one per STRIDE elements), BATCH loads in flight at a time,
        added in a fixed order."""
        total = tl.zeros(rows.shape, dtype=tl.float32)
        for first in range(0, SPLITS, BATCH):
            for i in tl.static_range(BATCH):
                split_ok = ok & (tl.full(rows.shape, first + i, tl.int32) < SPLITS)
                total += tl.load(partial_ptr + (first + i) * STRIDE + rows, mask=split_ok, other=0, cache_modifier=".cg")
        return total

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, meta_ptr, partial_ptr, count_ptr, out_ptr, magic,
        N, K, NP, RUNS, GROUPS, GROUPS_PER_SPLIT, SPLITS,
        BITS: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr, META_GROUP: tl.constexpr,
        QUANT_META: tl.constexpr, X_ROWS: tl.constexpr, ROWS_PER_THREAD: tl.constexpr, THREADS: tl.constexpr,
        SPLIT_BATCH: tl.constexpr,
    ):
        pid_rows, pid_split = tl.program_id(0), tl.program_id(1)
        first_row = (pid_rows * THREADS + tl.arange(0, THREADS)) * ROWS_PER_THREAD                 # (THREADS,)
        rows = first_row[:, None] + tl.arange(0, ROWS_PER_THREAD)[None, :]                         # (THREADS, ROWS)
        ok = rows < NP
        g0 = pid_split * GROUPS_PER_SPLIT
        g1 = tl.minimum(g0 + GROUPS_PER_SPLIT, GROUPS)
        zeros = tl.zeros((THREADS, ROWS_PER_THREAD), dtype=tl.float32)
        acc = _splat(zeros, X_ROWS)
        ahead = _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, g0, first_row, rows, ok, NP, RUNS,
                       BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD)
        for g in range(g0, g1):
            words, scale, zero, meta = ahead
            ahead = _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, tl.minimum(g + 1, g1 - 1), first_row, rows, ok, NP, RUNS,
                           BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD)
            dots, x_sums = _group_sums(words, x_ptr, g, K, magic, zeros, BITS, GROUP, STEP, X_ROWS)
            scale = _decode(scale, meta, 0, magic, QUANT_META)
            zero = _decode(zero, meta, 2, magic, QUANT_META)
            new_acc = ()
            for m in tl.static_range(X_ROWS):
                new_acc = new_acc + (acc[m] + scale * (dots[m] - zero * x_sums[m]),)
            acc = new_acc

        if SPLITS == 1:
            for m in tl.static_range(X_ROWS):
                tl.store(out_ptr + m * N + rows, acc[m].to(out_ptr.dtype.element_ty), mask=rows < N)
        else:
            for m in tl.static_range(X_ROWS):        # partial sums (SPLITS, X_ROWS, NP)
                tl.store(partial_ptr + (pid_split * X_ROWS + m) * NP + rows, acc[m], mask=ok)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid_rows, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                for m in tl.static_range(X_ROWS):
                    total = _sum_partials(partial_ptr + m * NP, rows, ok, SPLITS, X_ROWS * NP, SPLIT_BATCH)
                    tl.store(out_ptr + m * N + rows, total.to(out_ptr.dtype.element_ty), mask=rows < N)
                tl.atomic_xchg(count_ptr + pid_rows, 0)    # ready for the next call

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, meta_ptr, out_ptr, magic, N, NP, WORDS, RUNS,
                           BITS: tl.constexpr, GROUP: tl.constexpr, META_GROUP: tl.constexpr,
                           QUANT_META: tl.constexpr, BLOCK_N: tl.constexpr):
        """One group of input columns for BLOCK_N rows -> out (K, N), the transposed weight, 16 columns at a time."""
        MASK: tl.constexpr = (1 << BITS) - 1
        g = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = rows < NP
        at = g * NP + rows
        meta = ()
        if QUANT_META:
            meta = _meta(meta_ptr, (g * NP + tl.minimum(rows, NP - 1)) // META_GROUP, RUNS)
        scale = _decode(tl.load(s_ptr + at, mask=ok, other=0), meta, 0, magic, QUANT_META)
        zero = _decode(tl.load(z_ptr + at, mask=ok, other=0), meta, 2, magic, QUANT_META)
        for first in tl.static_range(0, GROUP, 16):
            k = g * GROUP + first + tl.arange(0, 16)
            word, bit = k * BITS // 32, (k * BITS % 32).to(tl.uint64)
            low = tl.load(w_ptr + word[:, None] * NP + rows[None, :], mask=ok[None, :], other=0)
            # the last word has no next one; its codes do not straddle, so any word will do there
            high = tl.load(w_ptr + tl.minimum(word + 1, WORDS - 1)[:, None] * NP + rows[None, :], mask=ok[None, :], other=0)
            pair = low.to(tl.uint32, bitcast=True).to(tl.uint64) | (high.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            q = ((pair >> bit[:, None]) & MASK).to(tl.float32)
            tl.store(out_ptr + k[:, None] * N + rows[None, :], ((q - zero[None, :]) * scale[None, :]).to(out_ptr.dtype.element_ty),
                     mask=(rows < N)[None, :])


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


def hqq_gemv(x: torch.Tensor, weight, out: torch.Tensor, config: KernelConfig | None = None) -> None:
    """out (M, N) = x (M, K) @ weight.T for 1 to MAX_GEMV_ROWS rows, in out's dtype; x and out contiguous."""
    rows_of_x = x.shape[0]
    n, k = weight.shape
    spec = weight.spec
    config = config or default_config(spec.group_size)
    groups = k // spec.group_size
    splits = -(-groups // config.groups_per_split)
    threads = 32 * config.warps
    padded = weight.padded_rows
    blocks = -(-padded // (threads * config.rows_per_thread))
    meta, runs = _meta_args(weight)
    partial = torch.empty((splits, rows_of_x, padded) if splits > 1 else (1,), device=x.device, dtype=torch.float32)
    _gemv_kernel[(blocks, splits)](
        x, weight.packed, weight.scale, weight.zero, meta, partial, _counters(x.device, blocks), out, MAGIC,
        n, k, padded, runs, groups, config.groups_per_split, splits,
        BITS=spec.bits, GROUP=spec.group_size, STEP=codes_per_step(spec.bits), META_GROUP=spec.meta_group_size,
        QUANT_META=weight.meta is not None, X_ROWS=rows_of_x, ROWS_PER_THREAD=config.rows_per_thread,
        THREADS=threads, SPLIT_BATCH=8, num_warps=config.warps,
    )


def dequantize_transposed(weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a (K, N) matrix in `dtype`, by the dequantize kernel."""
    n, k = weight.shape
    spec = weight.spec
    meta, runs = _meta_args(weight)
    out = torch.empty((k, n), device=weight.packed.device, dtype=dtype)
    block_n = 128
    _dequantize_kernel[(k // spec.group_size, triton.cdiv(weight.padded_rows, block_n))](
        weight.packed, weight.scale, weight.zero, meta, out, MAGIC, n, weight.padded_rows, weight.packed.shape[0], runs,
        BITS=spec.bits, GROUP=spec.group_size, META_GROUP=spec.meta_group_size, QUANT_META=weight.meta is not None,
        BLOCK_N=block_n,
    )
    return out


def hqq_linear(x: torch.Tensor, weight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype; `config` overrides the GEMV's default tiling (benchmarks)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] <= MAX_GEMV_ROWS and gemv_tiles(weight.spec.bits, weight.spec.group_size):
        out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
        hqq_gemv(x2, weight, out, config)
    else:
        out = x2 @ dequantize_transposed(weight, x2.dtype)
    return out.view(*x.shape[:-1], n)
