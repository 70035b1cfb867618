/* Fused small operations of a Llama decode step, for small batches on a CPU (see fused.py).
 *
 * At batch 1 a decode step runs ~1,000 PyTorch operators, most of them on a few hundred numbers, and
 * each costs microseconds of dispatch whatever its size: that, not arithmetic, is most of the step.
 * These functions do the work between two matrix products in one call each: residual add + RMSNorm,
 * rotary embedding + KV-cache write + attention over the cached positions, SiLU(gate) * up.
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
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Below this many elements a loop runs on the calling thread: waking the team costs more. */
#define PARALLEL_WORK 16384

/* Cleared by fused.py when this library did not share PyTorch's OpenMP runtime. */
static int parallel = 1;
void set_parallel(int on) { parallel = on; }

/* Shape limits (checked here and, before choosing this path, in fused.py). */
#define MAX_WIDTH 8192 /* hidden size */
#define MAX_HEADS 64
#define MAX_DIM 256 /* head size */
#define MAX_LIVE 8192 /* cached positions attended */
#define MAX_GROUP 8 /* query heads per KV head */

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
    if (width > MAX_WIDTH) return -1;
#pragma omp parallel for schedule(static) if (parallel && rows * width >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        float row[MAX_WIDTH];
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
    int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim, longest = 0;
    if (dim > MAX_DIM || heads > MAX_HEADS || group > MAX_GROUP) return -1;
    for (int64_t r = 0; r < rows; r++) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    if (longest > MAX_LIVE) return -1;
    /* One (row, KV head) pair per iteration: it writes only its own cache row and output heads. */
#pragma omp parallel for schedule(dynamic, 1) if (parallel && rows * kv_heads * longest * dim >= 4 * PARALLEL_WORK)
    for (int64_t pair = 0; pair < rows * kv_heads; pair++) {
        int64_t r = pair / kv_heads, g = pair % kv_heads;
        float q[MAX_HEADS * MAX_DIM], k[MAX_DIM], scores[MAX_GROUP * MAX_LIVE], acc[MAX_GROUP * MAX_DIM];
        const uint16_t *src = qkv + r * width;
        int64_t pos = positions[r], live = pos + 1;
        const uint16_t *cos_row = cos + pos * dim, *sin_row = sin + pos * dim;
        for (int64_t h = g * group; h < (g + 1) * group; h++) rotate(src + h * dim, cos_row, sin_row, q + h * dim, dim);
        {
            int64_t base = ((cache_rows[r] * kv_heads + g) * capacity) * dim;
            rotate(src + (heads + g) * dim, cos_row, sin_row, k, dim);
            for (int64_t i = 0; i < dim; i++) {
                keys[base + pos * dim + i] = f32_to_bf16(k[i]);
                values[base + pos * dim + i] = src[(heads + kv_heads + g) * dim + i];
            }
            /* The group's query heads share each key and value: converted once, used `group` times. */
            for (int64_t t = 0; t < live; t++) {
                float kt[MAX_DIM];
                const uint16_t *kb = keys + base + t * dim;
                for (int64_t i = 0; i < dim; i++) kt[i] = bf16_to_f32(kb[i]);
                for (int64_t h = 0; h < group; h++) {
                    const float *qh = q + (g * group + h) * dim;
                    float dot = 0.0f;
                    for (int64_t i = 0; i < dim; i++) dot += qh[i] * kt[i];
                    scores[h * live + t] = dot * scale;
                }
            }
            for (int64_t h = 0; h < group; h++) {
                float *sh = scores + h * live, best = sh[0], total = 0.0f;
                for (int64_t t = 1; t < live; t++) best = sh[t] > best ? sh[t] : best;
                for (int64_t t = 0; t < live; t++) {
                    sh[t] = expf(sh[t] - best);
                    total += sh[t];
                }
                for (int64_t t = 0; t < live; t++) sh[t] /= total;
            }
            for (int64_t i = 0; i < group * dim; i++) acc[i] = 0.0f;
            for (int64_t t = 0; t < live; t++) {
                float vt[MAX_DIM];
                const uint16_t *vb = values + base + t * dim;
                for (int64_t i = 0; i < dim; i++) vt[i] = bf16_to_f32(vb[i]);
                for (int64_t h = 0; h < group; h++) {
                    float p = scores[h * live + t], *ah = acc + h * dim;
                    for (int64_t i = 0; i < dim; i++) ah[i] += p * vt[i];
                }
            }
            uint16_t *o = out + r * heads * dim + g * group * dim;
            for (int64_t i = 0; i < group * dim; i++) o[i] = f32_to_bf16(acc[i]);
        }
    }
    return 0;
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


