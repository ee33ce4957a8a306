/* Linear layers with int8 weights on the CPU: weights quantized per output channel, symmetric
 * (w[n, k] ~= q[n, k] * scale[n], q in [-127, 127]), stored packed (below); activations quantized on the
 * fly per block of 32 (the llama.cpp Q8_0 way), products summed in integers.
 *
 *   int8_linear:   x [M, K] float32 or bf16 (rows x_row elements apart), qp packed int8, scale [N] float32,
 *                  bias [N] float32 or NULL -> out [M, N] float32 or bf16 (rows o_row apart):
 *                  xs[m, b] = max_{k in b} |x[m, k]| / 127, xq[m, k] = round(x[m, k] / xs[m, b]) (half to
 *                  even; 0 in an all-zero block), and
 *                  out[m, n] = scale[n] * sum_b xs[m, b] * sum_{k in b} xq[m, k] * q[n, k] + bias[n]
 *   int8_dequant:  rows n0 .. n0 + rows - 1 of q * scale -> w [rows, K] float32 or bf16 (n0 % 4 == 0)
 *
 * Packed layout: N padded to Np (a multiple of 4) and K to Kp (a multiple of 32) with zeros, then
 * qp[n / 4][k / 32][n % 4][k % 32] = q[n, k]: a block of 4 channels is one contiguous run of 4 * Kp bytes,
 * read front to back, so every thread streams one sequential range of memory (the plain [N, K] layout
 * streamed four rows at once and reached ~15 GB/s where this reaches the copy bandwidth).
 *
 * int8_linear is for the few rows of a decode step, where a linear reads every weight once and the memory
 * bus is the limit: int8 weights are a quarter of float32's bytes. Each block of 32 products is summed
 * exactly in integers (with AVX2: |x| times the weight with x's sign, u8 x s8 pair products into 16 bits,
 * which cannot overflow since 2 * 127 * 127 < 2^15, then into 8 int32 lanes of 4 products), converted to
 * float32 and multiplied by the block's activation scale into 8 float32 lanes; lane j holds the products
 * k = 4j .. 4j + 3 of each block with or without AVX2, the lanes are summed pairwise (hsum8) at the end,
 * so results are the same on every run, thread count and build. Each thread takes whole blocks of 4
 * channels (static schedule), two rows at a time.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#define QBLOCK 32
#define NBLOCK 4

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

/* One row's block b of 32 activations (elements past K read as 0) -> xq[0..31], returns the scale. */
static float quantize_block(const void *x, int64_t row_start, int64_t k0, int64_t K, int bf16, int8_t *xq) {
    float v[QBLOCK], amax = 0.f;
    for (int j = 0; j < QBLOCK; ++j) {
        const int64_t k = k0 + j;
        v[j] = k >= K ? 0.f
                      : (bf16 ? bf16_to_f32(((const bf16_t *)x)[row_start + k]) : ((const float *)x)[row_start + k]);
        const float a = v[j] < 0 ? -v[j] : v[j];
        amax = a > amax ? a : amax;
    }
    const float s = amax / 127.f;
    for (int j = 0; j < QBLOCK; ++j) {
        float r = s > 0 ? __builtin_nearbyintf(v[j] / s) : 0.f; /* the default rounding mode: half to even */
        xq[j] = (int8_t)(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
    }
    return s;
}

/* 8 int32 lanes: lane j = sum_{i<4} a[4j + i] * w[4j + i] over one block of 32. */
static inline v8i dot32(const int8_t *a, const int8_t *w) {
#ifdef __AVX2__
    const __m256i av = _mm256_loadu_si256((const __m256i *)a), wv = _mm256_loadu_si256((const __m256i *)w);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(av, av), _mm256_sign_epi8(wv, av));
    return (v8i)_mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#else
    v8i r;
    for (int j = 0; j < 8; ++j) {
        int32_t s = 0;
        for (int i = 0; i < 4; ++i) s += (int32_t)a[4 * j + i] * (int32_t)w[4 * j + i];
        r[j] = s;
    }
    return r;
#endif
}

