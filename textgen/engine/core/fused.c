/* The CPU kernels of a Llama model step (see fused.py): everything between the matrix products, the
 * Q4_1 x int8 product, and top-p sampling.
 *
 * At batch 1 a decode step runs ~1,000 PyTorch operators, most of them on a few hundred numbers, and
 * each costs microseconds of dispatch whatever its size: that, not arithmetic, is most of the step.
 * These functions do the work between two matrix products in one call each: residual add + RMSNorm,
 * rotary embedding + KV-cache write + attention over the cached positions, SiLU(gate) * up; with w8a8
 * products they also quantize the next product's input and rescale the last one's output.
 *
 * Tensors are bfloat16 (uint16_t here), row-major and contiguous; arithmetic is float32 and each
 * result is rounded to bfloat16 once, where PyTorch's bf16 path rounds after every operator.
 * The w8a8 helpers (quantize_rows, dequantize_rows) also take float32, selected by a flag.
 *
 * Loops over rows run on OpenMP threads when there is enough work. The library is loaded after torch,
 * whose wheel ships its own libgomp.so.1: the dynamic loader resolves this library's libgomp.so.1 to the
 * one already loaded, so these loops and PyTorch's matrix products share one thread team (a second
 * runtime would make both teams spin against each other on the same cores). fused.py checks that.
 */
#include "fused.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Below this many elements a loop runs on the calling thread: waking the team costs more. */
#define PARALLEL_WORK 1024

/* Signatures, shape limits (MAX_*) and status codes (FUSED_*) are in fused.h. */
static int parallel = 1;
void set_parallel(int on) { parallel = on; }

/* Scratch is on the heap, one buffer per thread per call (a thread's stack may be small: 64-256 KiB
 * arrays there could overflow it). A thread whose allocation failed skips its rows and the call reports
 * FUSED_NO_MEMORY; every thread still reaches the loop, as an OpenMP work-sharing loop requires. */
static void *scratch(int64_t count, size_t size, int *failed) {
    void *buffer = malloc((size_t)(count > 0 ? count : 1) * size);
    if (!buffer) {
#pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

/* Every outlier index within the row it picks from. */
static int outliers_within(const int64_t *outliers, int64_t count, int64_t width) {
    for (int64_t j = 0; j < count; j++)
        if (outliers[j] < 0 || outliers[j] >= width) return 0;
    return 1;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* x [rows, width] += delta (when delta is not NULL, rounded to bf16 as the residual stream is kept);
 * out [rows, width] = x / rms(x) * weight. */
int add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                 int64_t width, float eps) {
    if (width > MAX_WIDTH || width <= 0 || rows < 0) return FUSED_BAD_SHAPE;
    int failed = 0;
#pragma omp parallel if (parallel && rows * width >= PARALLEL_WORK)
    {
        float *row = scratch(width, sizeof *row, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!row) continue;
            uint16_t *xr = x + r * width;
            float squares = 0.0f;
            for (int64_t i = 0; i < width; i++) {
                float v = bf16_to_f32(xr[i]);
                if (delta) {
                    xr[i] = f32_to_bf16(v + bf16_to_f32(delta[r * width + i]));
                    v = bf16_to_f32(xr[i]);
                }
                row[i] = v;
                squares += v * v;
            }
            float inv = 1.0f / sqrtf(squares / (float)width + eps);
            for (int64_t i = 0; i < width; i++) {
                out[r * width + i] = f32_to_bf16(row[i] * inv * bf16_to_f32(weight[i]));
            }
        }
        free(row);
    }
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

/* Split-half rotary embedding (as transformers' Llama): for i < D/2, (x[i], x[i + D/2]) is rotated by
 * the position's angle; cos/sin rows hold the same angle at i and i + D/2. */
static void rotate(const uint16_t *x, const uint16_t *cos_row, const uint16_t *sin_row, float *out, int64_t dim) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = bf16_to_f32(x[i]), b = bf16_to_f32(x[i + half]);
        out[i] = bf16_to_f32(f32_to_bf16(a * bf16_to_f32(cos_row[i]) - b * bf16_to_f32(sin_row[i])));
        out[i + half] = bf16_to_f32(f32_to_bf16(b * bf16_to_f32(cos_row[i + half]) + a * bf16_to_f32(sin_row[i + half])));
    }
}

#if defined(__AVX512BF16__)
/* sixteen positions' dot-product partial sums v[0..15] (16 lanes each) added across lanes, position j's total
 * in lane j: pairs, then quads, then halves of lanes by shuffles (a transpose) rather than one by one. */
static inline __attribute__((always_inline)) __m512 lane_totals(const __m512 *v) {
    __m512 pairs[8], quads[4];
    for (int j = 0; j < 8; j++)
        pairs[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) {
        __m512d a = _mm512_castps_pd(pairs[2 * j]), b = _mm512_castps_pd(pairs[2 * j + 1]);
        quads[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* key_scores for head size 64 and the G query heads of one KV head at once (queries q + h * q_stride, scores
 * scores + h * s_stride), fully unrolled: the same operations in the same order as key_scores, so the same
 * results, with the two query vectors per head and the sixteen partial sums kept in registers. The positions
 * after the last whole sixteen are left to key_scores; returns how many were done. */
static inline __attribute__((always_inline)) int64_t key_scores_64(const uint16_t *q, int64_t q_stride,
                                                                  const uint16_t *keys, int64_t live, float scale,
                                                                  float *scores, int64_t s_stride, const int G) {
    __m512bh qv[MAX_GROUP][2];
    for (int h = 0; h < G; h++)
        for (int c = 0; c < 2; c++) qv[h][c] = (__m512bh)_mm512_loadu_si512(q + h * q_stride + 32 * c);
    __m512 scale_v = _mm512_set1_ps(scale);
    int64_t t = 0;
    for (; t + 16 <= live; t += 16)
        for (int h = 0; h < G; h++) {
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                const uint16_t *kt = keys + (t + j) * 64;
                __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[h][0], (__m512bh)_mm512_loadu_si512(kt));
                v[j] = _mm512_dpbf16_ps(acc, qv[h][1], (__m512bh)_mm512_loadu_si512(kt + 32));
            }
            _mm512_storeu_ps(scores + h * s_stride + t, _mm512_mul_ps(lane_totals(v), scale_v));
        }
    return t;
}
#endif

/* scores[t] = scale * (q . keys[t]) for t < live: q [dim] and keys [live, dim] bf16. */
static void key_scores(const uint16_t *q, const uint16_t *keys, int64_t live, int64_t dim, float scale,
                       float *scores) {
    int64_t t = 0;
#if defined(__AVX512BF16__)
    /* bf16 pairs multiplied into float32 sums by the CPU's dot-product instruction; sixteen positions'
     * partial sums are then added across lanes together (a transpose by shuffles) instead of one by one. */
    if (dim % 32 == 0) {
        __m512bh qv[MAX_DIM / 32];
        int64_t chunks = dim / 32;
        for (int64_t c = 0; c < chunks; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
        __m512 scale_v = _mm512_set1_ps(scale);
        for (; t + 16 <= live; t += 16) {
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++)
                    acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(keys + (t + j) * dim + 32 * c));
                v[j] = acc;
            }
            _mm512_storeu_ps(scores + t, _mm512_mul_ps(lane_totals(v), scale_v));
        }
    }
#endif
    for (; t < live; t++) {
        const uint16_t *kt = keys + t * dim;
        float dot = 0.0f;
        for (int64_t i = 0; i < dim; i++) dot += bf16_to_f32(q[i]) * bf16_to_f32(kt[i]);
        scores[t] = dot * scale;
    }
}

