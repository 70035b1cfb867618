/* The one source of fused.c's signatures, limits and status codes. fused.c includes it; fused.py reads it
 * (fused_header.py) to set each function's ctypes argtypes and restype and to learn the limits, so nothing
 * here is written a second time in Python.
 *
 * Deliberately regular, for that small parser (anything else in this file is refused):
 *   - comments, blank lines, the include guard and #include <stdint.h>;
 *   - `#define NAME INTEGER` for a limit or a status code;
 *   - declarations `RETURN name(TYPE name, ...);` (they may span lines), where RETURN is int or void and
 *     TYPE is int, int64_t, float, or a pointer (`const` allowed) to int8_t, uint8_t, uint16_t, int32_t,
 *     int64_t, float or void.
 * Tensors cross as pointers to their first element: bfloat16 is uint16_t, float16 is uint16_t.
 */
#ifndef TEXTGEN_FUSED_H
#define TEXTGEN_FUSED_H

#include <stdint.h>

/* Shape limits: fused.c refuses larger shapes (FUSED_BAD_SHAPE); fused.py checks them before choosing this path. */
#define MAX_WIDTH 8192 /* hidden size, MLP width, w8a8 and Q4 input width */
#define MAX_HEADS 64 /* query heads */
#define MAX_DIM 256 /* head size */
#define MAX_LIVE 8192 /* cached positions attended */
#define MAX_GROUP 8 /* query heads per KV head */
#define MAX_VOCAB 524288 /* sample_nucleus: 8,192 blocks of 64 tokens */

/* What the int functions return. fused.py checks every argument it can see before a call; these are the
 * guards for what it cannot see without reading tensors (positions, cache rows, outlier indices). */
#define FUSED_OK 0
#define FUSED_BAD_SHAPE (-1) /* a size beyond the limits above, or inconsistent (heads not a multiple of kv_heads) */
#define FUSED_BAD_INDEX (-2) /* a position, cache row or outlier index outside its tensor */
#define FUSED_NO_MEMORY (-3) /* a scratch buffer could not be allocated */
#define FUSED_UNSUPPORTED (-4) /* not in this build (q4_matmul without AVX-512 VNNI) */

/* Cleared by fused.py when this library did not share PyTorch's OpenMP runtime. */
void set_parallel(int on);

int add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t rows,
                 int64_t width, float eps);

/* Attention over a paged KV cache (see fused.c). q_norm, k_norm [D] (NULL for none): each query and key head
 * RMS-normalised with this weight (eps norm_eps) before its rotation (Gemma 3, Qwen3); window > 0: each token
 * attends to the last `window` positions of its sequence only (itself included), 0: to all of them. */
int rotary_cache_attention(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, int64_t angles,
                           const int64_t *positions, const int64_t *cache_rows, const int64_t *tables,
                           uint16_t *keys, uint16_t *values, uint16_t *out, int64_t rows, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t blocks, int64_t block_size, int64_t table_rows,
                           int64_t table_width, float scale, const uint16_t *q_norm, const uint16_t *k_norm,
                           float norm_eps, int64_t window);

void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t features);

/* gate_up [rows, 2F] (gate then up) -> out [rows, F] = gelu_tanh(gate) * up (Gemma's MLP). */
void gelu_tanh_mul(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t features);

int quantize_rows(const void *x, int x_bf16, const int64_t *outliers, int64_t count, int8_t *q, float *row_max,
                  float *outlying, int64_t rows, int64_t width);

int residual_norm_quantize(uint16_t *x, const int32_t *acc, const float *acc_row_max, const float *col_scale,
                           const float *acc_outlying, const float *outlier_weight_t, int64_t acc_count,
                           const float *bias, const uint16_t *weight, float eps, const int64_t *outliers,
                           int64_t count, int8_t *q, float *row_max, float *outlying, uint16_t *out, int64_t rows,
                           int64_t width);

int silu_quantize(const int32_t *acc, const float *acc_row_max, const float *col_scale, const float *acc_outlying,
                  const float *outlier_weight_t, int64_t acc_count, const float *bias, const int64_t *outliers,
                  int64_t count, int8_t *q, float *row_max, float *outlying, int64_t rows, int64_t features);

void dequantize_rows(const int32_t *acc, const float *row_max, const float *col_scale, const float *outlying,
                     const float *outlier_weight_t, int64_t count, const float *bias, void *out, int out_bf16,
                     int64_t rows, int64_t cols);

int sample_nucleus(const float *logits, const float *temperature, const float *top_p, const float *uniforms,
                   int64_t *chosen, int64_t rows, int64_t vocab, int64_t draws);

int q4_supported(void);

int q4_matmul(const void *x, int x_bf16, const uint8_t *packed, const uint16_t *scales, const int64_t *outliers,
              int64_t count, const float *outlier_weight_t, void *out, int out_bf16, int64_t rows, int64_t n,
              int64_t k);

int q8_matmul(const void *x, int x_bf16, const uint8_t *packed, const void *scales, int scales_f32,
              const int64_t *outliers, int64_t count, const float *outlier_weight_t, void *out, int out_bf16,
              int64_t rows, int64_t n, int64_t k);

/* acc [rows, n] int32 = q [rows, k] int8 times w [n, k] int8, for rows <= 4 (w8a8 products at decode). */
int int8_matmul(const int8_t *q, const int8_t *w, int32_t *acc, int64_t rows, int64_t n, int64_t k);

#endif
