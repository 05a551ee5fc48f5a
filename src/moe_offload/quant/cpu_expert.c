/* One MoE expert's matrix products on the CPU, read in place from moe-offload's packed buffers.

   cpu_kernels.py builds this file on first use (cc -O3 -march=native -fopenmp) and calls it through
   ctypes; its docstring describes the layouts and the choices. Vectors are GCC/Clang vector extensions
   of 16 fp32 lanes: one AVX-512 register where the CPU has it, two AVX2 or four NEON registers
   elsewhere. Every product is an fp32 multiply of the exact weight (or code) and x; sums are fp32. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16            /* output rows (HQQ) or columns of K (dense) of one vector */
#define MAX_ROWS 8          /* rows of x one call takes */
#define ROW_BLOCK 32        /* pack.ROW_MULTIPLE: HQQ rows are padded to whole blocks; panels are whole blocks */
#define PANEL 256           /* output rows at most a thread takes at once; HQQ keeps their sums in L1 while it walks
                               down K, reading runs of 4 PANEL bytes a word (128 rows were 2x slower at 2 bits) */
#define PREFETCH_BYTES 4096 /* how far ahead, in bytes of a panel's words, a thread asks for the next groups' words,
                               scales and zeros (into L2: into L1 was 20 % slower, the L1's queue of misses short) */

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

enum storage { DENSE_F32 = 0, DENSE_BF16 = 1, HQQ = 2 };

struct matrix {             /* one (N, K) weight; cpu_kernels.Matrix mirrors it */
    int64_t storage, rows, cols;
    int64_t bits, group_size, meta_group_size, padded_rows;    /* HQQ only */
    const void *weight;     /* dense: (N, K) row-major; HQQ: uint32 words (words per row, padded rows) */
    const void *scale;      /* HQQ: (groups, padded rows), uint8 codes when meta, else fp16 */
    const void *zero;       /* likewise */
    const float *meta;      /* HQQ 8-bit scales and zeros: (runs, [scale, zero], [step, min]); else NULL */
};

/* x (rows, K) as one matrix's kernel reads it: HQQ, x scaled per column (code_position) and its sums per
   group; bf16, each 32 columns as their 16 even then their 16 odd ones (dense_rows); fp32, x itself. */
struct activations {
    const float *x;         /* what the kernel multiplies */
    float *prepared;        /* (rows, K), when x is rearranged; owned */
    float *sums;            /* HQQ: (rows, groups); owned */
};

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline u32x16 load_u32(const void *p) { u32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline f32x16 load_f32(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }

static inline f32x16 bytes_to_f32(const uint8_t *p)
{
#ifdef __AVX512F__      /* GCC 12 widens 16 bytes from memory lane by lane: 60 instructions, not 2 */
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    u8x16 bytes;
    memcpy(&bytes, p, sizeof bytes);
    return __builtin_convertvector(__builtin_convertvector(bytes, i32x16), f32x16);
#endif
}

static inline f32x16 fp16_to_f32(const uint16_t *p)    /* finite fp16 (scales, zeros), subnormals included */
{
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 bits = __builtin_convertvector(h, u32x16);
    f32x16 magnitude = (f32x16)((bits & 0x7fff) << 13) * 0x1p112f;  /* exponent re-biased by the multiply */
    return (f32x16)((u32x16)magnitude | (bits & 0x8000) << 16);
}

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float lane_sum(f32x16 v)
{
    float sum = 0;
    for (int i = 0; i < LANES; i++) sum += v[i];
    return sum;
}

/* ---- HQQ: codes packed along K in 32-bit words stored (words, padded rows), rows innermost ---- */

/* Codes a chunk holds: one word, or at 3 bits three words (32 codes: a code straddles words 0-1 and 1-2). */
static inline int chunk_codes(int bits) { return bits == 3 ? 32 : 32 / bits; }
static inline int chunk_words(int bits) { return bits == 3 ? 3 : 1; }

/* Where code c of a chunk is read from: the bit of its word it starts at, or 0 when it straddles two words
   (it is shifted down to bit 0 from both). The kernel reads code c as the integer code * 2^position, which
   needs only an AND of the word (and converts exactly: at most 8 significant bits), and multiplies it by
   x * 2^-position (exact too): the product is code * x, rounded once, as code * x would be. */
static inline int code_position(int c, int bits)
{
    int offset = c * bits % 32;
    return offset + bits <= 32 ? offset : 0;
}

/* Vectors of 16 rows a thread sums at once: with the rows of x, 8 independent chains of multiply-adds (a
   chain waits 4 cycles on each of its own), so that the FMA units are never idle. */
static inline int vectors_at_once(int rows) { return rows == 1 ? 8 : rows == 2 ? 4 : rows <= 4 ? 2 : 1; }

/* part[v][r] += code_k x[r, k] over one chunk of `vectors` x 16 rows: `words` is the chunk's first word of
   the first row (the next word down K is `stride` further), `x` the scaled x at the chunk's first column
   (row r of x is r * x_stride further). */
static inline __attribute__((always_inline)) void add_chunk(
    f32x16 part[][MAX_ROWS], const uint32_t *words, int64_t stride, const float *x, int64_t x_stride,
    int bits, int rows, int vectors)
{
    const uint32_t mask = (1u << bits) - 1;
    u32x16 w[8][3];
    for (int v = 0; v < vectors; v++)
        for (int j = 0; j < chunk_words(bits); j++) w[v][j] = load_u32(words + j * stride + v * LANES);
#pragma GCC unroll 32
    for (int c = 0; c < chunk_codes(bits); c++) {
        const int j = c * bits / 32, offset = c * bits % 32, position = code_position(c, bits);
#pragma GCC unroll 8
        for (int v = 0; v < vectors; v++) {
            u32x16 field = offset == position ? w[v][j] & mask << position
                                              : (w[v][j] >> offset | w[v][j + 1] << (32 - offset)) & mask;
            f32x16 code = __builtin_convertvector(field, f32x16);
#pragma GCC unroll 8
            for (int r = 0; r < rows; r++) part[v][r] += code * x[r * x_stride + c];
        }
    }
}

/* panel_scales for 16 rows whose codes lie in two runs: each lane finds its own. */
static void scales_across_runs(const struct matrix *w, int64_t i, f32x16 s, f32x16 z, f32x16 *scale, f32x16 *zero)
{
    for (int lane = 0; lane < LANES; lane++) {
        const float *m = w->meta + 4 * ((i + lane) / w->meta_group_size);
        (*scale)[lane] = m[1] + s[lane] * m[0];
        (*zero)[lane] = m[3] + z[lane] * m[2];
    }
}

/* The scales and zeros of group g for the `vectors` x 16 rows from `first`. With 8-bit codes, value =
   min + code * step of the run holding the code: runs are meta_group_size consecutive elements of the
   flattened (groups, padded rows) arrays (hqq.MetaCodes), so 16 rows share one run unless they cross a
   run's end (never with the default 128: rows and runs both start at multiples of 32). */
static inline __attribute__((always_inline)) void panel_scales(
    const struct matrix *w, int64_t g, int64_t first, int vectors, f32x16 *scale, f32x16 *zero)
{
    const int64_t at = g * w->padded_rows + first, run_length = w->meta_group_size;
    if (!w->meta) {
        for (int v = 0; v < vectors; v++) {
            scale[v] = fp16_to_f32((const uint16_t *)w->scale + at + v * LANES);
            zero[v] = fp16_to_f32((const uint16_t *)w->zero + at + v * LANES);
        }
        return;
    }
    int64_t run = at / run_length, run_end = (run + 1) * run_length;     /* the run of element `i` below */
    for (int v = 0; v < vectors; v++) {
        const int64_t i = at + v * LANES;
        f32x16 s = bytes_to_f32((const uint8_t *)w->scale + i), z = bytes_to_f32((const uint8_t *)w->zero + i);
        if (i + LANES <= run_end) {
            const float *m = w->meta + 4 * run;      /* scale step, scale min, zero step, zero min */
            scale[v] = m[1] + s * m[0];
            zero[v] = m[3] + z * m[2];
        } else {
            scales_across_runs(w, i, s, z, &scale[v], &zero[v]);
        }
        while (i + LANES >= run_end) { run++; run_end += run_length; }
    }
}

/* sums[v][r] += what column group g adds to rows first + 16 v .. first + 16 v + 15, for `vectors` vectors
   from v0: scale (sum_k q_k x[r, k] - zero sum_k x[r, k]), q the codes. */
static inline __attribute__((always_inline)) void add_group(
    const struct matrix *w, const struct activations *a, int rows, int bits, int vectors,
    int64_t first, int64_t g, int v0, const f32x16 *scale, const f32x16 *zero, f32x16 sums[][MAX_ROWS])
{
    const int64_t stride = w->padded_rows, k = w->cols, group_size = w->group_size, groups = k / group_size;
    const int64_t chunks = group_size / chunk_codes(bits), group_words = chunks * chunk_words(bits);
    const uint32_t *words = (const uint32_t *)w->weight + g * group_words * stride + first + v0 * LANES;
    f32x16 part[8][MAX_ROWS];
    for (int v = 0; v < vectors; v++)
        for (int r = 0; r < rows; r++) part[v][r] = (f32x16){0};
    for (int64_t c = 0; c < chunks; c++)
        add_chunk(part, words + c * chunk_words(bits) * stride, stride, a->x + g * group_size + c * chunk_codes(bits),
                  k, bits, rows, vectors);
    for (int v = 0; v < vectors; v++)
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++)
            sums[v0 + v][r] += scale[v0 + v] * (part[v][r] - zero[v0 + v] * a->sums[r * groups + g]);
}

/* out[r * out_stride + n - first] = sum_k W[n, k] x[r, k] for rows n in [first, last) below N: `first` and
   `last` multiples of ROW_BLOCK, at most PANEL apart. The panel's words of one group are contiguous runs of
   (last - first) * 4 bytes, one a word down K. */
static inline __attribute__((always_inline)) void hqq_panel(
    const struct matrix *w, const struct activations *a, int rows, int bits,
    int64_t first, int64_t last, float *out, int64_t out_stride)
{
    const int64_t stride = w->padded_rows, groups = w->cols / w->group_size;
    const int64_t group_words = w->group_size * bits / 32;
    const int vectors = (int)((last - first) / LANES), at_once = vectors_at_once(rows);
    const int64_t ahead = 1 + PREFETCH_BYTES / (group_words * (last - first) * 4);    /* groups */
    const uint32_t *words = (const uint32_t *)w->weight + first;
    f32x16 sums[PANEL / LANES][MAX_ROWS];
    for (int v = 0; v < vectors; v++)
        for (int r = 0; r < rows; r++) sums[v][r] = (f32x16){0};
    for (int64_t g = 0; g < groups; g++) {
        if (g + ahead < groups) {
            for (int64_t j = 0; j < group_words; j++)
                for (int64_t line = 0; line < last - first; line += 16)
                    __builtin_prefetch(words + ((g + ahead) * group_words + j) * stride + line, 0, 2);
            const int64_t at = (g + ahead) * stride + first, size = w->meta ? 1 : 2;   /* bytes a scale */
            for (int64_t byte = 0; byte < (last - first) * size; byte += 64) {     /* 10 % faster at 2 bits */
                __builtin_prefetch((const char *)w->scale + at * size + byte, 0, 2);
                __builtin_prefetch((const char *)w->zero + at * size + byte, 0, 2);
            }
        }
        f32x16 scale[PANEL / LANES], zero[PANEL / LANES];
        panel_scales(w, g, first, vectors, scale, zero);
        int v0 = 0;
        for (; v0 + at_once <= vectors; v0 += at_once)
            add_group(w, a, rows, bits, at_once, first, g, v0, scale, zero, sums);
        if (at_once > 4 && vectors - v0 >= 4) {     /* what is left, whole ROW_BLOCKs: as few calls as can be */
            add_group(w, a, rows, bits, 4, first, g, v0, scale, zero, sums);
            v0 += 4;
        }
        if (at_once > 2 && vectors - v0 >= 2)
            add_group(w, a, rows, bits, 2, first, g, v0, scale, zero, sums);
    }
    for (int v = 0; v < vectors; v++)
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < LANES && first + v * LANES + i < w->rows; i++)
                out[r * out_stride + v * LANES + i] = sums[v][r][i];
}