/* key_scores for each of the G = group query heads of one KV head: head h's query at q + h * q_stride, its
 * scores at scores + h * s_stride. */
static void group_scores(const uint16_t *q, int64_t q_stride, const uint16_t *keys, int64_t live, int64_t dim,
                         int64_t group, float scale, float *scores, int64_t s_stride) {
    int64_t done = 0;
#if defined(__AVX512BF16__)
    if (dim == 64) {
        switch (group) { /* a constant G each: the compiler unrolls and keeps the sums in registers */
            case 1: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 1); break;
            case 2: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 2); break;
            case 3: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 3); break;
            case 4: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 4); break;
            case 5: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 5); break;
            case 6: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 6); break;
            case 7: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 7); break;
            case 8: done = key_scores_64(q, q_stride, keys, live, scale, scores, s_stride, 8); break;
            default: break;
        }
    }
#endif
    if (done < live) /* the rest (or all): key_scores on the positions left, each scored as it would score it */
        for (int64_t h = 0; h < group; h++)
            key_scores(q + h * q_stride, keys + done * dim, live - done, dim, scale, scores + h * s_stride + done);
}

/* Head size 64 and 1..4 query heads per KV head: weighted_values keeps its sums in the "paired" layout
 * (paired_at), where a bf16 value's conversion to float32 is one instruction per 16 values, not two. */
static int paired_sums(int64_t dim, int64_t group) {
#if defined(__AVX512F__)
    return dim == 64 && group >= 1 && group <= 4;
#else
    (void)dim, (void)group;
    return 0;
#endif
}

/* Where element d (< 64) of a head's sums is in the paired layout: 64 floats as four vectors of 16, the even
 * elements of 0..31, the odd ones, then the even and the odd ones of 32..63. */
static inline int64_t paired_at(int64_t d) { return (d / 32) * 32 + (d % 2) * 16 + (d % 32) / 2; }

#if defined(__AVX512F__)
/* weighted_values for head size 64 and a constant number of heads G: the G x 64 sums stay in registers
 * (G x 4 vectors) over all positions instead of going through memory at each one. Sixteen 32-bit words of
 * values hold 32 bf16 values: shifted left 16 bits, the even ones as float32; masked, the odd ones. Each sum
 * is still the same products added in the same (position) order. */
static inline __attribute__((always_inline)) void weighted_values_64(const float *probs, int64_t stride,
                                                                    const uint16_t *values, int64_t live, const int G,
                                                                    float *acc) {
    __m512 sums[4][4];
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int h = 0; h < G; h++)
        for (int c = 0; c < 4; c++) sums[h][c] = _mm512_loadu_ps(acc + h * 64 + 16 * c);
    for (int64_t t = 0; t < live; t++) {
        __m512 v[4];
        for (int c = 0; c < 2; c++) {
            __m512i raw = _mm512_loadu_si512(values + t * 64 + 32 * c);
            v[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            v[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
        }
        for (int h = 0; h < G; h++) {
            __m512 p = _mm512_set1_ps(probs[h * stride + t]);
            for (int c = 0; c < 4; c++) sums[h][c] = _mm512_fmadd_ps(p, v[c], sums[h][c]);
        }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + h * 64 + 16 * c, sums[h][c]);
}
#endif

#if defined(__AVX512F__)
/* weighted_values_64 for two rows over the same positions (two prompt rows over a whole block): each value
 * converted once for both. Each row's sums are those weighted_values_64 makes for it alone. G <= 3 (the 2 G x 4
 * sums stay in registers). */
static inline __attribute__((always_inline)) void weighted_values_64_rows2(const float *probs_a, int64_t stride_a,
                                                                          const float *probs_b, int64_t stride_b,
                                                                          const uint16_t *values, int64_t live,
                                                                          const int G, float *acc_a, float *acc_b) {
    __m512 sa[3][4], sb[3][4];
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int h = 0; h < G; h++)
        for (int c = 0; c < 4; c++) {
            sa[h][c] = _mm512_loadu_ps(acc_a + h * 64 + 16 * c);
            sb[h][c] = _mm512_loadu_ps(acc_b + h * 64 + 16 * c);
        }
    for (int64_t t = 0; t < live; t++) {
        __m512 v[4];
        for (int c = 0; c < 2; c++) {
            __m512i raw = _mm512_loadu_si512(values + t * 64 + 32 * c);
            v[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            v[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));
        }
        for (int h = 0; h < G; h++) {
            __m512 pa = _mm512_set1_ps(probs_a[h * stride_a + t]), pb = _mm512_set1_ps(probs_b[h * stride_b + t]);
            for (int c = 0; c < 4; c++) {
                sa[h][c] = _mm512_fmadd_ps(pa, v[c], sa[h][c]);
                sb[h][c] = _mm512_fmadd_ps(pb, v[c], sb[h][c]);
            }
        }
    }
    for (int h = 0; h < G; h++)
        for (int c = 0; c < 4; c++) {
            _mm512_storeu_ps(acc_a + h * 64 + 16 * c, sa[h][c]);
            _mm512_storeu_ps(acc_b + h * 64 + 16 * c, sb[h][c]);
        }
}
#endif

/* Two rows' weighted_values over the same `live` positions of `values`: one pass for both where there is one
 * (paired sums, group <= 3), else one after the other; the sums are the same either way. */
static void weighted_values_rows2(const float *probs_a, int64_t stride_a, const float *probs_b, int64_t stride_b,
                                  const uint16_t *values, int64_t live, int64_t dim, int64_t group, float *acc_a,
                                  float *acc_b);

/* acc [group, dim] += sum over t < live of probs[h * stride + t] * values[t] (values [live, dim] bf16): one
 * block of positions at a time, in position order, so the sums are those of one pass over all of them. acc is
 * in the paired layout where paired_sums(dim, group). */
static void weighted_values(const float *probs, int64_t stride, const uint16_t *values, int64_t live, int64_t dim,
                            int64_t group, float *acc) {
#if defined(__AVX512F__)
    if (paired_sums(dim, group)) {
        switch (group) { /* a constant G each: the compiler unrolls and keeps the sums in registers */
            case 1: weighted_values_64(probs, stride, values, live, 1, acc); return;
            case 2: weighted_values_64(probs, stride, values, live, 2, acc); return;
            case 3: weighted_values_64(probs, stride, values, live, 3, acc); return;
            default: weighted_values_64(probs, stride, values, live, 4, acc); return;
        }
    }
#endif
    for (int64_t t = 0; t < live; t++) {
        float vt[MAX_DIM];
        for (int64_t i = 0; i < dim; i++) vt[i] = bf16_to_f32(values[t * dim + i]);
        for (int64_t h = 0; h < group; h++) {
            float p = probs[h * stride + t], *ah = acc + h * dim;
            for (int64_t i = 0; i < dim; i++) ah[i] += p * vt[i];
        }
    }
}

static void weighted_values_rows2(const float *probs_a, int64_t stride_a, const float *probs_b, int64_t stride_b,
                                  const uint16_t *values, int64_t live, int64_t dim, int64_t group, float *acc_a,
                                  float *acc_b) {
#if defined(__AVX512F__)
    if (paired_sums(dim, group) && group <= 3) {
        switch (group) {
            case 1: weighted_values_64_rows2(probs_a, stride_a, probs_b, stride_b, values, live, 1, acc_a, acc_b); return;
            case 2: weighted_values_64_rows2(probs_a, stride_a, probs_b, stride_b, values, live, 2, acc_a, acc_b); return;
            default: weighted_values_64_rows2(probs_a, stride_a, probs_b, stride_b, values, live, 3, acc_a, acc_b); return;
        }
    }
#endif
    weighted_values(probs_a, stride_a, values, live, dim, group, acc_a);
    weighted_values(probs_b, stride_b, values, live, dim, group, acc_b);
}

