"""The GEMV's inline-PTX helpers (HFMA2, F2FP, DP4A, SHFL) and their stand-ins for Triton's interpreter.

On the GPU each is one instruction through tl.inline_asm_elementwise; under TRITON_INTERPRET=1 (the CPU tests)
the same sums run on whole tensors. Used by kernel_gemv.py.
"""

from __future__ import annotations

import os


try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: nothing here is defined (weight.py falls back to dequantize-then-matmul)
    AVAILABLE = False

if AVAILABLE:
    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")   # no inline PTX there: _fma2

    # In the interpreter every call of a jitted helper costs far more than its arithmetic (it patches triton.language
    # again), so the helpers below spell out the halves of a pair instead of calling one another.
    @triton.jit
    def _fma2(a, b, c):
        """a * b + c on fp16 pairs (uint32 each): one HFMA2. Triton has no type for a pair, and the compiler
        does not pair the halves of one word by itself; the interpreter runs the same sums half by half."""
        if INTERPRETED:
            low = (a.to(tl.uint16).to(tl.float16, bitcast=True) * b.to(tl.uint16).to(tl.float16, bitcast=True)
                   + c.to(tl.uint16).to(tl.float16, bitcast=True))
            high = ((a >> 16).to(tl.uint16).to(tl.float16, bitcast=True) * (b >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
                    + (c >> 16).to(tl.uint16).to(tl.float16, bitcast=True))
            return low.to(tl.uint16, bitcast=True).to(tl.uint32) | (high.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
        else:
            return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.uint32, is_pure=True, pack=1)

    @triton.jit
    def _fp16_pair_of(low, high):
        """Two fp32 rounded to an fp16 pair: one F2FP."""
        if INTERPRETED:
            return (low.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
                    | (high.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
        else:
            return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [low, high],
                                             dtype=tl.uint32, is_pure=True, pack=1)

    @triton.jit
    def _dp4a(codes, x_bytes, acc):
        """acc + the dot product of codes' four unsigned bytes with x_bytes' four signed ones: one DP4A."""
        if INTERPRETED:
            for i in tl.static_range(4):
                code = ((codes >> (8 * i)) & 0xFF).to(tl.int32)
                x = (x_bytes << (24 - 8 * i)).to(tl.int32, bitcast=True) >> 24
                acc += code * x
            return acc
        else:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [codes, x_bytes, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _lane_exchange(value, source):
        """value (THREADS, 1), 32 bits a thread -> the value of lane `source` ((THREADS, 1)) of each thread's warp:
        one SHFL (the interpreter picks it out of the whole tensor). Element t of a (THREADS, 1) tensor must be
        thread t's (see quantizes_x; GPU tests check the tilings that use this)."""
        if value.dtype == tl.float32:
            return _lane_exchange(value.to(tl.uint32, bitcast=True), source).to(tl.float32, bitcast=True)
        elif INTERPRETED:
            THREADS: tl.constexpr = value.shape[0]
            threads = tl.arange(0, THREADS)[None, :]
            sources = tl.arange(0, THREADS)[:, None] // 32 * 32 + source
            picked = tl.where(threads == sources, tl.reshape(value, (1, THREADS)), 0)
            return tl.sum(picked, axis=1, keep_dims=True)
        else:
            return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=r,r,r", [value, source],
                                             dtype=value.dtype, is_pure=True, pack=1)

    @triton.jit
    def _from_lane(value, lane: tl.constexpr):
        """value (THREADS, 1) -> the value of lane `lane` of each thread's warp."""
        return _lane_exchange(value, tl.full(value.shape, lane, tl.int32))

    @triton.jit
    def _group_reduce(value, lane, LANES: tl.constexpr, MAXIMUM: tl.constexpr):
        """The maximum (else the sum) of fp32 `value` over each run of LANES lanes, in every lane of the run: a
        butterfly of SHFLs."""
        for step in tl.static_range(5):
            if (1 << step) < LANES:
                other = _lane_exchange(value, lane ^ (1 << step))
                value = tl.maximum(value, other) if MAXIMUM else value + other
        return value
