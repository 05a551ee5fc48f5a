"""HQQ matrix products on the GPU, in Triton (an optional, GPU-only dependency).

    y = hqq_linear(x, weight)          # x (..., K) on CUDA, weight a QuantizedWeight there -> (..., N)

Decode (one row of x) is a fused dequantize-and-multiply GEMV. A thread owns a few consecutive
output rows (KernelConfig.rows_per_thread); their words (pack.py: each row's codes along K, words
stored with the rows innermost) arrive in one vector load per word, and x is the same for every
thread, so a group's dot products stay in the thread's registers.

For one row of x (at 3 bits in groups of at most 64) the sums are in integers (_group_int_sums). Each warp
first quantizes its own columns of x, its lanes together (_quantize_x), per group in steps of 1/127 of the
group's largest |x|. At 2 bits x_k takes one byte (x_bytes): an int8, as llama.cpp's q8_1 activations but in
the weight's groups, about 2^-8 of the group's largest |x|; elsewhere two: x_k = scale (254 high_k + low_k),
high_k and low_k int8 (low_k the rest in 254ths: about 2^-16 of the group's largest |x|, finer than bf16's own
rounding for all but its smallest values). A word's codes are then planes of four codes a byte each, dotted
with the matching bytes of x by one DP4A each, exactly in int32: a lane holds the four x_k of one plane, and
shuffles (SHFL) hand them to the whole warp. At 2 bits (word >> 4j) & 0x03030303 and & 0x0C0C0C0C are two
planes for one shift, the second's codes 2 bits up their bytes: its DP4As add into a sum of their own, a
quarter of which counts. At 4 and 8 bits a plane is (word >> j bits) & a byte mask; at 3 bits every byte of a
row's bit stream holds two whole codes, at o and o + 3 (o = 0, 1, 2), so a 32-code block of 3 words is 6
masked planes of those and 3 of the 8 codes that straddle bytes (_three_bit_plane), and since o varies within
a plane word each x_k is quantized at 2^-o (2^-14 of the largest |x| at o = 2). Per group a thread then adds
s (scale sums - z sum_k x_k) in fp32, decoding each row's 8-bit scale and zero once (an I2F.U8 each, reading
the code's byte where it lies) with its run's steps and minimums (one 16-byte load).

With more rows of x (or groups not unrolled), at 2 and 4 bits a word's two 16-bit halves hold codes at
the same places, so codes are decoded two at a time as an fp16 pair (_code_pair): a LOP3 keeps codes p
and p + 16 / bits, each under an fp16 1024, and an HFMA2 turns both into (q - 2^(bits - 1)) / 16, exact;
a second HFMA2 multiplies them into the group's fp16 sums with x_k (exact in fp16 for bf16 x). That is
three instructions for two codes. A group's sums (at most 32 products each) are then added in fp32: per
group a thread adds s (sum_k q_k x_k - z sum_k x_k), the sums of x shared by the thread's rows, decoding
each row's 8-bit scale and zero once. At 3 bits with more rows of x (codes straddle bytes and halves), and
at 8 bits (codes too wide for a group's fp16 sums), each code is an fp32, two instructions a code: a LOP3
that keeps the code, shifted into the top bits of a float's mantissa (one shift per few codes: a
"window"), and ORs in an exponent chosen so that the code's lowest bit weighs 1 (the float is then 2^m +
code, exact, with 2^m <= 2^8), and an FFMA with x_k; the 2^m are taken away per group. x arrives four bf16
at a time, converted by bit shifts. For one row of x a program's groups are unrolled into straight-line
code, so that the compiler sees what each load feeds and issues the loads well ahead of it; with more rows
(more registers per group) they are a loop that loads the next group's words, scales and zeros before it
works on the current group.

The input dimension is shared out (a Mixtral expert matrix has 4096-14336 rows: too few threads to fill
the GPU): a program's warps take their own columns of the same 32 x rows_per_thread rows and add their
sums in the program, and SPLITS programs per block of rows add their partial sums into one 64-bit integer a
row, in fixed point, by atomic adds that also count the programs; the last one to arrive writes the row
(_add_partial). Integer sums are exact in any order, so a call is one kernel and the same input gives the
same bits.

On compute capability 9.0 and up a GEMV is a programmatic dependent launch: its programs let the next kernel
launch at once, and load their first groups' weight before they wait for the kernel
before them to finish (griddepcontrol.wait); only then do they read x or write. A chain of GEMVs, such as
a decode step's, so overlaps each kernel's loads with the end of the one before. The weight is read before
the wait, so the kernel launched right before a GEMV must not write that weight (copies into expert slots are
memcpys, ordered by events: they are waited for in full; dependent_launch=False turns this off).

Up to MAX_GEMV_ROWS rows of x (batched decode) share one GEMV: each code is decoded once and
multiplied into every row's sums. More rows (prefill), and groups the GEMV does not tile (3-bit
groups of 16 codes end mid-word), dequantize the matrix with a second kernel and use cuBLAS,
whose tensor cores then win.

Checked on the CPU with TRITON_INTERPRET=1 (tests/test_quant_kernels.py) and timed on the GPU by
benchmarks/quant_kernels.py.
"""