/* x [dim] bf16 -> out [dim] = x / rms(x) * weight, rounded to bf16 (a query or key head's norm). */
static void head_norm(const uint16_t *x, const uint16_t *weight, float eps, int64_t dim, uint16_t *out) {
    float squares = 0.0f;
    for (int64_t i = 0; i < dim; i++) {
        float v = bf16_to_f32(x[i]);
        squares += v * v;
    }
    float inv = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) out[i] = f32_to_bf16(bf16_to_f32(x[i]) * inv * bf16_to_f32(weight[i]));
}

/* One head's rotation, after its norm when it has one. */
static void norm_rotate(const uint16_t *x, const uint16_t *norm, float eps, const uint16_t *cos_row,
                        const uint16_t *sin_row, float *out, int64_t dim) {
    uint16_t normed[MAX_DIM];
    if (norm) {
        head_norm(x, norm, eps, dim, normed);
        x = normed;
    }
    rotate(x, cos_row, sin_row, out, dim);
}

/* The first position a token at `pos` attends: the last `window` positions (itself included), or all. */
static int64_t first_attended(int64_t pos, int64_t window) {
    return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}

/* Rows of one sequence (a prompt's tokens) attend in tiles of up to ATTENTION_TILE rows: each block of its
 * keys and values is then read once for all of them, while it is in the L1 cache, instead of once per row
 * from L2 or memory. Every row still makes exactly the calls it would make alone (the same segments of the
 * same blocks, in the same order, with its scratch at the same alignment), so a row's result is bit for bit
 * the same however rows are grouped into calls (a prompt in chunks, at an offset, or beside other rows). */
#define ATTENTION_TILE 8

/* Scratch aligned to 64 bytes: the compiler's vectorised loops then start at the same alignment for a row
 * wherever in the scratch its tile puts it (a reduction's order may follow its alignment). */
static void *aligned_scratch(int64_t count, size_t size, int *failed) {
    void *buffer = NULL;
    if (posix_memalign(&buffer, 64, (size_t)(count > 0 ? count : 1) * size)) {
#pragma omp atomic write
        *failed = 1;
        return NULL;
    }
    return buffer;
}

/* One row's part of a block of positions: positions from..to of block `b`, or none (from > to). */
static inline int64_t row_segment(int64_t b, int64_t block_size, int64_t first, int64_t pos, int64_t *from) {
    int64_t lo = b * block_size, hi = lo + block_size - 1;
    *from = first > lo ? first : lo;
    return (pos < hi ? pos : hi) - *from + 1;
}

/* Tiles of rows: consecutive rows of the same sequence (cache row), at most ATTENTION_TILE each; starts[t] is
 * tile t's first row, starts[tiles] = rows. Returns the number of tiles; *widest the most rows in one. */
static int64_t row_tiles(const int64_t *cache_rows, int64_t rows, int64_t *starts, int64_t *widest) {
    int64_t tiles = 0;
    *widest = 0;
    for (int64_t r = 0; r < rows; r++) {
        if (r == 0 || cache_rows[r] != cache_rows[r - 1] || r - starts[tiles - 1] == ATTENTION_TILE) starts[tiles++] = r;
        int64_t width = r + 1 - starts[tiles - 1];
        *widest = width > *widest ? width : *widest;
    }
    starts[tiles] = rows;
    return tiles;
}

/* Attention for `rows` new tokens, each at its own position of its own sequence: one new token per
 * sequence when decoding, a prompt's tokens at positions start..start+L-1 of one sequence when prefilling,
 * or both. The cache is paged: keys, values [blocks, Hkv, block_size, D]; a sequence's position p lives in
 * block tables[sequence, p / block_size] at offset p % block_size.
 * qkv [rows, (Hq + 2 Hkv) D]: queries, keys, values of the new tokens (before norm and rotary).
 * cos, sin [P, D]; positions [rows]: where each token goes (tokens cached before it in its sequence).
 * cache_rows [rows]: each token's row in tables [table_rows, table_width] (block ids).
 * q_norm, k_norm [D] (NULL for none): each query / key head RMS-normalised with that weight (eps norm_eps)
 * before its rotation (Gemma 3, Qwen3). window > 0: each token attends to the last `window` positions of its
 * sequence only (sliding-window layers); 0: to all of them.
 * out [rows, Hq D]: softmax(scale q.k) v over the attended positions, query heads grouped over KV heads.
 * Every token's key and value are written before any token attends, so a prompt's tokens see each other
 * (causally) in the same call. */
int rotary_cache_attention(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, int64_t angles,
                           const int64_t *positions, const int64_t *cache_rows, const int64_t *tables,
                           uint16_t *keys, uint16_t *values, uint16_t *out, int64_t rows, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t blocks, int64_t block_size, int64_t table_rows,
                           int64_t table_width, float scale, const uint16_t *q_norm, const uint16_t *k_norm,
                           float norm_eps, int64_t window) {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || dim <= 0 || dim % 2 || rows < 0) return FUSED_BAD_SHAPE;
    int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim, work = 0, longest = 0;
    if (dim > MAX_DIM || heads > MAX_HEADS || group > MAX_GROUP || blocks <= 0 || block_size <= 0 || table_width <= 0 ||
        window < 0)
        return FUSED_BAD_SHAPE;
    for (int64_t r = 0; r < rows; r++) {
        if (positions[r] < 0 || positions[r] >= table_width * block_size || positions[r] >= angles)
            return FUSED_BAD_INDEX;
        if (cache_rows[r] < 0 || cache_rows[r] >= table_rows) return FUSED_BAD_INDEX;
        int64_t first = first_attended(positions[r], window), live = positions[r] + 1 - first;
        if (live > MAX_LIVE) return FUSED_BAD_SHAPE;
        const int64_t *table = tables + cache_rows[r] * table_width;
        for (int64_t b = first / block_size; b <= positions[r] / block_size; b++)
            if (table[b] < 0 || table[b] >= blocks) return FUSED_BAD_INDEX;
        work += live * kv_heads * dim;
        longest = live > longest ? live : longest;
    }
    int64_t *starts = malloc((size_t)(rows + 1) * sizeof *starts), widest;
    if (!starts) return FUSED_NO_MEMORY;
    int64_t tiles = row_tiles(cache_rows, rows, starts, &widest);
    int64_t stride = (longest + 15) / 16 * 16; /* a row's scores start 64-byte aligned */
    const int paired = paired_sums(dim, group);
    int failed = 0;
