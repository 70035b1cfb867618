/* Fused small operations of a Llama decode step, for small batches on a CPU (see fused.py).
 *
 * At batch 1 a decode step runs ~1,000 PyTorch operators, most of them on a few hundred numbers, and
 * each costs microseconds of dispatch whatever its size: that, not arithmetic, is most of the step.
 * These functions do the work between two matrix products in one call each: residual add + RMSNorm,
 * rotary embedding + KV-cache write + attention over the cached positions, SiLU(gate) * up.
 *
 * Tensors are bfloat16 (uint16_t here), row-major and contiguous; arithmetic is float32 and each
 * result is rounded to bfloat16 once, where PyTorch's bf16 path rounds after every operator.
 * Single-threaded on purpose: the matrix products between these calls use PyTorch's OpenMP team, and
 * a second OpenMP runtime in the same process would make both wake their threads through the kernel.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Shape limits (checked here and, before choosing this path, in fused.py). */
#define MAX_WIDTH 8192 /* hidden size */
#define MAX_HEADS 64
#define MAX_DIM 256 /* head size */
#define MAX_LIVE 8192 /* cached positions attended */

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
    float row[MAX_WIDTH];
    if (width > MAX_WIDTH) return -1;
    for (int64_t r = 0; r < rows; r++) {
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
    return 0;
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

/* One decode step of attention for `rows` sequences.
 * qkv [rows, (Hq + 2 Hkv) D]: queries, keys, values of the new token (before rotary).
 * cos, sin [P, D]; positions [rows]: where the new token goes (= tokens already cached).
 * cache_rows [rows]: each sequence's row in the caches; keys, values [S, Hkv, T, D].
 * out [rows, Hq D]: softmax(scale q.k) v over positions 0..position, query heads grouped over KV heads. */
int rotary_cache_attention(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *positions,
                            const int64_t *cache_rows, uint16_t *keys, uint16_t *values, uint16_t *out, int64_t rows,
                            int64_t heads, int64_t kv_heads, int64_t dim, int64_t capacity, float scale) {
    int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim;
    float q[MAX_HEADS * MAX_DIM], k[MAX_DIM], scores[MAX_LIVE], acc[MAX_DIM];
    if (dim > MAX_DIM || heads > MAX_HEADS) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *src = qkv + r * width;
        int64_t pos = positions[r], live = pos + 1;
        if (live > MAX_LIVE) return -1;
        const uint16_t *cos_row = cos + pos * dim, *sin_row = sin + pos * dim;
        for (int64_t h = 0; h < heads; h++) rotate(src + h * dim, cos_row, sin_row, q + h * dim, dim);
        for (int64_t g = 0; g < kv_heads; g++) {
            int64_t base = ((cache_rows[r] * kv_heads + g) * capacity) * dim;
            rotate(src + (heads + g) * dim, cos_row, sin_row, k, dim);
            for (int64_t i = 0; i < dim; i++) {
                keys[base + pos * dim + i] = f32_to_bf16(k[i]);
                values[base + pos * dim + i] = src[(heads + kv_heads + g) * dim + i];
            }
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float *qh = q + h * dim;
                float best = 0.0f; /* set by t = 0 (no infinities: the file is built with -ffast-math) */
                for (int64_t t = 0; t < live; t++) {
                    const uint16_t *kt = keys + base + t * dim;
                    float dot = 0.0f;
                    for (int64_t i = 0; i < dim; i++) dot += qh[i] * bf16_to_f32(kt[i]);
                    scores[t] = dot * scale;
                    best = (t == 0 || scores[t] > best) ? scores[t] : best;
                }
                float total = 0.0f;
                for (int64_t i = 0; i < dim; i++) acc[i] = 0.0f;
                for (int64_t t = 0; t < live; t++) {
                    float p = expf(scores[t] - best);
                    total += p;
                    const uint16_t *vt = values + base + t * dim;
                    for (int64_t i = 0; i < dim; i++) acc[i] += p * bf16_to_f32(vt[i]);
                }
                for (int64_t i = 0; i < dim; i++) out[r * heads * dim + h * dim + i] = f32_to_bf16(acc[i] / total);
            }
        }
    }
    return 0;
}

/* gate_up [rows, 2F] (gate then up) -> out [rows, F] = silu(gate) * up. */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t features) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * features, *up = gate + features;
        for (int64_t i = 0; i < features; i++) {
            float g = bf16_to_f32(gate[i]);
            float silu = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            out[r * features + i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
        }
    }
}