from __future__ import annotations

from .kernel_config import MAX_SPLITS


try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU installs: nothing here is defined (weight.py falls back to dequantize-then-matmul)
    AVAILABLE = False

if AVAILABLE:
    from .kernel_dequantize import _decode, _decoded, _meta
    from .kernel_ptx import _dp4a, _fma2, _fp16_pair_of, _from_lane, _group_reduce

    # The GEMV decodes a code in the top WINDOW_BITS bits of the float's mantissa (_code): the float is then
    # 2^(23 - POS) + code with 2^(23 - POS) <= 2^8, so a group's sums carry offsets up to 2^8 |x| and keep
    # 16 of fp32's 24 bits for the products (about 2^-16 relative error). Wider windows need fewer shifts
    # but lose more: 12 bits measured 5e-4.
    WINDOW_BITS = tl.constexpr(8)
    # Codes decoded in pairs are (q - 2^(bits - 1)) / 16 (_code_pair), so that a group's fp16 sums stay far
    # below fp16's 65504; the kernel's sums are PAIR_SCALE times the true ones until it stores them.
    PAIR_SCALE = tl.constexpr(1 / 16)
    X_SPLIT = tl.constexpr(254)     # integer x: x = scale (X_SPLIT high + low), high and low int8 (_quantize_x)
    # A row's 64-bit accumulator (_add_partial): the programs that arrived, in units of ARRIVAL (the top bits count
    # up to MAX_SPLITS - 1 before the last), a poison bit below them, and below that the sum of the partial sums in
    # units of 2^-SUM_FRACTION, each raised by SUM_BIAS (MAX_SPLITS addends below 2 SUM_BIAS stay below POISON).
    ARRIVAL = tl.constexpr(1 << 64 - (MAX_SPLITS - 1).bit_length())
    POISON = tl.constexpr(ARRIVAL.value >> 1)
    SUM_FRACTION = tl.constexpr(24)
    SUM_BIAS = tl.constexpr(1 << 50)
    SUM_LIMIT = tl.constexpr(SUM_BIAS.value / 2 ** SUM_FRACTION.value)     # partial sums this large do not fit
    assert MAX_SPLITS * 2 * SUM_BIAS.value <= POISON.value

    @triton.jit
    def _code(words, c: tl.constexpr, magic, BITS: tl.constexpr):
        """Code c of the stream in `words` (a tuple of uint32 tensors) as the fp32 2^(23 - POS) + code, exact:
        its window of stream bits (the same shifted word, or funnel of two words, for every code in it; the
        compiler computes it once) holds it at float bit POS, and a LOP3 keeps it and ORs in the exponent."""
        SPAN: tl.constexpr = WINDOW_BITS.value // BITS * BITS   # whole codes per window
        LOWEST: tl.constexpr = 23 - SPAN                  # the float bit a window's first stream bit lands on
        BIT: tl.constexpr = c * BITS
        START: tl.constexpr = BIT // SPAN * SPAN
        POS: tl.constexpr = LOWEST + BIT - START
        WORD: tl.constexpr = START // 32
        OFFSET: tl.constexpr = START % 32 - LOWEST        # right shift of words[WORD] (negative: left)
        if START % 32 + SPAN > 32 and WORD + 1 < len(words):      # the window crosses into the next word
            window = (words[WORD] >> OFFSET) | (words[WORD + 1] << (32 - OFFSET))
        elif OFFSET >= 0:
            window = words[WORD] >> OFFSET
        else:
            window = words[WORD] << -OFFSET
        # the exponent of 2^(23 - POS), from `magic` at run time so that the compiler keeps the OR
        # and the AND in one LOP3 instead of materialising a second constant for every code
        exponent = (magic - (POS << 23)).to(tl.uint32, bitcast=True)
        MASK: tl.constexpr = (1 << BITS) - 1
        return ((window & (MASK << POS)) | exponent).to(tl.float32, bitcast=True)

    @triton.jit
    def _code_offset(c: tl.constexpr, BITS: tl.constexpr):
        """The 2^(23 - POS) that _code's float for code c carries besides the code."""
        SPAN: tl.constexpr = WINDOW_BITS.value // BITS * BITS
        return float(2 ** (SPAN - c * BITS % SPAN))

    @triton.jit
    def _fp16_halves(pair):
        """A uint32 that holds two fp16 (the low half first) -> the two fp16."""
        return pair.to(tl.uint16).to(tl.float16, bitcast=True), (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True)

    @triton.jit
    def _splat_pair(value):
        """(value, value) as an fp16 pair."""
        half = tl.full((), value, tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return half | (half << 16)

    @triton.jit
    def _code_pair(word, p: tl.constexpr, magic, BITS: tl.constexpr):
        """Codes p and p + 16 / BITS of `word` (the same place in its two halves) as an fp16 pair of
        (q - 2^(BITS - 1)) PAIR_SCALE, exact: a LOP3 keeps both codes, shifted to bit POS of their half, and ORs
        in fp16 1024s (1024 + q 2^POS); an HFMA2 scales and offsets both."""
        WINDOW: tl.constexpr = 10 // BITS * BITS        # code bits below an fp16's exponent: whole codes
        SHIFT: tl.constexpr = p * BITS // WINDOW * WINDOW
        POS: tl.constexpr = p * BITS - SHIFT
        MASK: tl.constexpr = ((1 << BITS) - 1) << POS
        halves = ((word >> SHIFT) & (MASK | MASK << 16)) | magic.to(tl.uint32, bitcast=True)
        STEP: tl.constexpr = PAIR_SCALE / 2 ** POS
        OFFSET: tl.constexpr = 1024 * PAIR_SCALE / 2 ** POS + (1 << BITS - 1) * PAIR_SCALE
        return _fma2(halves, _splat_pair(STEP), _splat_pair(-OFFSET))

    @triton.jit
    def _round(v):
        """v rounded to the nearest integer (ties to even), for |v| < 2^22: by adding and taking away 1.5 2^23."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _plane_byte(plane, b: tl.constexpr, BITS: tl.constexpr):
        """Which code of its group byte b of plane word `plane` holds (_group_int_sums), how far up its byte (o:
        the byte is q 2^o), and whether it holds one at all."""
        if BITS == 3:
            block, q = plane // 9, plane % 9
            # the plane's window of the block's 96-bit stream starts at bit `start` (_three_bit_plane)
            start = tl.where(q < 6, 32 * (q // 2) + 3 * (q % 2), tl.where(q == 6, 6, tl.where(q == 7, 38, 78)))
            first_bit = start + 8 * b
            code = (first_bit + 2) // 3                     # the first code that starts in the byte
            straddles = (3 * code) // 8 != (3 * code + 2) // 8
            holds = (code < 32) & ((q < 6) | straddles)    # windows 6-8 take only the codes that straddle bytes
            return 32 * block + code, 3 * code - first_bit, holds
        else:
            PLANES: tl.constexpr = 8 // BITS
            UP: tl.constexpr = 2 if BITS == 2 else 0        # the odd 2-bit planes' codes sit 2 bits up: _code_plane
            return plane // PLANES * (32 // BITS) + plane % PLANES + b * PLANES, plane % 2 * UP, plane >= 0

    @triton.jit
    def _code_plane(word, j: tl.constexpr, BITS: tl.constexpr):
        """Plane j of a word: codes j, j + 8 / BITS, ... one a byte. At 2 bits the odd planes keep their codes 2 bits
        up (one shift for two planes: (word >> 4j') & 0x03.. and & 0x0C..), and their x comes down by 4."""
        if BITS == 2:
            SHIFT: tl.constexpr = j // 2 * 4
            MASK: tl.constexpr = 0x03030303 << (j % 2 * 2)
            return (word >> SHIFT) & MASK
        else:
            return (word >> (BITS * j)) & (((1 << BITS) - 1) * 0x01010101)

    @triton.jit
    def _quantize_x(x_ptr, g0, lane, GROUPS, BITS: tl.constexpr, GROUP: tl.constexpr, LANES: tl.constexpr,
                    WARP_GROUPS: tl.constexpr, X_BYTES: tl.constexpr):
        """The warp's groups g0 .. g0 + WARP_GROUPS - 1 of x, each as scale (X_SPLIT high_k + low_k) with int8 high =
        x_k / (max |x| / 127) rounded: a lane holds the four x_k of one plane word (_group_int_sums), LANES lanes a
        group (x_lanes). With X_BYTES 2 (x_bytes), low is the rest in X_SPLITths and each x_k is first times 2^-o
        where its code sits o bits up its byte; with 1, low is 0 and x_k is as is. Returns per set of 32 lanes the
        lane's high bytes and low bytes (uint32 each), and its group's scale and scale sum_k (X_SPLIT high_k + low_k)
        2^o_k (exact integers below 2^24 before the scale)."""
        lane = lane[:, None]
        sets = ()
        for first in tl.static_range(0, WARP_GROUPS, 32 // LANES):
            group = g0[:, None] + first + lane // LANES
            plane = lane % LANES
            xs, weights = (), ()
            for b in tl.static_range(4):
                k, up, holds = _plane_byte(plane, b, BITS)
                ok = (group < GROUPS) & holds & (k < GROUP)
                xs = xs + (tl.load(x_ptr + group * GROUP + k, mask=ok, other=0).to(tl.float32),)
                weights = weights + (tl.where(up == 0, 1.0, tl.where(up == 1, 0.5, 0.25)) if X_BYTES == 2 else 1.0,)
            largest = tl.maximum(tl.maximum(tl.abs(xs[0]), tl.abs(xs[1])), tl.maximum(tl.abs(xs[2]), tl.abs(xs[3])))
            largest = _group_reduce(largest, lane, LANES, True)
            steps = 127 / tl.maximum(largest, 1e-30)          # a group of zeros stays zeros
            high_bytes = tl.zeros(lane.shape, dtype=tl.uint32)
            low_bytes = tl.zeros(lane.shape, dtype=tl.uint32)
            total = tl.zeros(lane.shape, dtype=tl.float32)
            for b in tl.static_range(4):
                scaled = xs[b] * (steps * weights[b])
                high = _round(scaled)
                high_bytes |= (high.to(tl.int32).to(tl.uint32, bitcast=True) & 0xFF) << (8 * b)
                if X_BYTES == 2:
                    low = _round((scaled - high) * X_SPLIT)
                    low_bytes |= (low.to(tl.int32).to(tl.uint32, bitcast=True) & 0xFF) << (8 * b)
                    total += (high * X_SPLIT + low) / weights[b]
                else:
                    total += high * X_SPLIT
            scale = largest / (127 * X_SPLIT)
            sets = sets + ((high_bytes, low_bytes, scale, _group_reduce(total, lane, LANES, False) * scale),)
        return sets

    @triton.jit
    def _three_bit_plane(w0, w1, w2, q: tl.constexpr):
        """Plane q of a 32-code block of 3-bit codes (words w0, w1, w2; code k at stream bits 3k): four codes, one a
        byte, each 0-2 bits up its byte. Every byte of the stream holds two whole codes, at o and o + 3 (o = 0, 1, 2
        by byte): planes 0-5 take them from each word, as is and shifted by 3; planes 6-8 take the 8 codes that
        straddle bytes, from windows at stream bits 6, 38 and 78."""
        if q == 0:
            return w0 & 0x071C0E07
        elif q == 1:
            return (w0 >> 3) & 0x071C0E07
        elif q == 2:
            return w1 & 0x0E071C0E
        elif q == 3:
            return (w1 >> 3) & 0x0E071C0E
        elif q == 4:
            return w2 & 0x1C0E071C
        elif q == 5:
            return (w2 >> 3) & 0x1C0E071C
        elif q == 6:
            return ((w0 >> 6) | (w1 << 26)) & 0x07000E07
        elif q == 7:
            return ((w1 >> 6) | (w2 << 26)) & 0x0E07000E
        else:
            return (w2 >> 14) & 0x00000E07

    @triton.jit
    def _group_int_sums(words, quantized_x, slot: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr,
                        X_BYTES: tl.constexpr):
        """_group_sums for one row of x from _quantize_x's bytes, the warp's group `slot`: each word's codes a plane
        of four at a time (plane j holds codes j, j + 8 / BITS, ... a byte each; at 3 bits _three_bit_plane's),
        dotted with x's bytes by DP4A, exact in int32; x's bytes come from the lanes that hold them. With one byte
        of x (2 bits), the planes whose codes sit 2 bits up their bytes add into a sum of their own (each product
        four times its value). Returns the sums (THREADS, ROWS), the group's sum of x, no offset, and the scale
        that turns the sums into sum_k q_k x_k."""
        high_bytes, low_bytes, scale, x_sum = quantized_x[slot // (32 // LANES)]
        first_lane: tl.constexpr = slot % (32 // LANES) * LANES
        high = tl.zeros(words[0].shape, dtype=tl.int32)
        low = tl.zeros(words[0].shape, dtype=tl.int32)
        up = tl.zeros(words[0].shape, dtype=tl.int32)
        if BITS == 3:
            for block in tl.static_range(len(words) // 3):
                for q in tl.static_range(9):
                    codes = _three_bit_plane(words[3 * block], words[3 * block + 1], words[3 * block + 2], q)
                    high = _dp4a(codes, _from_lane(high_bytes, first_lane + 9 * block + q), high)
                    low = _dp4a(codes, _from_lane(low_bytes, first_lane + 9 * block + q), low)
        else:
            PLANES: tl.constexpr = 8 // BITS
            for w in tl.static_range(len(words)):
                for j in tl.static_range(PLANES):
                    codes = _code_plane(words[w], j, BITS)
                    x_high = _from_lane(high_bytes, first_lane + w * PLANES + j)
                    if X_BYTES == 2:
                        high = _dp4a(codes, x_high, high)
                        low = _dp4a(codes, _from_lane(low_bytes, first_lane + w * PLANES + j), low)
                    elif j % 2 == 0:
                        high = _dp4a(codes, x_high, high)
                    else:
                        up = _dp4a(codes, x_high, up)
        x_sum, scale = _from_lane(x_sum, first_lane), _from_lane(scale, first_lane)
        if X_BYTES == 1:        # sum_k q_k x_k = scale X_SPLIT (high + up / 4)
            return ((4 * high + up).to(tl.float32),), (x_sum,), (0.0,), scale * (X_SPLIT / 4)
        return ((high * X_SPLIT + low).to(tl.float32),), (x_sum,), (0.0,), scale

    @triton.jit
    def _x_quad(x_ptr, k):
        """x[k:k + 4] as four fp32 scalars; bf16 by bit shifts from one 8-byte load (k a multiple of 4)."""
        if x_ptr.dtype.element_ty == tl.bfloat16:
            pair = tl.load((x_ptr + k).to(tl.pointer_type(tl.uint64)))
            low, high = pair.to(tl.uint32), (pair >> 32).to(tl.uint32)
            return ((low << 16).to(tl.float32, bitcast=True), (low & 0xFFFF0000).to(tl.float32, bitcast=True),
                    (high << 16).to(tl.float32, bitcast=True), (high & 0xFFFF0000).to(tl.float32, bitcast=True))
        else:
            return (tl.load(x_ptr + k).to(tl.float32), tl.load(x_ptr + k + 1).to(tl.float32),
                    tl.load(x_ptr + k + 2).to(tl.float32), tl.load(x_ptr + k + 3).to(tl.float32))

    @triton.jit
    def _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, g, first_row, rows, ok, NP,
               BITS: tl.constexpr, GROUP: tl.constexpr, META_GROUP: tl.constexpr, QUANT_META: tl.constexpr,
               ROWS_PER_THREAD: tl.constexpr, CODE_WORDS: tl.constexpr, EVICTION: tl.constexpr):
        """What group g's sums read from memory: its words (a tuple), scale and zero codes, and meta. CODE_WORDS:
        8-bit codes stay in the words that hold them (_code_words), else (THREADS, ROWS) codes or fp16 values.
        EVICTION: the cache eviction policy of the words and codes (weight_eviction)."""
        first_word = g * (GROUP * BITS // 32)
        words = ()
        for i in tl.static_range(GROUP * BITS // 32):
            words = words + (tl.load(w_ptr + (first_word + i)[:, None] * NP + rows, mask=ok, other=0,
                                     eviction_policy=EVICTION).to(tl.uint32, bitcast=True),)
        if CODE_WORDS:
            scale = _code_words(s_ptr, g, first_row, NP, ROWS_PER_THREAD, EVICTION)
            zero = _code_words(z_ptr, g, first_row, NP, ROWS_PER_THREAD, EVICTION)
        else:
            at = g[:, None] * NP + rows
            scale = tl.load(s_ptr + at, mask=ok, other=0)
            zero = tl.load(z_ptr + at, mask=ok, other=0)
        meta = ()
        if QUANT_META:
            # rows past the padded ones (the grid's last block) read the last row's run, not past the meta
            if META_GROUP % ROWS_PER_THREAD == 0:
                run = ((g * NP + tl.minimum(first_row, NP - 1)) // META_GROUP)[:, None]   # a thread's rows share one run
            else:
                run = (g[:, None] * NP + tl.minimum(rows, NP - 1)) // META_GROUP
            meta = _meta(meta_ptr, run)
        return words, scale, zero, meta

    @triton.jit
    def _code_words(codes_ptr, g, first_row, NP, ROWS_PER_THREAD: tl.constexpr, EVICTION: tl.constexpr):
        """Group g's 8-bit scale (or zero) codes of the thread's rows in the 32-bit words that hold them, four
        rows a word ((THREADS, words)), for _row_codes to take apart where they are used."""
        WORDS: tl.constexpr = (ROWS_PER_THREAD + 3) // 4
        word = tl.arange(0, WORDS)[None, :]
        first_word = ((g * NP + first_row) // 4)[:, None]
        return tl.load(codes_ptr.to(tl.pointer_type(tl.uint32)) + first_word + word,
                       mask=first_row[:, None] + 4 * word < NP, other=0, eviction_policy=EVICTION)

    @triton.jit
    def _row_codes(codes, first_row, ROWS_PER_THREAD: tl.constexpr, CODE_WORDS: tl.constexpr):
        """_fetch's scales or zeros -> (THREADS, ROWS): each row's code or value."""
        if CODE_WORDS:
            if ROWS_PER_THREAD % 4 == 0:
                bytes_ = codes[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]
                return tl.reshape(bytes_, (codes.shape[0], ROWS_PER_THREAD)) & 0xFF
            else:   # 1 or 2 rows: one word holds them
                return (codes >> (8 * (first_row[:, None] % 4 + tl.arange(0, ROWS_PER_THREAD)[None, :]))) & 0xFF
        else:
            return codes

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
        """For each row m of x, over group g: sum_k f_k x_mk ((THREADS, ROWS), f_k the codes as _code's floats),
        sum_k x_mk, and sum_k (f_k - q_k) x_mk (what the floats carry besides the codes): three tuples."""
        STEP_WORDS: tl.constexpr = STEP * BITS // 32
        PLACES: tl.constexpr = WINDOW_BITS.value // BITS      # codes a window holds, each with its own offset
        dots = _splat(zeros, X_ROWS)
        place_sums = _splat(0.0, X_ROWS * PLACES)            # sum of x_mk over the codes at each place
        for step in tl.static_range(GROUP // STEP):
            step_words = ()
            for i in tl.static_range(STEP_WORDS):
                step_words = step_words + (words[step * STEP_WORDS + i],)
            for quad in tl.static_range(0, STEP, 4):
                k = (g * GROUP)[:, None] + step * STEP + quad
                xs = ()
                for m in tl.static_range(X_ROWS):
                    xs = xs + _x_quad(x_ptr + m * K, k)
                for i in tl.static_range(4):
                    q = _code(step_words, quad + i, magic, BITS)      # decoded once, used by every row of x
                    new_dots = ()
                    new_sums = ()
                    for m in tl.static_range(X_ROWS):
                        new_dots = new_dots + (dots[m] + q * xs[4 * m + i],)
                        for place in tl.static_range(PLACES):
                            if place == (quad + i) % PLACES:
                                new_sums = new_sums + (place_sums[m * PLACES + place] + xs[4 * m + i],)
                            else:
                                new_sums = new_sums + (place_sums[m * PLACES + place],)
                    dots, place_sums = new_dots, new_sums
        x_sums = ()
        offset_sums = ()
        for m in tl.static_range(X_ROWS):
            x_sum = place_sums[m * PLACES]
            offset_sum = _code_offset(0, BITS) * place_sums[m * PLACES]
            for place in tl.static_range(1, PLACES):
                x_sum += place_sums[m * PLACES + place]
                offset_sum += _code_offset(place, BITS) * place_sums[m * PLACES + place]
            x_sums = x_sums + (x_sum,)
            offset_sums = offset_sums + (offset_sum,)
        return dots, x_sums, offset_sums

    @triton.jit
    def _group_pair_sums(words, x_ptr, g, K, magic, BITS: tl.constexpr, GROUP: tl.constexpr, X_ROWS: tl.constexpr):
        """_group_sums with the codes decoded in pairs (_code_pair) and summed in fp16, x rounded to fp16 (exact
        for bf16): per row of x PAIR_SCALE sum_k (q_k - 2^(BITS - 1)) x_mk, PAIR_SCALE sum_k x_mk, and the
        offset that the centred codes carry. A half word's fp16 sums add at most 32 terms, products of at most
        |x| / 2 (|x| / 8 at 2 bits) and |x| / 16: they cannot overflow while every |x| < 4000."""
        HALF: tl.constexpr = 16 // BITS            # codes a half word
        dots = _splat(tl.zeros(words[0].shape, dtype=tl.uint32), X_ROWS)     # fp16 pairs: (low, high) halves' sums
        x_sums = _splat(tl.zeros((), dtype=tl.uint32), X_ROWS)
        pair_scale = _splat_pair(PAIR_SCALE)
        for w in tl.static_range(len(words)):
            k = (g * GROUP)[:, None] + w * 2 * HALF
            xs = ()                                # (X_ROWS * 2 HALF,) fp32: the word's x, row after row
            for m in tl.static_range(X_ROWS):
                for quad in tl.static_range(0, 2 * HALF, 4):
                    xs = xs + _x_quad(x_ptr + m * K, k + quad)
            for p in tl.static_range(HALF):
                codes = _code_pair(words[w], p, magic, BITS)    # decoded once, used by every row of x
                new_dots, new_x_sums = (), ()
                for m in tl.static_range(X_ROWS):
                    x = _fp16_pair_of(xs[m * 2 * HALF + p], xs[m * 2 * HALF + HALF + p])
                    new_dots = new_dots + (_fma2(codes, x, dots[m]),)
                    new_x_sums = new_x_sums + (_fma2(x, pair_scale, x_sums[m]),)
                dots, x_sums = new_dots, new_x_sums
        CENTRE: tl.constexpr = 1 << BITS - 1
        dot_totals, x_totals, offsets = (), (), ()
        for m in tl.static_range(X_ROWS):
            low, high = _fp16_halves(dots[m])
            dot_totals = dot_totals + (low.to(tl.float32) + high.to(tl.float32),)
            x_low, x_high = _fp16_halves(x_sums[m])
            x_total = x_low.to(tl.float32) + x_high.to(tl.float32)
            x_totals = x_totals + (x_total,)
            offsets = offsets + (-CENTRE * x_total,)
        return dot_totals, x_totals, offsets

    @triton.jit
    def _add_group(acc, fetched, x_ptr, quantized_x, slot: tl.constexpr, g, K, counts, first_row, magic, zeros,
                   BITS: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr, PAIRED: tl.constexpr,
                   X_LANES: tl.constexpr, X_BYTES: tl.constexpr, QUANT_META: tl.constexpr, X_ROWS: tl.constexpr,
                   ROWS_PER_THREAD: tl.constexpr, CODE_WORDS: tl.constexpr, MASK_GROUPS: tl.constexpr):
        """acc + group g's products (fetched: _fetch's values; quantized_x: _quantize_x's, the group the warp's
        slot-th), or acc unchanged where not `counts` (looked at only when MASK_GROUPS)."""
        words, scale, zero, meta = fetched
        dot_scale = 1.0
        if X_LANES > 0:
            dots, x_sums, offset_sums, dot_scale = _group_int_sums(words, quantized_x, slot, BITS, X_LANES, X_BYTES)
        elif PAIRED:
            dots, x_sums, offset_sums = _group_pair_sums(words, x_ptr, g, K, magic, BITS, GROUP, X_ROWS)
        else:
            dots, x_sums, offset_sums = _group_sums(words, x_ptr, g, K, magic, zeros, BITS, GROUP, STEP, X_ROWS)
        scale = _row_codes(scale, first_row, ROWS_PER_THREAD, CODE_WORDS)
        zero = _row_codes(zero, first_row, ROWS_PER_THREAD, CODE_WORDS)
        scale = _decoded(scale, meta, 0, QUANT_META)
        if MASK_GROUPS:
            scale = tl.where(counts, scale, 0.0)
        zero, zero_step, zero_min = _decode(zero, meta, 2, QUANT_META)
        new_acc = ()
        for m in tl.static_range(X_ROWS):
            # -(z X + M) as zero (zero_step (-X)) + (zero_min (-X) - M): per row two FFMAs, the rest per thread
            negative_x = -x_sums[m]
            negative_offset = zero * (zero_step * negative_x) + (zero_min * negative_x - offset_sums[m])
            new_acc = new_acc + (acc[m] + scale * tl.fma(dots[m], dot_scale, negative_offset),)
        return new_acc

    @triton.jit
    def _add_partial(total, sums_ptr, out_ptr, rows, ok, N, SPLITS):
        """Adds a program's partial sums `total` at `rows` into their accumulators at sums_ptr (_accumulators): one
        relaxed atomic add a row of the fixed-point sum raised by SUM_BIAS (a positive addend) and one arrival. The
        program that arrives last at a row has the whole sum in the value its add returns: it writes the row to
        out_ptr and zeroes the accumulator for the next call. Integer sums do not depend on the order of arrival,
        so the same input gives the same bits. A partial sum that is not finite or not below SUM_LIMIT in size
        sets POISON first (an atomic or): the row comes out NaN."""
        in_range = tl.abs(total) < SUM_LIMIT        # false for NaN
        fixed = (tl.where(in_range, total, 0.0) * 2.0 ** SUM_FRACTION).to(tl.int64)
        addend = (fixed + SUM_BIAS).to(tl.uint64, bitcast=True) + ARRIVAL
        tl.atomic_or(sums_ptr + rows, tl.full(rows.shape, POISON, tl.uint64), mask=ok & ~in_range, sem="relaxed",
                     scope="gpu")
        before = tl.atomic_add(sums_ptr + rows, addend, mask=ok, sem="relaxed", scope="gpu")
        last = ok & (before // ARRIVAL == SPLITS - 1)
        fixed_sum = ((before + addend) & (POISON - 1)).to(tl.int64, bitcast=True) - SPLITS.to(tl.int64) * SUM_BIAS
        poisoned = ((before & POISON) != 0) | ~in_range
        value = tl.where(poisoned, float("nan"), fixed_sum.to(tl.float32) * 2.0 ** -SUM_FRACTION)
        tl.store(out_ptr + rows, value.to(out_ptr.dtype.element_ty), mask=last & (rows < N))
        tl.store(sums_ptr + rows, tl.zeros_like(before), mask=last)

    @triton.jit
    def _group(g0, i, GROUPS, MASK_GROUPS: tl.constexpr):
        """A warp's i-th group: past the last one in a ragged split, the last one again (its products then
        count zero: MASK_GROUPS)."""
        if MASK_GROUPS:
            return tl.minimum(g0 + i, GROUPS - 1)
        else:
            return g0 + i

    @triton.jit
    def _wait_for_inputs(PDL: tl.constexpr):
        """With programmatic dependent launch, wait until the kernel before this one has finished and its writes
        are visible: before reading x or writing anything, after loading the weight (which that kernel must not
        write: see the module's docstring)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _moved(ptr, offset):
        """`ptr` moved by `offset` bytes, its element type kept."""
        return (ptr.to(tl.pointer_type(tl.uint8)) + offset).to(ptr.dtype)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, meta_ptr, sums_ptr, out_ptr, magic,
        N, K, NP, GROUPS, GROUPS_PER_SPLIT, SPLITS,
        slots_ptr, SLOT_STRIDE, MATRIX_STRIDE, MATRICES, X_PER_ROW,
        BITS: tl.constexpr, GROUP: tl.constexpr, STEP: tl.constexpr, PAIRED: tl.constexpr, X_LANES: tl.constexpr,
        X_BYTES: tl.constexpr, META_GROUP: tl.constexpr,
        QUANT_META: tl.constexpr, X_ROWS: tl.constexpr, ROWS_PER_THREAD: tl.constexpr, THREADS: tl.constexpr,
        UNROLLED_GROUPS: tl.constexpr, EARLY_GROUPS: tl.constexpr, PDL: tl.constexpr,
        MASK_GROUPS: tl.constexpr, EVICTION: tl.constexpr, GROUPED: tl.constexpr,
    ):
        """UNROLLED_GROUPS: GROUPS_PER_SPLIT when the groups are unrolled, else 0. The loop reads the run-time
        GROUPS_PER_SPLIT: as a compile-time constant it was slower (docs/quantization.md, "Tiling defaults").

        GROUPED (hqq_grouped_gemv): grid axis 2 runs pairs x MATRICES products, product e = (pair, j) on the
        matrix j of the expert in slot slots[pair] (the weight's tensors SLOT_STRIDE bytes apart from slot to
        slot and MATRIX_STRIDE from matrix to matrix) with row pair // X_PER_ROW of x, into row e of out. The
        slot table may be the output of the kernel before, so a grouped GEMV waits before it reads anything."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()      # the next kernel may start loading its weight now
        pid_rows, pid_split = tl.program_id(0), tl.program_id(1)
        if GROUPED:
            _wait_for_inputs(PDL)
            product = tl.program_id(2)
            pair = product // MATRICES
            offset = tl.load(slots_ptr + pair).to(tl.int64) * SLOT_STRIDE + (product % MATRICES) * MATRIX_STRIDE
            w_ptr, s_ptr, z_ptr = _moved(w_ptr, offset), _moved(s_ptr, offset), _moved(z_ptr, offset)
            if QUANT_META:
                meta_ptr = _moved(meta_ptr, offset)
            x_ptr += (pair // X_PER_ROW) * K
            out_ptr += product * N
            sums_ptr += product * NP
        WARPS: tl.constexpr = THREADS // 32
        lane, warp = tl.arange(0, THREADS) % 32, tl.arange(0, THREADS) // 32
        first_row = (pid_rows * 32 + lane) * ROWS_PER_THREAD                                    # (THREADS,)
        rows = first_row[:, None] + tl.arange(0, ROWS_PER_THREAD)[None, :]                     # (THREADS, ROWS)
        ok = rows < NP
        zeros = tl.zeros((THREADS, ROWS_PER_THREAD), dtype=tl.float32)
        acc = _splat(zeros, X_ROWS)
        if UNROLLED_GROUPS > 0:
            # straight-line code: the compiler sees every load's consumers and issues the loads well ahead
            # (in a loop it sinks the next group's loads to the loop's end, where their latency shows).
            # 8-bit scale and zero codes stay in their words until used: faster here at 3 and 4 bits
            # (docs/quantization.md, "Tiling defaults"). The loop keeps bytes, and so stays the loop measured
            # there (words in the loop were not measured on their own).
            g0 = (pid_split * WARPS + warp) * UNROLLED_GROUPS           # each warp's first group: (THREADS,)
            early = ()        # the first groups' loads, issued while the kernel before may still write x
            for i in tl.static_range(EARLY_GROUPS):
                g = _group(g0, i, GROUPS, MASK_GROUPS)
                early = early + (_fetch(w_ptr, s_ptr, z_ptr, meta_ptr, g, first_row, rows, ok, NP,
                                        BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD, QUANT_META, EVICTION),)
            if not GROUPED:     # (a grouped GEMV has waited already)
                _wait_for_inputs(PDL)
            quantized_x = ()
            if X_LANES > 0:       # each warp quantizes its own groups of x, its lanes together
                quantized_x = _quantize_x(x_ptr, g0, lane, GROUPS, BITS, GROUP, X_LANES, UNROLLED_GROUPS, X_BYTES)
            for i in tl.static_range(UNROLLED_GROUPS):
                g = _group(g0, i, GROUPS, MASK_GROUPS)
                if i < EARLY_GROUPS:
                    fetched = early[i]
                else:
                    fetched = _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, g, first_row, rows, ok, NP,
                                     BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD, QUANT_META, EVICTION)
                acc = _add_group(acc, fetched, x_ptr, quantized_x, i, g, K, (g0 + i < GROUPS)[:, None], first_row, magic,
                                 zeros, BITS, GROUP, STEP, PAIRED, X_LANES, X_BYTES, QUANT_META, X_ROWS,
                                 ROWS_PER_THREAD, QUANT_META, MASK_GROUPS)
        else:
            # a loop (fewer registers), the next group's loads issued before this group's sums
            g0 = (pid_split * WARPS + warp) * GROUPS_PER_SPLIT
            last = tl.minimum(g0 + GROUPS_PER_SPLIT, GROUPS) - 1
            ahead = _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, tl.minimum(g0, last), first_row, rows, ok, NP,
                           BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD, False, EVICTION)
            if not GROUPED:
                _wait_for_inputs(PDL)
            # as many steps as the first warp has groups: no warp has more
            for i in range(0, tl.minimum(GROUPS_PER_SPLIT, GROUPS - pid_split * WARPS * GROUPS_PER_SPLIT)):
                fetched = ahead
                g = tl.minimum(g0 + i, last)
                ahead = _fetch(w_ptr, s_ptr, z_ptr, meta_ptr, tl.minimum(g + 1, last), first_row, rows, ok, NP,
                               BITS, GROUP, META_GROUP, QUANT_META, ROWS_PER_THREAD, False, EVICTION)
                acc = _add_group(acc, fetched, x_ptr, (), 0, g, K, (g0 + i <= last)[:, None], first_row, magic,
                                 zeros, BITS, GROUP, STEP, PAIRED, 0, X_BYTES, QUANT_META, X_ROWS, ROWS_PER_THREAD,
                                 False, MASK_GROUPS)

        # the warps' sums of the program's rows, added here: (32 ROWS,) per row of x
        rows = pid_rows * 32 * ROWS_PER_THREAD + tl.arange(0, 32 * ROWS_PER_THREAD)
        ok = rows < NP
        totals = ()
        for m in tl.static_range(X_ROWS):
            total = tl.sum(tl.reshape(acc[m], (WARPS, 32 * ROWS_PER_THREAD)), axis=0)
            totals = totals + (total * (1 / PAIR_SCALE) if PAIRED else total,)
        for m in tl.static_range(X_ROWS):
            if SPLITS == 1:
                tl.store(out_ptr + m * N + rows, totals[m].to(out_ptr.dtype.element_ty), mask=rows < N)
            else:
                _add_partial(totals[m], sums_ptr + m * NP, out_ptr + m * N, rows, ok, N, SPLITS)
