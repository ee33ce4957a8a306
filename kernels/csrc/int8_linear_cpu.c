/* Linear layers with int8 weights on the CPU: weights quantized per output channel, symmetric
 * (w[n, k] ~= q[n, k] * scale[n], q in [-127, 127]); activations and outputs stay float32 or bf16,
 * arithmetic in float32.
 *
 *   int8_linear:   x [M, K] (rows x_row elements apart), q [N, K] int8 (contiguous), scale [N] float32,
 *                  bias [N] float32 or NULL -> out [M, N] (rows o_row apart),
 *                  out[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]
 *   int8_dequant:  q [N, K], scale [N] -> w [N, K] float32 or bf16, w[n, k] = q[n, k] * scale[n]
 *
 * int8_linear is for the few rows of a decode step, where a linear reads every weight once to do
 * little arithmetic and the memory bus is the limit: int8 weights are a quarter of float32's bytes.
 * Each thread takes blocks of 4 output channels (static schedule: the thread count never changes a
 * result); for every pair of rows it streams the 4 channels' weights (a few KB, from L1 after the
 * first pair), converts 8 at a time to float32 and multiplies into 8 accumulators (4 channels x the
 * 2 halves of a 16-wide step, so 8 FMA chains are in flight). K must be a multiple of 16
 * (int8_linear_cpu.supports() checks). The sum over k runs in a fixed order: lanes of 8, the two
 * halves, then a pairwise sum of the lanes (hsum8), so the results are those of one fixed float32
 * summation, the same on every run and thread count.
 */
#include <stdint.h>
#include <string.h>

#include "vec8.h"

typedef int8_t v8c __attribute__((vector_size(8)));

static inline v8f load8_i8(const int8_t *p) {
#ifdef __AVX2__
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else /* GCC scalarizes this conversion; only builds without AVX2 take it */
    v8c c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(__builtin_convertvector(c, v8i), v8f);
#endif
}

static inline v8f load8_x(const void *x, int64_t i, int bf16) {
    return bf16 ? load8_bf16((const bf16_t *)x + i) : load8((const float *)x + i);
}

static inline void store1(void *out, int64_t i, float v, int bf16) {
    if (bf16)
        ((bf16_t *)out)[i] = f32_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* Channels n0 .. n0 + nc - 1 (nc <= 4) for rows m0 .. m0 + mc - 1 (mc: 1 or 2, a constant at each call, so
 * the one-row case is compiled without the second row's work). */
static inline __attribute__((always_inline)) void block(const void *x, int64_t x_row, const int8_t *q, const float *scale, const float *bias, void *out,
                  int64_t o_row, int64_t m0, int mc, int64_t n0, int nc, int64_t K, int bf16) {
    v8f acc[2][4][2];
    memset(acc, 0, sizeof acc);
    const int8_t *w[4];
    for (int c = 0; c < 4; ++c) w[c] = q + (n0 + (c < nc ? c : 0)) * K;
    const int64_t xa = m0 * x_row, xb = (m0 + (mc > 1 ? 1 : 0)) * x_row;
    for (int64_t k = 0; k < K; k += 16) {
        const v8f a0 = load8_x(x, xa + k, bf16), a1 = load8_x(x, xa + k + 8, bf16);
        const v8f b0 = mc > 1 ? load8_x(x, xb + k, bf16) : a0, b1 = mc > 1 ? load8_x(x, xb + k + 8, bf16) : a1;
        for (int c = 0; c < 4; ++c) {
            const v8f w0 = load8_i8(w[c] + k), w1 = load8_i8(w[c] + k + 8);
            acc[0][c][0] += a0 * w0;
            acc[0][c][1] += a1 * w1;
            if (mc > 1) {
                acc[1][c][0] += b0 * w0;
                acc[1][c][1] += b1 * w1;
            }
        }
    }
    for (int r = 0; r < mc; ++r)
        for (int c = 0; c < nc; ++c) {
            const int64_t n = n0 + c;
            float v = hsum8(acc[r][c][0] + acc[r][c][1]) * scale[n];
            if (bias) v += bias[n];
            store1(out, (m0 + r) * o_row + n, v, bf16);
        }
}

/* Every row for one block of channels; bf16 is a constant at each call (so is every flag below it). */
static inline __attribute__((always_inline)) void channel_block(const void *x, int64_t x_row, const int8_t *q,
                                                               const float *scale, const float *bias, void *out,
                                                               int64_t o_row, int64_t M, int64_t N, int64_t K,
                                                               int64_t b, int bf16) {
    const int64_t n0 = b * 4;
    const int nc = (int)(N - n0 < 4 ? N - n0 : 4);
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) block(x, x_row, q, scale, bias, out, o_row, m0, 2, n0, nc, K, bf16);
    if (m0 < M) block(x, x_row, q, scale, bias, out, o_row, m0, 1, n0, nc, K, bf16);
}

void kvloom_int8_linear(const void *x, int64_t x_row, const int8_t *q, const float *scale, const float *bias,
                        void *out, int64_t o_row, int64_t M, int64_t N, int64_t K, int num_threads, int bf16) {
    const int64_t blocks = (N + 3) / 4;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        if (bf16)
            channel_block(x, x_row, q, scale, bias, out, o_row, M, N, K, b, 1);
        else
            channel_block(x, x_row, q, scale, bias, out, o_row, M, N, K, b, 0);
    }
}

void kvloom_int8_dequant(const int8_t *q, const float *scale, void *w, int64_t N, int64_t K, int num_threads,
                         int bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const v8f s = (v8f){0} + scale[n];
        const int8_t *row = q + n * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            const v8f v = load8_i8(row + k) * s;
            if (bf16)
                store8_bf16((bf16_t *)w + n * K + k, v);
            else
                store8((float *)w + n * K + k, v);
        }
        for (; k < K; ++k) store1(w, n * K + k, (float)row[k] * scale[n], bf16);
    }
}