#pragma omp parallel if (parallel && work >= 4 * PARALLEL_WORK)
    {
        float *scores = aligned_scratch(widest * group * stride, sizeof *scores, &failed);
        float *sums = aligned_scratch(widest * group * dim, sizeof *sums, &failed);
        uint16_t *queries = aligned_scratch(widest * group * MAX_DIM, sizeof *queries, &failed);
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < rows * kv_heads; pair++) {
            int64_t r = pair / kv_heads, g = pair % kv_heads, pos = positions[r];
            float k[MAX_DIM];
            const uint16_t *src = qkv + r * width;
            int64_t block = tables[cache_rows[r] * table_width + pos / block_size];
            int64_t at = (((block * kv_heads + g) * block_size) + pos % block_size) * dim;
            norm_rotate(src + (heads + g) * dim, k_norm, norm_eps, cos + pos * dim, sin + pos * dim, k, dim);
            for (int64_t i = 0; i < dim; i++) {
                keys[at + i] = f32_to_bf16(k[i]);
                values[at + i] = src[(heads + kv_heads + g) * dim + i];
            }
        }
        /* (the implicit barrier here: all keys and values are in place) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < tiles * kv_heads; item++) {
            if (!scores || !sums || !queries) continue;
            int64_t tile = item / kv_heads, g = item % kv_heads, start = starts[tile], count = starts[tile + 1] - start;
            const int64_t *table = tables + cache_rows[start] * table_width;
            const int64_t *pos = positions + start;
            int64_t first[ATTENTION_TILE], live[ATTENTION_TILE], lowest = pos[0], highest = pos[0];
            for (int64_t i = 0; i < count; i++) {
                first[i] = first_attended(pos[i], window);
                live[i] = pos[i] + 1 - first[i];
                lowest = first[i] < lowest ? first[i] : lowest;
                highest = pos[i] > highest ? pos[i] : highest;
                const uint16_t *src = qkv + (start + i) * width;
                for (int64_t h = 0; h < group; h++) {
                    float q[MAX_DIM];
                    uint16_t *qh = queries + (i * group + h) * MAX_DIM;
                    norm_rotate(src + (g * group + h) * dim, q_norm, norm_eps, cos + pos[i] * dim, sin + pos[i] * dim,
                                q, dim);
                    for (int64_t d = 0; d < dim; d++) qh[d] = f32_to_bf16(q[d]); /* exact: rotate rounds to bf16 */
                }
            }
            for (int64_t b = lowest / block_size; b <= highest / block_size; b++) /* a block's positions are contiguous */
                for (int64_t i = 0, from, n; i < count; i++)
                    if ((n = row_segment(b, block_size, first[i], pos[i], &from)) > 0) {
                        int64_t base = (((table[b] * kv_heads + g) * block_size) + from % block_size) * dim;
                        group_scores(queries + i * group * MAX_DIM, MAX_DIM, keys + base, n, dim, group, scale,
                                     scores + i * group * stride + (from - first[i]), live[i]);
                    }
            for (int64_t i = 0; i < count; i++)
                for (int64_t h = 0; h < group; h++) {
                    float *sh = scores + i * group * stride + h * live[i], best = sh[0], total = 0.0f;
                    for (int64_t t = 1; t < live[i]; t++) best = sh[t] > best ? sh[t] : best;
                    for (int64_t t = 0; t < live[i]; t++) {
                        sh[t] = expf(sh[t] - best);
                        total += sh[t];
                    }
                    for (int64_t t = 0; t < live[i]; t++) sh[t] /= total;
                }
            for (int64_t i = 0; i < count * group * dim; i++) sums[i] = 0.0f;
            for (int64_t b = lowest / block_size; b <= highest / block_size; b++)
                for (int64_t i = 0, from, n, from2, n2; i < count; i++)
                    if ((n = row_segment(b, block_size, first[i], pos[i], &from)) > 0) {
                        int64_t base = (((table[b] * kv_heads + g) * block_size) + from % block_size) * dim;
                        const float *probs = scores + i * group * stride + (from - first[i]);
                        if (i + 1 < count && (n2 = row_segment(b, block_size, first[i + 1], pos[i + 1], &from2)) == n &&
                            from2 == from) { /* the next row over the same positions: both in one pass */
                            weighted_values_rows2(probs, live[i], scores + (i + 1) * group * stride + (from - first[i + 1]),
                                                  live[i + 1], values + base, n, dim, group, sums + i * group * dim,
                                                  sums + (i + 1) * group * dim);
                            i++;
                        } else
                            weighted_values(probs, live[i], values + base, n, dim, group, sums + i * group * dim);
                    }
            for (int64_t i = 0; i < count; i++) {
                uint16_t *o = out + (start + i) * heads * dim + g * group * dim;
                const float *si = sums + i * group * dim;
                if (paired)
                    for (int64_t h = 0; h < group; h++)
                        for (int64_t d = 0; d < dim; d++) o[h * dim + d] = f32_to_bf16(si[h * dim + paired_at(d)]);
                else
                    for (int64_t d = 0; d < group * dim; d++) o[d] = f32_to_bf16(si[d]);
            }
        }
        free(scores);
        free(sums);
        free(queries);
    }
    free(starts);
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

/* gate_up [rows, 2F] (gate then up) -> out [rows, F] = silu(gate) * up. */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t features) {
#pragma omp parallel for schedule(static) if (parallel && rows * features >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * features, *up = gate + features;
        for (int64_t i = 0; i < features; i++) {
            float g = bf16_to_f32(gate[i]);
            float silu = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            out[r * features + i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
        }
    }
}


/* gate_up [rows, 2F] (gate then up) -> out [rows, F] = gelu_tanh(gate) * up, the GELU's tanh form
 * 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3), rounded to bf16 before the product (as PyTorch's
 * bf16). Computed as g / (1 + exp(-2z)), the same value: expf costs a fraction of tanhf here. */
void gelu_tanh_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t features) {
    const float k0 = 2.0f * 0.7978845608028654f, k1 = 0.044715f;
#pragma omp parallel for schedule(static) if (parallel && rows * features >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * features, *up = gate + features;
        for (int64_t i = 0; i < features; i++) {
            float g = bf16_to_f32(gate[i]);
            float t = -k0 * (g + k1 * g * g * g);
            t = t < 80.0f ? t : 80.0f; /* exp stays finite (the build may assume finite math): the result is 0 */
            float gelu = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(t))));
            out[r * features + i] = f32_to_bf16(gelu * bf16_to_f32(up[i]));
        }
    }
}


static inline float load(const void *data, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)data)[i]) : ((const float *)data)[i];
}

/* Quantize one row for a w8a8 product: the `count` outlier channels go to outlying (and are zeroed in
 * row), the rest to q = round(row * 127 / row_max), row_max = max |row| over them. */
static void quantize_row(float *row, int64_t width, const int64_t *outliers, int64_t count, int8_t *q,
                         float *row_max, float *outlying) {
    for (int64_t j = 0; j < count; j++) {
        outlying[j] = row[outliers[j]];
        row[outliers[j]] = 0.0f;
    }
    float largest = 1e-12f;
    for (int64_t i = 0; i < width; i++) largest = fmaxf(largest, fabsf(row[i]));
    float step = 127.0f / largest; /* a true division, as W8A8Kernel's PyTorch path: the same integers */
    *row_max = largest;
    for (int64_t i = 0; i < width; i++) q[i] = (int8_t)nearbyintf(row[i] * step);
}

/* One row of a w8a8 product's result: out = acc * row_max * col_scale + outlying . outlier_weight_t + bias. */
static void rescale_row(const int32_t *acc, float row_max, const float *col_scale, const float *outlying,
                        const float *outlier_weight_t, int64_t count, const float *bias, int64_t cols, float *out) {
    for (int64_t c = 0; c < cols; c++) out[c] = (float)acc[c] * row_max * col_scale[c] + (bias ? bias[c] : 0.0f);
    for (int64_t j = 0; j < count; j++) {
        float o = outlying[j];
        const float *w = outlier_weight_t + j * cols;
        for (int64_t c = 0; c < cols; c++) out[c] += o * w[c];
    }
}

/* w8a8 input side. x [rows, width] (bf16 or float32) -> q [rows, width] int8 without the `count` outlier
 * channels, row_max [rows], outlying [rows, count] (see quantize_row). */
int quantize_rows(const void *x, int x_bf16, const int64_t *outliers, int64_t count, int8_t *q, float *row_max,
                  float *outlying, int64_t rows, int64_t width) {
    if (width > MAX_WIDTH || width <= 0 || rows < 0 || count < 0) return FUSED_BAD_SHAPE;
    if (!outliers_within(outliers, count, width)) return FUSED_BAD_INDEX;
    int failed = 0;
#pragma omp parallel if (parallel && rows * width >= PARALLEL_WORK)
    {
        float *row = scratch(width, sizeof *row, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!row) continue;
            for (int64_t i = 0; i < width; i++) row[i] = load(x, x_bf16, r * width + i);
            quantize_row(row, width, outliers, count, q + r * width, row_max + r, outlying + r * count);
        }
        free(row);
    }
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

