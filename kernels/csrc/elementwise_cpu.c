/* Fused elementwise ops of a decoder layer on the CPU, one pass over memory each, float32 arithmetic
 * for float32 and bfloat16 tensors (rounded to bf16 where the torch reference rounds):
 *
 *   silu_and_mul:  x [T, 2I] (gate | up; rows x_row elements apart) -> out [T, I] (rows o_row apart),
 *                  out = silu(gate) * up
 *   add_rms_norm:  x, residual [T, H] (contiguous) -> sum [T, H] = x + residual, and
 *                  out [T, H] = w * (sum * rsqrt(mean(sum^2) + eps)); residual NULL: sum is x (not written)
 *   rotary:        x [T, H, D] (strides x_st, x_sh, 1), cos/sin [T, D/2] (rows cs_st apart) -> out [T, H, D]
 *                  (contiguous), each head's halves x1, x2 -> (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
 *
 * Each row is one thread's work (OpenMP in torch's pool: see kvloom.kernels.native), so results do not
 * depend on the thread count. I must be a multiple of 8, H of 16 (what elementwise_cpu.supports() lets
 * through); D must be even. silu_and_mul runs VW lanes at a time (16 where the build targets AVX512;
 * vec8.h), then 8; add_rms_norm VW at a time.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"

/* loadS_any / storeS_any: float32 or bf16 lanes, by the kernel's dtype flag (S: 8 or w, see vec8.h). */
#define KV_DEFINE_ANY(S, VF)                                                                        \
    static inline VF load##S##_any(const void *p, int64_t i, int bf16) {                            \
        return bf16 ? load##S##_bf16((const bf16_t *)p + i) : load##S((const float *)p + i);        \
    }                                                                                               \
    static inline void store##S##_any(void *p, int64_t i, VF x, int bf16) {                         \
        if (bf16)                                                                                   \
            store##S##_bf16((bf16_t *)p + i, x);                                                    \
        else                                                                                        \
            store##S((float *)p + i, x);                                                            \
    }

KV_DEFINE_ANY(8, v8f)
KV_DEFINE_ANY(w, vwf)

/* silu(g) * u as torch computes it: g / (1 + exp(-g)) (rounded to bf16 for bf16 tensors), times u.
 * VW lanes at a time, then 8: lane by lane, so the same bits at either width. */
static void silu_and_mul(const void *x, int64_t x_row, void *out, int64_t o_row, int64_t rows, int64_t inter,
                         int num_threads, int bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t xi = t * x_row, oi = t * o_row;
        int64_t j = 0;
        for (; j + VW <= inter; j += VW) {
            const vwf g = loadw_any(x, xi + j, bf16), u = loadw_any(x, xi + inter + j, bf16);
            vwf s = g / (1.0f + expw(-g));
            if (bf16) s = roundw_bf16(s);
            storew_any(out, oi + j, s * u, bf16);
        }
        for (; j < inter; j += 8) {
            const v8f g = load8_any(x, xi + j, bf16), u = load8_any(x, xi + inter + j, bf16);
            v8f s = g / (1.0f + exp8(-g));
            if (bf16) s = round8_bf16(s);
            store8_any(out, oi + j, s * u, bf16);
        }
    }
}

/* The HF RMSNorm: float32 statistics; for bf16 the sum is a bf16 tensor, and the normalised row is
 * rounded to bf16 before the (bf16) weight multiplies it. VW lanes at a time: H must be a multiple of 16. */
