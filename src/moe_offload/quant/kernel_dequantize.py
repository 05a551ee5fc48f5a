"""The dequantize kernel: a packed (N, K) weight -> its transposed (K, N) matrix, for cuBLAS (prefill, and groups
the GEMV does not tile); and the scale-and-zero decoding it shares with the GEMV (kernel_gemv.py).
"""

from __future__ import annotations


try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: nothing here is defined (weight.py falls back to dequantize-then-matmul)
    AVAILABLE = False

if AVAILABLE:
    @triton.jit
    def _meta(meta_ptr, run):
        """The (scale step, scale min, zero step, zero min) of meta runs `run`: a tuple, from one 16-byte load a run
        (the meta is (runs, [scale, zero], [step, min]))."""
        fields = tl.load(meta_ptr + tl.expand_dims(4 * run, len(run.shape)) + tl.arange(0, 4))
        pairs = tl.reshape(fields, fields.shape[:-1] + [2, 2])       # [scale, zero], [step, min]
        steps, minimums = tl.split(pairs)
        scale_step, zero_step = tl.split(steps)
        scale_min, zero_min = tl.split(minimums)
        return scale_step, scale_min, zero_step, zero_min

    @triton.jit
    def _decode(code, meta, first: tl.constexpr, QUANT_META: tl.constexpr):
        """A scale or zero as fp32 `value * step + min`: an 8-bit code (one I2F.U8, which picks the code's byte
        out of its word) with its run's step and min, or an fp16 value with step 1 and min 0. Returns (value,
        step, min)."""
        if QUANT_META:
            return code.to(tl.float32), meta[first], meta[first + 1]
        else:       # (Triton wants both returns in branches of the same constexpr if)
            return code.to(tl.float32), 1.0, 0.0

    @triton.jit
    def _decoded(code, meta, first: tl.constexpr, QUANT_META: tl.constexpr):
        """A scale or zero as fp32."""
        value, step, minimum = _decode(code, meta, first, QUANT_META)
        return value * step + minimum


    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, meta_ptr, out_ptr, N, NP, WORDS,
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
            meta = _meta(meta_ptr, (g * NP + tl.minimum(rows, NP - 1)) // META_GROUP)
        scale = _decoded(tl.load(s_ptr + at, mask=ok, other=0), meta, 0, QUANT_META)
        zero = _decoded(tl.load(z_ptr + at, mask=ok, other=0), meta, 2, QUANT_META)
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