/* A decode layer's residual step with w8a8 products on both sides, in one pass per row:
 * x [rows, width] bf16 += the previous product's result (acc [rows, width] int32 rescaled as in
 * dequantize_rows; skipped when acc is NULL), rounded to bf16 as the residual stream is kept; then
 * RMSNorm(x) * weight is quantized for the next product (q, row_max, outlying as quantize_rows), or,
 * when q is NULL, written to out [rows, width] bf16. */
int residual_norm_quantize(uint16_t *x, const int32_t *acc, const float *acc_row_max, const float *col_scale,
                           const float *acc_outlying, const float *outlier_weight_t, int64_t acc_count,
                           const float *bias, const uint16_t *weight, float eps, const int64_t *outliers,
                           int64_t count, int8_t *q, float *row_max, float *outlying, uint16_t *out, int64_t rows,
                           int64_t width) {
    if (width > MAX_WIDTH || width <= 0 || rows < 0 || count < 0 || acc_count < 0) return FUSED_BAD_SHAPE;
    if (q && !outliers_within(outliers, count, width)) return FUSED_BAD_INDEX;
    int failed = 0;
#pragma omp parallel if (parallel && rows * width >= PARALLEL_WORK)
    {
        float *row = scratch(width, sizeof *row, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!row) continue;
            uint16_t *xr = x + r * width;
            if (acc) {
                rescale_row(acc + r * width, acc_row_max[r], col_scale, acc_outlying + r * acc_count, outlier_weight_t,
                            acc_count, bias, width, row);
                for (int64_t i = 0; i < width; i++) xr[i] = f32_to_bf16(bf16_to_f32(xr[i]) + row[i]);
            }
            float squares = 0.0f;
            for (int64_t i = 0; i < width; i++) {
                row[i] = bf16_to_f32(xr[i]);
                squares += row[i] * row[i];
            }
            float inv = 1.0f / sqrtf(squares / (float)width + eps);
            for (int64_t i = 0; i < width; i++) row[i] = row[i] * inv * bf16_to_f32(weight[i]);
            if (q) {
                quantize_row(row, width, outliers, count, q + r * width, row_max + r, outlying + r * count);
            } else {
                for (int64_t i = 0; i < width; i++) out[r * width + i] = f32_to_bf16(row[i]);
            }
        }
        free(row);
    }
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

/* The MLP's middle with w8a8 products on both sides: acc [rows, 2F] int32 (gate then up) rescaled as in
 * dequantize_rows, silu(gate) * up quantized for the down projection (q [rows, F], row_max, outlying). */
int silu_quantize(const int32_t *acc, const float *acc_row_max, const float *col_scale, const float *acc_outlying,
                  const float *outlier_weight_t, int64_t acc_count, const float *bias, const int64_t *outliers,
                  int64_t count, int8_t *q, float *row_max, float *outlying, int64_t rows, int64_t features) {
    if (features > MAX_WIDTH || features <= 0 || rows < 0 || count < 0 || acc_count < 0) return FUSED_BAD_SHAPE;
    if (!outliers_within(outliers, count, features)) return FUSED_BAD_INDEX;
    int failed = 0;
#pragma omp parallel if (parallel && rows * features >= PARALLEL_WORK)
    {
        float *gate_up = scratch(2 * features, sizeof *gate_up, &failed);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!gate_up) continue;
            rescale_row(acc + r * 2 * features, acc_row_max[r], col_scale, acc_outlying + r * acc_count, outlier_weight_t,
                        acc_count, bias, 2 * features, gate_up);
            for (int64_t i = 0; i < features; i++) {
                float g = gate_up[i];
                gate_up[i] = g / (1.0f + expf(-g)) * gate_up[features + i];
            }
            quantize_row(gate_up, features, outliers, count, q + r * features, row_max + r, outlying + r * count);
        }
        free(gate_up);
    }
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

#define COLUMN_TILE 64 /* four AVX-512 vectors: a row's tile of outputs stays in registers */

/* w8a8 output side. acc [rows, cols] int32 (the integer product) -> out [rows, cols] (bf16 or float32) =
 * acc * row_max[r] * col_scale[c] + outlying[r, :] . outlier_weight_t[:, c] + bias[c] (bias may be NULL).
 * col_scale already holds the weight's and the activation's 1/127. Column tiles outermost: a tile's
 * outlier weights (count x 256 bytes) stay in L1 while every row uses them. */
void dequantize_rows(const int32_t *acc, const float *row_max, const float *col_scale, const float *outlying,
                     const float *outlier_weight_t, int64_t count, const float *bias, void *out, int out_bf16,
                     int64_t rows, int64_t cols) {
    int64_t tiles = (cols + COLUMN_TILE - 1) / COLUMN_TILE;
#pragma omp parallel for schedule(static) if (parallel && rows * cols >= PARALLEL_WORK)
    for (int64_t tile = 0; tile < tiles; tile++) {
        int64_t c0 = tile * COLUMN_TILE;
        if (c0 + COLUMN_TILE > cols) { /* the ragged last tile, element by element */
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = c0; c < cols; c++) {
                    float y = (float)acc[r * cols + c] * row_max[r] * col_scale[c] + (bias ? bias[c] : 0.0f);
                    for (int64_t j = 0; j < count; j++) y += outlying[r * count + j] * outlier_weight_t[j * cols + c];
                    if (out_bf16) ((uint16_t *)out)[r * cols + c] = f32_to_bf16(y);
                    else ((float *)out)[r * cols + c] = y;
                }
            continue;
        }
        float scale[COLUMN_TILE], base[COLUMN_TILE];
        for (int64_t c = 0; c < COLUMN_TILE; c++) {
            scale[c] = col_scale[c0 + c];
            base[c] = bias ? bias[c0 + c] : 0.0f;
        }
        for (int64_t r = 0; r < rows; r++) {
            const int32_t *a = acc + r * cols + c0;
            float y[COLUMN_TILE], rm = row_max[r];
            for (int64_t c = 0; c < COLUMN_TILE; c++) y[c] = (float)a[c] * rm * scale[c] + base[c];
            for (int64_t j = 0; j < count; j++) {
                float o = outlying[r * count + j];
                const float *w = outlier_weight_t + j * cols + c0;
                for (int64_t c = 0; c < COLUMN_TILE; c++) y[c] += o * w[c];
            }
            if (out_bf16) {
                uint16_t *o16 = (uint16_t *)out + r * cols + c0;
                for (int64_t c = 0; c < COLUMN_TILE; c++) o16[c] = f32_to_bf16(y[c]);
            } else {
                memcpy((float *)out + r * cols + c0, y, sizeof y);
            }
        }
    }
}

/* ----- sampling ------------------------------------------------------------------------------------ */

#define SAMPLE_BLOCK 64

/* -inf marks a refused token (grammar masks). The file is built with -ffast-math, which lets the compiler
 * assume no infinities in float comparisons, so they are recognised by their bits. */
static inline int refused(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits == 0xFF800000u;
}

/* Top-p sampling by rejection, as sampling.py's nucleus_by_rejection: draw from softmax(logits / T) with
 * the row's next uniform number; keep the draw when the tokens more likely than it hold less than top_p
 * of the mass. logits [rows, vocab] float32; temperature, top_p [rows]; uniforms [rows, draws] in [0, 1).
 * chosen [rows]: the token, or -1 when all `draws` draws were rejected (the caller samples exactly).
 * Per-block maxima and sums (64 tokens) make the draw's walk and the "more likely" sum skip most blocks. */