/* ---- dense: (N, K) row-major, bf16 or fp32 ---- */

/* 16 weights of a row from column c (a multiple of 32) as fp32: at fp32 columns c + 16 half ..; at bf16 a
   64-byte load holds columns c .. c + 31, and its low halves (the even columns, half 0) shifted up or its
   high halves (the odd ones, half 1) masked are exact fp32, so x comes in that order (prepare_unit). */
static inline f32x16 dense_weights(const void *row, int64_t c, int bf16, int half)
{
    if (!bf16) return load_f32((const float *)row + c + half * LANES);
    u32x16 pairs = load_u32((const uint16_t *)row + c);
    return (f32x16)(half ? pairs & 0xffff0000u : pairs << 16);
}

/* out[r * out_stride + n - first] = sum_k W[n, k] x[r, k] for rows n in [first, last), a few rows at once so
   that each load of x serves them all; 16 partial sums a (row, row of x), added up at the end. */
static inline __attribute__((always_inline)) void dense_rows(
    const struct matrix *w, const struct activations *a, int rows, int bf16,
    int64_t first, int64_t last, float *out, int64_t out_stride)
{
    enum { MOST_AT_ONCE = 4 };
    const int at_once = rows <= 2 ? 4 : 2;     /* at most 16 accumulators */
    const int64_t k = w->cols, vector_end = k / 32 * 32;
    for (int64_t n = first; n < last; n += at_once) {
        const char *row[MOST_AT_ONCE];       /* past `last`, the last row again (computed, not stored) */
        for (int i = 0; i < at_once; i++)
            row[i] = (const char *)w->weight + min64(n + i, last - 1) * k * (bf16 ? 2 : 4);
        f32x16 acc[MOST_AT_ONCE][MAX_ROWS];
        for (int i = 0; i < at_once; i++)
            for (int r = 0; r < rows; r++) acc[i][r] = (f32x16){0};
        for (int64_t c = 0; c < vector_end; c += 32)
            for (int half = 0; half < 2; half++) {
                f32x16 weight[MOST_AT_ONCE];
                for (int i = 0; i < at_once; i++) weight[i] = dense_weights(row[i], c, bf16, half);
#pragma GCC unroll 8
                for (int r = 0; r < rows; r++) {
                    f32x16 xv = load_f32(a->x + r * k + c + half * LANES);
                    for (int i = 0; i < at_once; i++) acc[i][r] += weight[i] * xv;
                }
            }
        for (int i = 0; i < at_once && n + i < last; i++)
            for (int r = 0; r < rows; r++) {
                float sum = lane_sum(acc[i][r]);
                for (int64_t c = vector_end; c < k; c++) {
                    float weight = bf16 ? bf16_to_f32(((const uint16_t *)row[i])[c]) : ((const float *)row[i])[c];
                    sum += weight * a->x[r * k + c];
                }
                out[r * out_stride + n + i - first] = sum;
            }
    }
}

