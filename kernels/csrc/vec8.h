/* Shared helpers of kvloom's C kernels: 8-lane float32 vectors (GCC vector extensions: AVX with
 * -mavx2, SSE pairs without), bfloat16 conversions that round like torch, and a vector exp. */
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

static inline v8f load8(const float *p) {
    v8f r;
    memcpy(&r, p, sizeof r);
    return r;
}

static inline void store8(float *p, v8f x) { memcpy(p, &x, sizeof x); }

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

static inline v8f load8_bf16(const bf16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

/* The bits of round-to-nearest-even bf16(x) in the top half of each lane (the low half zero), as
 * f32_to_bf16 computes them lane by lane: NaN stays a (quiet) NaN. */
static inline v8u bf16_bits8(v8f x) {
    const v8u u = (v8u)x;
    const v8i nan = (v8i)((u & 0x7fffffffu) > 0x7f800000u);
    const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    const v8u quiet = (u & 0xffff0000u) | 0x00400000u;
    return (rounded & ~(v8u)nan) | (quiet & (v8u)nan);
}

static inline void store8_bf16(bf16_t *p, v8f x) {
    const v8h h = __builtin_convertvector(bf16_bits8(x) >> 16, v8h);
    memcpy(p, &h, sizeof h);
}

static inline v8f round8_bf16(v8f x) { return (v8f)bf16_bits8(x); }

/* 8 lanes of exp(x): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial
 * for exp(r) (relative error under 2 ulp), then 2^n through the exponent bits. Below -87.3 gives 0,
 * above 88.7 gives +inf (float32's range ends there), NaN stays NaN. */
static inline v8f exp8(v8f x) {
    const v8f lo = (v8f){0} - 87.3f, hi = (v8f){0} + 88.7f;
    const v8i under = x < lo, over = x > hi;
    x = (v8f)(((v8i)x & ~under) | ((v8i)lo & under));
    x = (v8f)(((v8i)x & ~over) | ((v8i)hi & over));
    /* round(x / ln2) to the nearest integer: adding and subtracting 1.5 * 2^23 rounds in float32 */
    const v8f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const v8f r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v8f p = (v8f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r) * r + r + 1.0f;
    /* 2^n as 2^(n/2) squared keeps n = 128 (x near 88.7) representable */
    const v8i half = __builtin_convertvector(n, v8i) >> 1;
    const v8i rest = __builtin_convertvector(n, v8i) - half;
    const v8f s1 = (v8f)((half + 127) << 23), s2 = (v8f)((rest + 127) << 23);
    const v8f inf = (v8f)((v8i){0} + 0x7f800000);
    const v8f result = p * s1 * s2;
    return (v8f)((((v8i)result & ~over) | ((v8i)inf & over)) & ~under);
}

#endif