int sample_nucleus(const float *logits, const float *temperature, const float *top_p, const float *uniforms,
                   int64_t *chosen, int64_t rows, int64_t vocab, int64_t draws) {
    if (vocab <= 0 || vocab > MAX_VOCAB || rows < 0 || draws < 0) return FUSED_BAD_SHAPE;
    int64_t blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    int failed = 0;
#pragma omp parallel if (parallel && rows > 1)
    {
        float *block_max = scratch(2 * blocks, sizeof *block_max, &failed), *block_sum = block_max + blocks;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (!block_max) continue;
            const float *l = logits + r * vocab;
            float inv_t = 1.0f / temperature[r], top = -3.0e38f;
            for (int64_t b = 0; b < blocks; b++) {
                int64_t end = (b + 1) * SAMPLE_BLOCK < vocab ? (b + 1) * SAMPLE_BLOCK : vocab;
                float m = -3.0e38f;
                for (int64_t i = b * SAMPLE_BLOCK; i < end; i++) m = fmaxf(m, refused(l[i]) ? -3.0e38f : l[i]);
                block_max[b] = m;
                top = fmaxf(top, m);
            }
            double total = 0.0;
            for (int64_t b = 0; b < blocks; b++) {
                int64_t end = (b + 1) * SAMPLE_BLOCK < vocab ? (b + 1) * SAMPLE_BLOCK : vocab;
                float s = 0.0f;
                for (int64_t i = b * SAMPLE_BLOCK; i < end; i++) s += refused(l[i]) ? 0.0f : expf((l[i] - top) * inv_t);
                block_sum[b] = s;
                total += s;
            }
            chosen[r] = -1;
            for (int64_t d = 0; d < draws; d++) {
                double target = uniforms[r * draws + d] * total, before = 0.0;
                int64_t b = 0, token = -1;
                while (b < blocks - 1 && before + block_sum[b] <= target) before += block_sum[b++];
                int64_t end = (b + 1) * SAMPLE_BLOCK < vocab ? (b + 1) * SAMPLE_BLOCK : vocab;
                for (int64_t i = b * SAMPLE_BLOCK; i < end; i++) {
                    if (refused(l[i])) continue;
                    token = i; /* the last allowed token, should rounding leave target past the block's sum */
                    before += expf((l[i] - top) * inv_t);
                    if (before > target) break;
                }
                if (token < 0) continue; /* cannot happen: the block holds mass; drawn again to be safe */
                float drawn = l[token];
                double more = 0.0;
                for (int64_t c = 0; c < blocks; c++) {
                    if (block_max[c] <= drawn) continue;
                    int64_t stop = (c + 1) * SAMPLE_BLOCK < vocab ? (c + 1) * SAMPLE_BLOCK : vocab;
                    float s = 0.0f;
                    for (int64_t i = c * SAMPLE_BLOCK; i < stop; i++)
                        s += (!refused(l[i]) && l[i] > drawn) ? expf((l[i] - top) * inv_t) : 0.0f;
                    more += s;
                }
                if (top_p[r] >= 1.0f || more < top_p[r] * total) {
                    chosen[r] = token;
                    break;
                }
            }
        }
        free(block_max);
    }
    return failed ? FUSED_NO_MEMORY : FUSED_OK;
}

/* ----- Q4_1 blocks times int8 activations (AVX-512 VNNI) -------------------------------------------- */

/* A GGUF Q4_1 block is 32 weights w = d * q + m, q in 0..15. For a batch of a few rows this product reads
 * the file's own 4-bit blocks and multiplies them by activations quantized to int8 per block of 32 (one
 * scale each, as llama.cpp does) with the CPU's byte dot-product instruction, 64 products per instruction.
 *
 * Layout (built once by linear.Q4Kernel.pack): output rows in tiles of 16, one per int32 lane, so a
 * lane accumulates one output's dot product over a block and no horizontal sums are needed.
 * packed [N/16][K/32][4][16][4] bytes: for tile, block, chunk c, lane i, byte j: the low nibble is weight
 *   8c + j of the lane's row in the block, the high nibble weight 8c + 4 + j;
 * scales [N/16][K/32][2][16] float16: d, then m, of each lane's row in the block.
 * y[r, n] = sum over blocks of d * xd[r, b] * (q . xq[r, b]) + m * xsum[r, b], with xd the activations'
 * block scale and xsum their block's (unquantized) sum. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
int q4_supported(void) { return 1; }

/* The block products' shared steps (q4_matmul: groups of 32; q8_matmul: groups of 16). */

/* Each row of x with its outlier channels moved to xout (in float, zero in the row), then quantized to int8
 * per group of `group` activations: xq [rows, k], xd (the group's scale) and xsum (its unquantized sum)
 * [rows, k / group]. Inlined with a constant group, so each product keeps its own unrolled loops. */
static inline __attribute__((always_inline)) int quantize_blocks(const void *x, int x_bf16, const int64_t *outliers,
                                                                int64_t count, int64_t rows, int64_t k,
                                                                const int group, int8_t *xq, float *xd,
                                                                float *xsum, float *xout) {
    int64_t groups = k / group;
    float *row = malloc((size_t)k * sizeof *row);
    if (!row) return FUSED_NO_MEMORY;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < k; i++) row[i] = load(x, x_bf16, r * k + i);
        for (int64_t j = 0; j < count; j++) {
            xout[r * count + j] = row[outliers[j]];
            row[outliers[j]] = 0.0f;
        }
        for (int64_t g = 0; g < groups; g++) {
            const float *v = row + g * group;
            float largest = 0.0f, sum = 0.0f;
            for (int i = 0; i < group; i++) {
                largest = fmaxf(largest, fabsf(v[i]));
                sum += v[i];
            }
            float step = largest > 0.0f ? 127.0f / largest : 0.0f;
            for (int i = 0; i < group; i++) xq[r * k + g * group + i] = (int8_t)nearbyintf(v[i] * step);
            xd[r * groups + g] = largest / 127.0f;
            xsum[r * groups + g] = sum;
        }
    }
    free(row);
    return FUSED_OK;
}

/* The limits both products check before any work: shapes, then the outlier indices. */
static int block_product_refused(const int64_t *outliers, int64_t count, int64_t rows, int64_t n, int64_t k) {
    if (k <= 0 || n <= 0 || rows < 0 || count < 0 || k % 32 || n % 16 || k > MAX_WIDTH) return FUSED_BAD_SHAPE;
    if (!outliers_within(outliers, count, k)) return FUSED_BAD_INDEX;
    return FUSED_OK;
}

/* A tile's last step: the outlier channels in float (outlier_weight_t [count, n], from the tile's first
 * column), then R rows of 16 results to y (row stride 16). */
static inline __attribute__((always_inline)) void finish_tile(__m512 *acc, const float *xout,
                                                             const float *outlier_weight_t, int64_t count,
                                                             int64_t n, float *y, const int R) {
    for (int64_t j = 0; j < count; j++) {
        __m512 w = _mm512_loadu_ps(outlier_weight_t + j * n);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xout[r * count + j]), w, acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * 16, acc[r]);
}

/* Up to 4 rows of a tile's results (y, row stride 16) into out [rows, n] at row r, columns 16t..16t+15. */
static inline __attribute__((always_inline)) void store_tile(const float *y, int64_t done, int64_t r, int64_t t,
                                                            int64_t n, void *out, int out_bf16) {
    for (int64_t i = 0; i < done; i++)
        for (int c = 0; c < 16; c++) {
            int64_t at = (r + i) * n + t * 16 + c;
            if (out_bf16) ((uint16_t *)out)[at] = f32_to_bf16(y[i * 16 + c]);
            else ((float *)out)[at] = y[i * 16 + c];
        }
}