/* ---- dispatch: each (storage or bits, rows of x) a function of its own, its constants folded ---- */

#define FOR_EACH_ROWS(CALL) \
    switch (rows) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break; }

#define HQQ_PANEL(BITS) \
    static void hqq_panel_##BITS(const struct matrix *w, const struct activations *a, int rows, \
                                 int64_t first, int64_t last, float *out, int64_t out_stride) \
    { \
        FOR_EACH_ROWS(HQQ_CALL_##BITS) \
    }
#define HQQ_CALL_2(R) hqq_panel(w, a, R, 2, first, last, out, out_stride)
#define HQQ_CALL_3(R) hqq_panel(w, a, R, 3, first, last, out, out_stride)
#define HQQ_CALL_4(R) hqq_panel(w, a, R, 4, first, last, out, out_stride)
#define HQQ_CALL_8(R) hqq_panel(w, a, R, 8, first, last, out, out_stride)
HQQ_PANEL(2)
HQQ_PANEL(3)
HQQ_PANEL(4)
HQQ_PANEL(8)

#define DENSE_CALL_F32(R) dense_rows(w, a, R, 0, first, last, out, out_stride)
#define DENSE_CALL_BF16(R) dense_rows(w, a, R, 1, first, last, out, out_stride)
static void dense_rows_f32(const struct matrix *w, const struct activations *a, int rows,
                           int64_t first, int64_t last, float *out, int64_t out_stride)
{
    FOR_EACH_ROWS(DENSE_CALL_F32)
}
static void dense_rows_bf16(const struct matrix *w, const struct activations *a, int rows,
                            int64_t first, int64_t last, float *out, int64_t out_stride)
{
    FOR_EACH_ROWS(DENSE_CALL_BF16)
}

/* Rows [first, last) of w into out[r * out_stride + n - first]. */
static void matrix_rows(const struct matrix *w, const struct activations *a, int rows,
                        int64_t first, int64_t last, float *out, int64_t out_stride)
{
    if (w->storage == DENSE_F32) { dense_rows_f32(w, a, rows, first, last, out, out_stride); return; }
    if (w->storage == DENSE_BF16) { dense_rows_bf16(w, a, rows, first, last, out, out_stride); return; }
    for (int64_t p = first; p < last; p += PANEL) {
        int64_t end = min64(p + PANEL, last);
        float *o = out + (p - first);
        switch (w->bits) {
        case 2: hqq_panel_2(w, a, rows, p, end, o, out_stride); break;
        case 3: hqq_panel_3(w, a, rows, p, end, o, out_stride); break;
        case 4: hqq_panel_4(w, a, rows, p, end, o, out_stride); break;
        case 8: hqq_panel_8(w, a, rows, p, end, o, out_stride); break;
        }
    }
}

/* ---- activations ---- */

/* Units of one row of x that prepare_unit fills: HQQ groups, bf16 blocks of 32 columns (the last maybe short). */
static int64_t units_per_row(const struct matrix *w)
{
    return w->storage == HQQ ? w->cols / w->group_size : w->storage == DENSE_BF16 ? (w->cols + 31) / 32 : 0;
}

/* Space for x as w's kernel reads it (filled by prepare_unit). 0: done; 1: out of memory. */
static int allocate(const struct matrix *w, const float *x, int64_t rows, struct activations *a)
{
    *a = (struct activations){x, NULL, NULL};
    if (w->storage == DENSE_F32) return 0;
    a->prepared = malloc(sizeof(float) * rows * w->cols);
    if (w->storage == HQQ) a->sums = malloc(sizeof(float) * rows * units_per_row(w));
    a->x = a->prepared;
    return !a->prepared || (w->storage == HQQ && !a->sums);
}

static void release(struct activations *a) { free(a->prepared); free(a->sums); }

/* Unit u of row r: HQQ, group u's sum and its columns scaled by 2^-code_position; bf16, the 32 columns
   from 32 u, even ones first (a last short block as it is: dense_rows' scalar tail reads it). */
static void prepare_unit(const struct matrix *w, const float *x, int64_t r, int64_t u, struct activations *a)
{
    const int64_t k = w->cols;
    const float *in = x + r * k;
    float *out = a->prepared + r * k;
    if (w->storage == HQQ) {
        const int64_t size = w->group_size, codes = chunk_codes((int)w->bits);
        float sum = 0;
        for (int64_t i = u * size; i < (u + 1) * size; i++) {
            sum += in[i];
            out[i] = in[i] / (float)(1u << code_position((int)(i % codes), (int)w->bits));   /* exact */
        }
        a->sums[r * units_per_row(w) + u] = sum;
        return;
    }
    if (32 * (u + 1) > k) {
        for (int64_t c = 32 * u; c < k; c++) out[c] = in[c];
        return;
    }
    for (int i = 0; i < LANES; i++) {
        out[32 * u + i] = in[32 * u + 2 * i];
        out[32 * u + LANES + i] = in[32 * u + 2 * i + 1];
    }
}

/* ---- threads ---- */

static int thread_count(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Inside a parallel region: x (rows, K) as w's kernel reads it, units shared among the threads. */
static void prepare(const struct matrix *w, const float *x, int64_t rows, struct activations *a)
{
    const int64_t units = units_per_row(w);
#pragma omp for
    for (int64_t i = 0; i < rows * units; i++) prepare_unit(w, x, i / units, i % units, a);
}

/* The rows w's output is computed in: HQQ's padded rows (whole ROW_BLOCKs), a dense matrix's own. */
static int64_t computed_rows(const struct matrix *w) { return w->storage == HQQ ? w->padded_rows : w->rows; }

/* Rows of a panel, the unit of work that a free thread takes next: whole ROW_BLOCKs, at most PANEL, and as
   even as that allows, so that `threads` running at one speed take the same number of panels of `count` rows
   (Mixtral's 14336 rows on 16 threads: 64 panels of 224). A thread that the OS sets aside (for the Python
   thread that drives the GPU, say) then holds up one panel, not a fixed share of the rows. */
static int64_t panel_rows(int64_t count, int threads)
{
    const int64_t blocks = (count + ROW_BLOCK - 1) / ROW_BLOCK, per_thread = (blocks + threads - 1) / threads;
    const int64_t panels = threads * ((per_thread * ROW_BLOCK + PANEL - 1) / PANEL);
    return (blocks + panels - 1) / panels * ROW_BLOCK;
}

static float silu(float v) { return v / (1.0f + expf(-v)); }

/* y (rows, N) = x (rows, K) W^T on `threads` threads. 0: done; 1: out of memory. */
int moe_cpu_linear(const struct matrix *w, const float *x, int64_t rows, float *y, int64_t threads)
{
    struct activations a;
    int failed = allocate(w, x, rows, &a);
    if (!failed) {
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t count = computed_rows(w), size = panel_rows(count, thread_count());
            prepare(w, x, rows, &a);
#pragma omp for schedule(dynamic, 1)
            for (int64_t first = 0; first < count; first += size)
                matrix_rows(w, &a, (int)rows, first, min64(first + size, count), y + first, w->rows);
        }
    }
    release(&a);
    return failed;
}

/* y (rows, hidden) = w2 (silu(w1 x) * (w3 x)): a panel of h is the same rows of w1 and w3 (so its thread
   finishes h = silu(gate) * up), a panel of y rows of w2 once h is whole. w1 and w3 share a layout, so x is
   prepared once for both. 0: done; 1: out of memory; 2: w1 and w3 differ in layout. */
int moe_cpu_swiglu(const struct matrix *w1, const struct matrix *w3, const struct matrix *w2,
                   const float *x, int64_t rows, float *y, int64_t threads)
{
    if (w1->storage != w3->storage || w1->bits != w3->bits || w1->group_size != w3->group_size) return 2;
    const int64_t ffn = w1->rows;
    float *h = malloc(sizeof(float) * rows * ffn);
    struct activations a13, a2;
    int failed = allocate(w1, x, rows, &a13) | allocate(w2, h, rows, &a2) | !h;
    if (!failed) {
#pragma omp parallel num_threads((int)threads)
        {
            const int64_t count = computed_rows(w1), size = panel_rows(count, thread_count());
            prepare(w1, x, rows, &a13);
#pragma omp for schedule(dynamic, 1)
            for (int64_t first = 0; first < count; first += size) {
                const int64_t last = min64(first + size, count);
                float up[MAX_ROWS * PANEL];
                matrix_rows(w1, &a13, (int)rows, first, last, h + first, ffn);
                matrix_rows(w3, &a13, (int)rows, first, last, up, PANEL);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t n = first; n < min64(last, ffn); n++)
                        h[r * ffn + n] = silu(h[r * ffn + n]) * up[r * PANEL + n - first];
            }
            const int64_t count2 = computed_rows(w2), size2 = panel_rows(count2, thread_count());
            prepare(w2, h, rows, &a2);
#pragma omp for schedule(dynamic, 1)
            for (int64_t first = 0; first < count2; first += size2)
                matrix_rows(w2, &a2, (int)rows, first, min64(first + size2, count2), y + first, w2->rows);
        }
    }
    free(h);
    release(&a13); release(&a2);
    return failed;
}
