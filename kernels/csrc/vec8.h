/* Shared helpers of kvloom's C kernels: 8-lane float32 vectors (GCC vector extensions: AVX with
 * -mavx2, SSE pairs without), VW-lane ones (16 with AVX512), bfloat16 conversions that round like torch,
 * and a vector exp. */
#ifndef KVLOOM_VEC8_H
#define KVLOOM_VEC8_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef uint16_t bf16_t;
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline float hsum8(v8f x) {
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* Lane j: the sum of the 8 lanes of x[j] (eight horizontal sums at once: with AVX, 6 pairwise adds
 * and a swap of halves rather than 8 scalar reductions). */
static inline v8f hsum8x8(const v8f x[8]) {
#ifdef __AVX__
    const __m256 t0 = _mm256_hadd_ps((__m256)x[0], (__m256)x[1]), t1 = _mm256_hadd_ps((__m256)x[2], (__m256)x[3]);
    const __m256 t2 = _mm256_hadd_ps((__m256)x[4], (__m256)x[5]), t3 = _mm256_hadd_ps((__m256)x[6], (__m256)x[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return (v8f)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
    v8f r;
    for (int j = 0; j < 8; ++j) r[j] = hsum8(x[j]);
    return r;
#endif
}

/* Lane-wise max (a NaN in b is passed over, as in a scalar `a > b ? a : b` chain). */
static inline v8f max8(v8f a, v8f b) {
    const v8i keep = a > b;
    return (v8f)(((v8i)a & keep) | ((v8i)b & ~keep));
}

static inline float bf16_to_f32(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* The bits of round-to-nearest-even bf16(x) in the top half of each lane (the low half zero), as
 * f32_to_bf16 computes them lane by lane: NaN stays a (quiet) NaN. */
#define KV_DEFINE_BF16_BITS(NAME, VF, VI, VU)                                                       \
    static inline VU NAME(VF x) {                                                                   \
        const VU u = (VU)x;                                                                         \
        const VI nan = (VI)((u & 0x7fffffffu) > 0x7f800000u);                                       \
        const VU rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;                          \
        const VU quiet = (u & 0xffff0000u) | 0x00400000u;                                           \
        return (rounded & ~(VU)nan) | (quiet & (VU)nan);                                           \
    }

/* Lanes of exp(x): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for
 * exp(r) (relative error under 2 ulp), then 2^n through the exponent bits. Below -87.3 gives 0, above
 * 88.7 gives +inf (float32's range ends there), NaN stays NaN. Lane by lane, so every vector width gives
 * the same bits. */
#define KV_DEFINE_EXP(NAME, VF, VI)                                                                 \
    static inline VF NAME(VF x) {                                                                   \
        const VF lo = (VF){0} - 87.3f, hi = (VF){0} + 88.7f;                                        \
        const VI under = x < lo, over = x > hi;                                                     \
        x = (VF)(((VI)x & ~under) | ((VI)lo & under));                                              \
        x = (VF)(((VI)x & ~over) | ((VI)hi & over));                                                \
        /* round(x / ln2) to the nearest integer: adding and subtracting 1.5 * 2^23 rounds */       \
        const VF n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;                        \
        const VF r = (x - n * 0.693359375f) + n * 2.12194440e-4f;                                   \
        VF p = (VF){0} + 1.9875691500e-4f;                                                          \
        p = p * r + 1.3981999507e-3f;                                                               \
        p = p * r + 8.3334519073e-3f;                                                               \
        p = p * r + 4.1665795894e-2f;                                                               \
        p = p * r + 1.6666665459e-1f;                                                               \
        p = p * r + 5.0000001201e-1f;                                                               \
        p = (p * r) * r + r + 1.0f;                                                                 \
        /* 2^n as 2^(n/2) squared keeps n = 128 (x near 88.7) representable */                      \
        const VI half = __builtin_convertvector(n, VI) >> 1;                                        \
        const VI rest = __builtin_convertvector(n, VI) - half;                                      \
        const VF s1 = (VF)((half + 127) << 23), s2 = (VF)((rest + 127) << 23);                      \
        const VF inf = (VF)((VI){0} + 0x7f800000);                                                  \
        const VF result = p * s1 * s2;                                                              \
        return (VF)((((VI)result & ~over) | ((VI)inf & over)) & ~under);                            \
    }

/* Loads and stores of float32 and bf16 lanes, bf16 rounding and exp for one vector width (suffix S):
 * loadS, storeS, loadS_bf16, storeS_bf16, roundS_bf16, bf16_bitsS, expS. */
#define KV_DEFINE_LANES(S, VF, VI, VU, VH)                                                          \
    static inline VF load##S(const float *p) {                                                      \
        VF r;                                                                                       \
        memcpy(&r, p, sizeof r);                                                                    \
        return r;                                                                                   \
    }                                                                                               \
    static inline void store##S(float *p, VF x) { memcpy(p, &x, sizeof x); }                        \
    static inline VF load##S##_bf16(const bf16_t *p) {                                              \
        VH h;                                                                                       \
        memcpy(&h, p, sizeof h);                                                                    \
        return (VF)(__builtin_convertvector(h, VU) << 16);                                          \
    }                                                                                               \
    KV_DEFINE_BF16_BITS(bf16_bits##S, VF, VI, VU)                                                   \
    static inline void store##S##_bf16(bf16_t *p, VF x) {                                           \
        const VH h = __builtin_convertvector(bf16_bits##S(x) >> 16, VH);                            \
        memcpy(p, &h, sizeof h);                                                                    \
    }                                                                                               \
    static inline VF round##S##_bf16(VF x) { return (VF)bf16_bits##S(x); }                          \
    KV_DEFINE_EXP(exp##S, VF, VI)

KV_DEFINE_LANES(8, v8f, v8i, v8u, v8h)

/* Wide vectors: VW lanes, 16 (one 512-bit register) where the build targets AVX512, else 8. Kernels whose
 * results are lane by lane (no sums across lanes) give the same bits at either width. */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float vwf __attribute__((vector_size(VW * 4)));
typedef int32_t vwi __attribute__((vector_size(VW * 4)));
typedef uint32_t vwu __attribute__((vector_size(VW * 4)));
typedef uint16_t vwh __attribute__((vector_size(VW * 2)));

KV_DEFINE_LANES(w, vwf, vwi, vwu, vwh)

static inline float hsumw(vwf x) {
    float s = 0.0f;
    for (int i = 0; i < VW; ++i) s += x[i];
    return s;
}

#endif