static inline __attribute__((always_inline)) void q4_tile(const uint8_t *packed, const uint16_t *scales,
                                                         const int8_t *xq, const float *xd, const float *xsum,
                                                         int64_t blocks, int64_t k, const float *xout,
                                                         const float *outlier_weight_t, int64_t count, int64_t n,
                                                         float *y, const int R) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = packed + b * 256;
        __m512i w[8];
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512(wb + 64 * c);
            w[2 * c] = _mm512_and_si512(v, low);
            w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + b * 32)));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + b * 32 + 16)));
        for (int r = 0; r < R; r++) {
            const int8_t *xb = xq + r * k + b * 32;
            __m512i dots = _mm512_setzero_si512();
            for (int s = 0; s < 8; s++) {
                int32_t four;
                memcpy(&four, xb + 4 * s, sizeof four);
                dots = _mm512_dpbusd_epi32(dots, w[s], _mm512_set1_epi32(four));
            }
            __m512 scaled = _mm512_mul_ps(d, _mm512_set1_ps(xd[r * blocks + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scaled, acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * blocks + b]), acc[r]);
        }
    }
    finish_tile(acc, xout, outlier_weight_t, count, n, y, R);
}

/* q4_matmul's work, on its scratch for the quantized activations: xq [rows, k], xd and xsum [rows, k / 32],
 * xout [rows, count]. */
static int q4_product(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *scales,
                      const int64_t *outliers, int64_t count, const float *outlier_weight_t, void *out, int out_bf16,
                      int64_t rows, int64_t n, int64_t k, int8_t *xq, float *xd, float *xsum, float *xout) {
    int status = quantize_blocks(x, x_bf16, outliers, count, rows, k, 32, xq, xd, xsum, xout);
    if (status != FUSED_OK) return status;
    int64_t blocks = k / 32, tiles = n / 16;
#pragma omp parallel for schedule(static) if (parallel && n * k >= 16 * PARALLEL_WORK)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *pt = packed + t * blocks * 256;
        const uint16_t *st = scales + t * blocks * 32;
        const float *ot = outlier_weight_t + t * 16;
        for (int64_t r = 0; r < rows; r += 4) {
            float y[4 * 16];
            int64_t left = rows - r;
            const int8_t *xr = xq + r * k;
            const float *dr = xd + r * blocks, *sr = xsum + r * blocks, *orow = xout + r * count;
            if (left >= 4) q4_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 4);
            else if (left == 3) q4_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 3);
            else if (left == 2) q4_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 2);
            else q4_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 1);
            store_tile(y, left < 4 ? left : 4, r, t, n, out, out_bf16);
        }
    }
    return FUSED_OK;
}

/* ----- 8-bit blocks (Q8_0, Q6_K, Q5_K; Q5_0 and Q5_1 converted) times int8 activations ---------------- */

/* Every GGUF format of 5 to 8 bits unpacks to byte codes u in 0..255 with a scale and an offset per 16
 * weights: w = d * u + m (gguf_formats.Blocks). This product reads those bytes as they are and multiplies
 * them by activations quantized to int8 per 16 (one scale per half block: finer than q4_matmul's 32, at no
 * cost here, where each half has its own d and m anyway).
 *
 * Layout (built once by linear.Q8Kernel.pack): output rows in tiles of 16, one per int32 lane.
 * packed [N/16][K/32][8][16][4] bytes: for tile, block, group s, lane i, byte j: weight 4s + j of lane i's
 *   row in the block;
 * scales [N/16][K/32][4][16] float16 or float32 (scales_f32): d of weights 0-15, m of 0-15, d of 16-31, m of
 *   16-31, per lane. float16 where it holds the file's values exactly (Q8_0, Q5_0, Q5_1), else float32.
 * y[r, n] = sum over half blocks h of d_h * xd[r, h] * (u . xq[r, h]) + m_h * xsum[r, h]. */
static inline __attribute__((always_inline)) __m512 q8_scale(const void *scales, int64_t at, const int f32) {
    if (f32) return _mm512_loadu_ps((const float *)scales + at);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)scales + at)));
}

static inline __attribute__((always_inline)) void q8_tile(const uint8_t *packed, const void *scales,
                                                         const int8_t *xq, const float *xd, const float *xsum,
                                                         int64_t blocks, int64_t k, const float *xout,
                                                         const float *outlier_weight_t, int64_t count, int64_t n,
                                                         float *y, const int R, const int f32) {
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = packed + b * 512;
        __m512i w[8];
        for (int s = 0; s < 8; s++) w[s] = _mm512_loadu_si512(wb + 64 * s);
        __m512 d0 = q8_scale(scales, b * 64, f32), m0 = q8_scale(scales, b * 64 + 16, f32);
        __m512 d1 = q8_scale(scales, b * 64 + 32, f32), m1 = q8_scale(scales, b * 64 + 48, f32);
        for (int r = 0; r < R; r++) {
            const int8_t *xb = xq + r * k + b * 32;
            __m512i low = _mm512_setzero_si512(), high = _mm512_setzero_si512();
            for (int s = 0; s < 4; s++) {
                int32_t four;
                memcpy(&four, xb + 4 * s, sizeof four);
                low = _mm512_dpbusd_epi32(low, w[s], _mm512_set1_epi32(four));
                memcpy(&four, xb + 16 + 4 * s, sizeof four);
                high = _mm512_dpbusd_epi32(high, w[s + 4], _mm512_set1_epi32(four));
            }
            __m512 step0 = _mm512_set1_ps(xd[r * 2 * blocks + 2 * b]);
            __m512 step1 = _mm512_set1_ps(xd[r * 2 * blocks + 2 * b + 1]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low), _mm512_mul_ps(d0, step0), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high), _mm512_mul_ps(d1, step1), acc[r]);
            acc[r] = _mm512_fmadd_ps(m0, _mm512_set1_ps(xsum[r * 2 * blocks + 2 * b]), acc[r]);
            acc[r] = _mm512_fmadd_ps(m1, _mm512_set1_ps(xsum[r * 2 * blocks + 2 * b + 1]), acc[r]);
        }
    }
    finish_tile(acc, xout, outlier_weight_t, count, n, y, R);
}

static inline __attribute__((always_inline)) void q8_rows(const uint8_t *pt, const void *st, const int8_t *xr,
                                                         const float *dr, const float *sr, int64_t blocks,
                                                         int64_t k, const float *orow, const float *ot,
                                                         int64_t count, int64_t n, float *y, int64_t left,
                                                         const int f32) {
    if (left >= 4) q8_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 4, f32);
    else if (left == 3) q8_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 3, f32);
    else if (left == 2) q8_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 2, f32);
    else q8_tile(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, 1, f32);
}

/* q8_matmul's work, on its scratch: xq [rows, k], xd and xsum [rows, k / 16], xout [rows, count]. */
static int q8_product(const void *x, int x_bf16, const uint8_t *packed, const void *scales, int scales_f32,
                      const int64_t *outliers, int64_t count, const float *outlier_weight_t, void *out, int out_bf16,
                      int64_t rows, int64_t n, int64_t k, int8_t *xq, float *xd, float *xsum, float *xout) {
    int status = quantize_blocks(x, x_bf16, outliers, count, rows, k, 16, xq, xd, xsum, xout);
    if (status != FUSED_OK) return status;
    int64_t blocks = k / 32, tiles = n / 16;
    size_t scale_size = scales_f32 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for schedule(static) if (parallel && n * k >= 16 * PARALLEL_WORK)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *pt = packed + t * blocks * 512;
        const void *st = (const char *)scales + (size_t)(t * blocks * 64) * scale_size;
        const float *ot = outlier_weight_t + t * 16;
        for (int64_t r = 0; r < rows; r += 4) {
            float y[4 * 16];
            int64_t left = rows - r;
            const int8_t *xr = xq + r * k;
            const float *dr = xd + r * 2 * blocks, *sr = xsum + r * 2 * blocks, *orow = xout + r * count;
            if (scales_f32) q8_rows(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, left, 1);
            else q8_rows(pt, st, xr, dr, sr, blocks, k, orow, ot, count, n, y, left, 0);
            store_tile(y, left < 4 ? left : 4, r, t, n, out, out_bf16);
        }
    }
    return FUSED_OK;
}

