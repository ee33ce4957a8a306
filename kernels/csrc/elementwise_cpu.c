/* Fused elementwise ops of a decoder layer on the CPU, one pass over memory each, float32 arithmetic
 * for float32 and bfloat16 tensors (rounded to bf16 where the torch reference rounds):
 *
 *   silu_and_mul:  x [T, 2I] (gate | up; rows x_row elements apart) -> out [T, I] (rows o_row apart),
 *                  out = silu(gate) * up
 *   add_rms_norm:  x, residual [T, H] (contiguous) -> sum [T, H] = x + residual, and
 *                  out [T, H] = w * (sum * rsqrt(mean(sum^2) + eps)); residual NULL: sum is x (not written)
 *
 * Each row is one thread's work (OpenMP in torch's pool: see kvloom.kernels.native), so results do not
 * depend on the thread count. I and H must be multiples of 8.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

static inline v8f load8_any(const void *p, int64_t i, int bf16) {
    return bf16 ? load8_bf16((const bf16_t *)p + i) : load8((const float *)p + i);
}

static inline void store8_any(void *p, int64_t i, v8f x, int bf16) {
    if (bf16)
        store8_bf16((bf16_t *)p + i, x);
    else
        store8((float *)p + i, x);
}

/* silu(g) * u as torch computes it: g / (1 + exp(-g)) (rounded to bf16 for bf16 tensors), times u. */
static void silu_and_mul(const void *x, int64_t x_row, void *out, int64_t o_row, int64_t rows, int64_t inter,
                         int num_threads, int bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t xi = t * x_row, oi = t * o_row;
        for (int64_t j = 0; j < inter; j += 8) {
            const v8f g = load8_any(x, xi + j, bf16), u = load8_any(x, xi + inter + j, bf16);
            v8f s = g / (1.0f + exp8(-g));
            if (bf16) s = round8_bf16(s);
            store8_any(out, oi + j, s * u, bf16);
        }
    }
}

/* The HF RMSNorm: float32 statistics; for bf16 the sum is a bf16 tensor, and the normalised row is
 * rounded to bf16 before the (bf16) weight multiplies it. */
static void add_rms_norm(const void *x, const void *residual, void *sum, void *out, const void *weight, int64_t rows,
                         int64_t hidden, float eps, int num_threads, int bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t base = t * hidden;
        v8f squares = {0};
        for (int64_t j = 0; j < hidden; j += 8) {
            v8f v = load8_any(x, base + j, bf16);
            if (residual != NULL) {
                v += load8_any(residual, base + j, bf16);
                if (bf16) v = round8_bf16(v);
                store8_any(sum, base + j, v, bf16);
            }
            squares += v * v;
        }
        const float scale = 1.0f / sqrtf(hsum8(squares) / (float)hidden + eps);
        const void *src = residual != NULL ? (const void *)sum : x;
        for (int64_t j = 0; j < hidden; j += 8) {
            v8f v = load8_any(src, base + j, bf16) * scale;
            if (bf16) v = round8_bf16(v);
            store8_any(out, base + j, load8_any(weight, j, bf16) * v, bf16);
        }
    }
}

void kvloom_silu_and_mul(const void *x, int64_t x_row, void *out, int64_t o_row, int64_t rows, int64_t inter,
                         int num_threads, int bf16) {
    silu_and_mul(x, x_row, out, o_row, rows, inter, num_threads, bf16);
}

void kvloom_add_rms_norm(const void *x, const void *residual, void *sum, void *out, const void *weight, int64_t rows,
                         int64_t hidden, float eps, int num_threads, int bf16) {
    add_rms_norm(x, residual, sum, out, weight, rows, hidden, eps, num_threads, bf16);
}