static inline void store1(void *out, int64_t i, float v, int bf16) {
    if (bf16)
        ((bf16_t *)out)[i] = f32_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* Channel block nb (channels 4nb .. 4nb + 3, the last ones past N skipped) for rows m0, m0 + 1 (mc = 2) or
 * m0 (mc = 1; a constant at each call, so the one-row case has no second row's work). */
static inline __attribute__((always_inline)) void block(const int8_t *xq, const float *xs, const int8_t *qp,
                                                        const float *scale, const float *bias, void *out,
                                                        int64_t o_row, int64_t m0, int mc, int64_t nb, int64_t N,
                                                        int64_t Kp, int bf16) {
    v8f acc[2][NBLOCK];
    memset(acc, 0, sizeof acc);
    const int8_t *w = qp + nb * NBLOCK * Kp;
    const int64_t kb = Kp / QBLOCK;
    const int8_t *xa = xq + m0 * Kp, *xb = xq + (m0 + (mc > 1)) * Kp;
    const float *sa = xs + m0 * kb, *sb = xs + (m0 + (mc > 1)) * kb;
    for (int64_t b = 0; b < kb; ++b, w += NBLOCK * QBLOCK) {
        __builtin_prefetch(w + 1024);
        __builtin_prefetch(w + 1024 + 64);
        const int64_t k = b * QBLOCK;
        const v8f s0 = (v8f){0} + sa[b], s1 = (v8f){0} + sb[b];
        for (int c = 0; c < NBLOCK; ++c) {
            acc[0][c] += __builtin_convertvector(dot32(xa + k, w + c * QBLOCK), v8f) * s0;
            if (mc > 1) acc[1][c] += __builtin_convertvector(dot32(xb + k, w + c * QBLOCK), v8f) * s1;
        }
    }
    for (int r = 0; r < mc; ++r)
        for (int c = 0; c < NBLOCK && nb * NBLOCK + c < N; ++c) {
            const int64_t n = nb * NBLOCK + c;
            float v = hsum8(acc[r][c]) * scale[n];
            if (bias) v += bias[n];
            store1(out, (m0 + r) * o_row + n, v, bf16);
        }
}

static inline __attribute__((always_inline)) void channel_block(const int8_t *xq, const float *xs, const int8_t *qp,
                                                                const float *scale, const float *bias, void *out,
                                                                int64_t o_row, int64_t M, int64_t nb, int64_t N,
                                                                int64_t Kp, int bf16) {
    int64_t m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) block(xq, xs, qp, scale, bias, out, o_row, m0, 2, nb, N, Kp, bf16);
    if (m0 < M) block(xq, xs, qp, scale, bias, out, o_row, m0, 1, nb, N, Kp, bf16);
}

/* Returns 0, or -1 when the activations' scratch could not be allocated. */
int kvloom_int8_linear(const void *x, int64_t x_row, const int8_t *qp, const float *scale, const float *bias,
                       void *out, int64_t o_row, int64_t M, int64_t N, int64_t K, int num_threads, int bf16) {
    const int64_t Kp = round_up(K, QBLOCK), kb = Kp / QBLOCK, blocks = round_up(N, NBLOCK) / NBLOCK;
    int8_t *xq = malloc((size_t)(M * Kp));
    float *xs = malloc((size_t)(M * kb) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * kb; ++i)
            xs[i] = quantize_block(x, (i / kb) * x_row, (i % kb) * QBLOCK, K, bf16, xq + i * QBLOCK);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks; ++nb) {
            if (bf16)
                channel_block(xq, xs, qp, scale, bias, out, o_row, M, nb, N, Kp, 1);
            else
                channel_block(xq, xs, qp, scale, bias, out, o_row, M, nb, N, Kp, 0);
        }
    }
    free(xq);
    free(xs);
    return 0;
}

void kvloom_int8_dequant(const int8_t *qp, const float *scale, void *w, int64_t n0, int64_t rows, int64_t K,
                         int num_threads, int bf16) {
    const int64_t Kp = round_up(K, QBLOCK);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        const int8_t *src = qp + (n / NBLOCK) * NBLOCK * Kp + (n % NBLOCK) * QBLOCK;
        for (int64_t k0 = 0; k0 < K; k0 += QBLOCK) {
            const int8_t *blk = src + (k0 / QBLOCK) * NBLOCK * QBLOCK;
            const int64_t len = K - k0 < QBLOCK ? K - k0 : QBLOCK;
            if (bf16)
                for (int64_t j = 0; j < len; ++j) ((bf16_t *)w)[r * K + k0 + j] = f32_to_bf16((float)blk[j] * scale[n]);
            else
                for (int64_t j = 0; j < len; ++j) ((float *)w)[r * K + k0 + j] = (float)blk[j] * scale[n];
        }
    }
}