/* The quantized activations of a block product, on the heap for the length of one call: xq [rows, k] int8,
 * then xd and xsum [rows, k / group] and xout [rows, count] float32. Allocated here rather than passed in:
 * a malloc costs far less than the two tensors and four ctypes arguments it replaces (~3 us a call, 120
 * calls a decode step), and nothing outside the call can see it. */
typedef struct {
    int8_t *xq;
    float *xd, *xsum, *xout;
} block_scratch;

static int block_scratch_alloc(block_scratch *s, int64_t rows, int64_t k, int64_t group, int64_t count) {
    int64_t groups = k / group;
    s->xq = malloc((size_t)(rows * k > 0 ? rows * k : 1));
    s->xd = malloc((size_t)(rows * (2 * groups + count) > 0 ? rows * (2 * groups + count) : 1) * sizeof(float));
    s->xsum = s->xd ? s->xd + rows * groups : NULL;
    s->xout = s->xd ? s->xd + 2 * rows * groups : NULL;
    return s->xq && s->xd ? FUSED_OK : FUSED_NO_MEMORY;
}

static void block_scratch_free(block_scratch *s) {
    free(s->xq);
    free(s->xd);
}

/* x [rows, k] (bf16 or float32) times the packed Q4_1 weight [n, k] -> out [rows, n] (bf16 or float32).
 * The `count` outlier input channels (a transformer's massive activations, which would take most of their
 * block's int8 range) are multiplied in float with outlier_weight_t [count, n], the blocks' own values. */
int q4_matmul(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *scales, const int64_t *outliers,
              int64_t count, const float *outlier_weight_t, void *out, int out_bf16, int64_t rows, int64_t n,
              int64_t k) {
    block_scratch s;
    int status = block_product_refused(outliers, count, rows, n, k);
    if (status != FUSED_OK) return status;
    status = block_scratch_alloc(&s, rows, k, 32, count);
    if (status == FUSED_OK)
        status = q4_product(x, x_bf16, packed, scales, outliers, count, outlier_weight_t, out, out_bf16, rows, n, k,
                            s.xq, s.xd, s.xsum, s.xout);
    block_scratch_free(&s);
    return status;
}

/* x [rows, k] (bf16 or float32) times the packed 8-bit block weight [n, k] -> out [rows, n] (bf16 or float32);
 * outliers as in q4_matmul. */
int q8_matmul(const void *x, int x_bf16, const uint8_t *packed, const void *scales, int scales_f32,
              const int64_t *outliers, int64_t count, const float *outlier_weight_t, void *out, int out_bf16,
              int64_t rows, int64_t n, int64_t k) {
    block_scratch s;
    int status = block_product_refused(outliers, count, rows, n, k);
    if (status != FUSED_OK) return status;
    status = block_scratch_alloc(&s, rows, k, 16, count);
    if (status == FUSED_OK)
        status = q8_product(x, x_bf16, packed, scales, scales_f32, outliers, count, outlier_weight_t, out, out_bf16,
                            rows, n, k, s.xq, s.xd, s.xsum, s.xout);
    block_scratch_free(&s);
    return status;
}

/* ----- int8 x int8 for a few rows (w8a8 products at decode: the output head) ------------------------ */

/* acc [rows, n] int32 = q [rows, k] int8 times w [n, k] int8 (row-major: the [k, n] matrix W8A8Kernel holds
 * transposed), for rows <= INT8_ROWS. Integer products are exact, so this is torch._int_mm's result whatever
 * the order; at one row _int_mm reads a 28 MB head at ~14 GB/s on a 2-vCPU EPYC, this one pass over w at
 * about the Q4 products' rate. VNNI multiplies unsigned by signed bytes: (q + 128) . w - 128 * sum(w), both
 * sums from the same loads. */
#define INT8_ROWS 4
int int8_matmul(const int8_t *q, const int8_t *w, int32_t *acc, int64_t rows, int64_t n, int64_t k) {
    if (rows < 0 || rows > INT8_ROWS || n <= 0 || k <= 0 || k > MAX_WIDTH) return FUSED_BAD_SHAPE;
    int64_t chunks = (k + 63) / 64;
    uint8_t *xu = calloc((size_t)(rows > 0 ? rows : 1) * (size_t)chunks * 64, 1);
    if (!xu) return FUSED_NO_MEMORY;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < k; i++) xu[r * chunks * 64 + i] = (uint8_t)(q[r * k + i] + 128);
    const __m512i ones = _mm512_set1_epi8(1);
#pragma omp parallel for schedule(static) if (parallel && n * k >= 16 * PARALLEL_WORK)
    for (int64_t j = 0; j < n; j++) {
        const int8_t *wj = w + j * k;
        __m512i sums = _mm512_setzero_si512(), dots[INT8_ROWS];
        for (int r = 0; r < INT8_ROWS; r++) dots[r] = _mm512_setzero_si512();
        for (int64_t c = 0; c < chunks; c++) {
            int64_t left = k - 64 * c;
            __mmask64 mask = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
            __m512i wv = _mm512_maskz_loadu_epi8(mask, wj + 64 * c); /* zero past k: adds nothing */
            sums = _mm512_dpbusd_epi32(sums, ones, wv);
            for (int64_t r = 0; r < rows; r++)
                dots[r] = _mm512_dpbusd_epi32(dots[r], _mm512_loadu_si512(xu + (r * chunks + c) * 64), wv);
        }
        int32_t offset = 128 * _mm512_reduce_add_epi32(sums);
        for (int64_t r = 0; r < rows; r++) acc[r * n + j] = _mm512_reduce_add_epi32(dots[r]) - offset;
    }
    free(xu);
    return FUSED_OK;
}
#else
int q4_supported(void) { return 0; }
int q4_matmul(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *scales, const int64_t *outliers,
              int64_t count, const float *outlier_weight_t, void *out, int out_bf16, int64_t rows, int64_t n,
              int64_t k) {
    (void)x; (void)x_bf16; (void)packed; (void)scales; (void)outliers; (void)count; (void)outlier_weight_t;
    (void)out; (void)out_bf16; (void)rows; (void)n; (void)k;
    return FUSED_UNSUPPORTED;
}
int int8_matmul(const int8_t *q, const int8_t *w, int32_t *acc, int64_t rows, int64_t n, int64_t k) {
    (void)q; (void)w; (void)acc; (void)rows; (void)n; (void)k;
    return FUSED_UNSUPPORTED;
}
int q8_matmul(const void *x, int x_bf16, const uint8_t *packed, const void *scales, int scales_f32,
              const int64_t *outliers, int64_t count, const float *outlier_weight_t, void *out, int out_bf16,
              int64_t rows, int64_t n, int64_t k) {
    (void)x; (void)x_bf16; (void)packed; (void)scales; (void)scales_f32; (void)outliers; (void)count;
    (void)outlier_weight_t; (void)out; (void)out_bf16; (void)rows; (void)n; (void)k;
    return FUSED_UNSUPPORTED;
}
#endif