static inline float load(const void *data, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)data)[i]) : ((const float *)data)[i];
}

/* w8a8 input side. x [rows, width] (bf16 or float32) -> q [rows, width] int8 = round(x * 127 / row_max)
 * with the `count` outlier channels set to 0, row_max [rows] = max |x| over the other channels, and
 * outlying [rows, count] = the outlier channels' values, multiplied in float by dequantize_rows. */
int quantize_rows(const void *x, int x_bf16, const int64_t *outliers, int64_t count, int8_t *q, float *row_max,
                  float *outlying, int64_t rows, int64_t width) {
    if (width > MAX_WIDTH) return -1;
#pragma omp parallel for schedule(static) if (parallel && rows * width >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        float row[MAX_WIDTH];
        for (int64_t i = 0; i < width; i++) row[i] = load(x, x_bf16, r * width + i);
        for (int64_t j = 0; j < count; j++) {
            outlying[r * count + j] = row[outliers[j]];
            row[outliers[j]] = 0.0f;
        }
        float largest = 1e-12f;
        for (int64_t i = 0; i < width; i++) largest = fmaxf(largest, fabsf(row[i]));
        float step = 127.0f / largest; /* a true division, as W8A8Kernel's PyTorch path: the same integers */
        row_max[r] = largest;
        int8_t *qr = q + r * width;
        for (int64_t i = 0; i < width; i++) qr[i] = (int8_t)nearbyintf(row[i] * step);
    }
    return 0;
}

#define COLUMN_CHUNK 512

/* w8a8 output side. acc [rows, cols] int32 (the integer product) -> out [rows, cols] (bf16 or float32) =
 * acc * row_max[r] * col_scale[c] + outlying[r, :] . outlier_weight_t[:, c] + bias[c] (bias may be NULL).
 * col_scale already holds the weight's and the activation's 1/127. */
void dequantize_rows(const int32_t *acc, const float *row_max, const float *col_scale, const float *outlying,
                     const float *outlier_weight_t, int64_t count, const float *bias, void *out, int out_bf16,
                     int64_t rows, int64_t cols) {
    int64_t chunks = (cols + COLUMN_CHUNK - 1) / COLUMN_CHUNK;
#pragma omp parallel for schedule(static) if (parallel && rows * cols >= PARALLEL_WORK)
    /* Column chunk outermost: a chunk's outlier weights (count x 2 KiB) stay in cache across the rows. */
    for (int64_t item = 0; item < rows * chunks; item++) {
        int64_t r = item % rows, c0 = (item / rows) * COLUMN_CHUNK;
        int64_t n = cols - c0 < COLUMN_CHUNK ? cols - c0 : COLUMN_CHUNK;
        float y[COLUMN_CHUNK];
        const int32_t *a = acc + r * cols + c0;
        float scale = row_max[r];
        for (int64_t c = 0; c < n; c++) y[c] = (float)a[c] * scale * col_scale[c0 + c];
        if (bias)
            for (int64_t c = 0; c < n; c++) y[c] += bias[c0 + c];
        for (int64_t j = 0; j < count; j++) {
            float o = outlying[r * count + j];
            const float *w = outlier_weight_t + j * cols + c0;
            for (int64_t c = 0; c < n; c++) y[c] += o * w[c];
        }
        if (out_bf16) {
            uint16_t *o16 = (uint16_t *)out + r * cols + c0;
            for (int64_t c = 0; c < n; c++) o16[c] = f32_to_bf16(y[c]);
        } else {
            memcpy((float *)out + r * cols + c0, y, (size_t)n * sizeof(float));
        }
    }
}

/* ----- sampling ------------------------------------------------------------------------------------ */

#define SAMPLE_BLOCK 64
#define MAX_VOCAB_BLOCKS 8192 /* vocabularies up to 524,288 tokens */

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
    int64_t blocks = (vocab + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    if (blocks > MAX_VOCAB_BLOCKS) return -1;
#pragma omp parallel for schedule(dynamic, 1) if (parallel && rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *l = logits + r * vocab;
        float block_max[MAX_VOCAB_BLOCKS], block_sum[MAX_VOCAB_BLOCKS];
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
    return 0;
}