static void add_rms_norm(const void *x, const void *residual, void *sum, void *out, const void *weight, int64_t rows,
                         int64_t hidden, float eps, int num_threads, int bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t base = t * hidden;
        vwf squares = {0};
        for (int64_t j = 0; j < hidden; j += VW) {
            vwf v = loadw_any(x, base + j, bf16);
            if (residual != NULL) {
                v += loadw_any(residual, base + j, bf16);
                if (bf16) v = roundw_bf16(v);
                storew_any(sum, base + j, v, bf16);
            }
            squares += v * v;
        }
        const float scale = 1.0f / sqrtf(hsumw(squares) / (float)hidden + eps);
        const void *src = residual != NULL ? (const void *)sum : x;
        for (int64_t j = 0; j < hidden; j += VW) {
            vwf v = loadw_any(src, base + j, bf16) * scale;
            if (bf16) v = roundw_bf16(v);
            storew_any(out, base + j, loadw_any(weight, j, bf16) * v, bf16);
        }
    }
}

/* `x`, kept as the rounded value it holds: the compiler may not fuse the multiply that made it into a
 * later add (an FMA rounds once where torch rounds twice). A no-op where there is no FMA to fuse into. */
#if defined(__AVX__) && (defined(__x86_64__) || defined(__i386__))
#define ROUNDED(x) __asm__("" : "+x"(x))
#elif defined(__FMA__) || defined(__aarch64__) || defined(__powerpc64__) || defined(__s390x__)
#define ROUNDED(x) __asm__("" : "+m"(x))
#else
#define ROUNDED(x) ((void)0)
#endif

/* Lanes [i, i + n) of p (n <= 8; the rest zero), and the store of the first n lanes of x at p + i. */
static inline v8f load_lanes(const void *p, int64_t i, int n, int bf16) {
    if (n == 8) return load8_any(p, i, bf16);
    v8f r = {0};
    for (int l = 0; l < n; ++l) r[l] = bf16 ? bf16_to_f32(((const bf16_t *)p)[i + l]) : ((const float *)p)[i + l];
    return r;
}

static inline void store_lanes(void *p, int64_t i, v8f x, int n, int bf16) {
    if (n == 8) {
        store8_any(p, i, x, bf16);
        return;
    }
    for (int l = 0; l < n; ++l) {
        if (bf16)
            ((bf16_t *)p)[i + l] = f32_to_bf16(x[l]);
        else
            ((float *)p)[i + l] = x[l];
    }
}

/* Rotary embedding as torch computes cat(x1 * c - x2 * s, x2 * c + x1 * s): each product rounded, then
 * the add (bit-equal to torch in float32); for bf16 every op's result is rounded to bf16, as torch's. */
static void rotary(const void *x, int64_t x_st, int64_t x_sh, void *out, const void *cos, const void *sin,
                   int64_t cs_st, int64_t tokens, int heads, int head_dim, int num_threads, int bf16) {
    const int half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tokens; ++t) {
        for (int h = 0; h < heads; ++h) {
            const int64_t xi = t * x_st + h * x_sh, oi = (t * heads + h) * head_dim, ci = t * cs_st;
            for (int j = 0; j < half; j += 8) {
                const int n = half - j < 8 ? half - j : 8;
                const v8f a = load_lanes(x, xi + j, n, bf16), b = load_lanes(x, xi + half + j, n, bf16);
                const v8f c = load_lanes(cos, ci + j, n, bf16), s = load_lanes(sin, ci + j, n, bf16);
                v8f ac = a * c, bs = b * s, bc = b * c, as = a * s;
                if (bf16) {
                    ac = round8_bf16(ac);
                    bs = round8_bf16(bs);
                    bc = round8_bf16(bc);
                    as = round8_bf16(as);
                }
                ROUNDED(ac);
                ROUNDED(bs);
                ROUNDED(bc);
                ROUNDED(as);
                store_lanes(out, oi + j, ac - bs, n, bf16);
                store_lanes(out, oi + half + j, bc + as, n, bf16);
            }
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

void kvloom_rotary(const void *x, int64_t x_st, int64_t x_sh, void *out, const void *cos, const void *sin, int64_t cs_st,
                   int64_t tokens, int heads, int head_dim, int num_threads, int bf16) {
    rotary(x, x_st, x_sh, out, cos, sin, cs_st, tokens, heads, head_dim, num_threads, bf16);
}
