/* Decode attention over the paged KV cache on the CPU: one query token per sequence, read straight
 * from the cache blocks (no gathered copy), exact softmax (max, exp, sum over all keys), float32
 * arithmetic for float32 and bfloat16 caches alike.
 *
 * Shapes, in elements (the innermost dimension D is contiguous everywhere):
 *   q      [B, Hq, D]          strides (q_sb, q_sh, 1)
 *   out    [B, Hq, D]          strides (o_sb, o_sh, 1)
 *   k, v   [num_blocks, block_size, Hkv, D], contiguous
 *   tables [B, M] int32        row stride t_sb, M = table_width; seq_lens [B] int32 (0: a zero row)
 * GQA: q head h reads kv head h / (Hq / Hkv). Sequence b attends keys 0 .. seq_lens[b]-1, key j at
 * block tables[b, j / block_size], offset j % block_size. D must be a multiple of 8.
 *
 * Work is split over (sequence, kv head) pairs with OpenMP. kvloom.kernels.native loads this library
 * after torch, so its "libgomp.so.1" is the OpenMP runtime torch already loaded: one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

/* scores[g * stride + i] = scale * (q[g] . k[i]) for n keys (rows `row` apart), group q heads. */
static void block_scores(const float *q, int group, const float *k, int64_t row, int n, int head_dim,
                         float scale, float *scores, int stride) {
    int g = 0;
    for (; g + 4 <= group; g += 4) {
        const float *q0 = q + g * head_dim, *q1 = q0 + head_dim, *q2 = q1 + head_dim, *q3 = q2 + head_dim;
        for (int i = 0; i < n; ++i) {
            const float *kr = k + i * row;
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int d = 0; d < head_dim; d += 8) {
                const v8f kv = load8(kr + d);
                a0 += load8(q0 + d) * kv;
                a1 += load8(q1 + d) * kv;
                a2 += load8(q2 + d) * kv;
                a3 += load8(q3 + d) * kv;
            }
            scores[(g + 0) * stride + i] = hsum8(a0) * scale;
            scores[(g + 1) * stride + i] = hsum8(a1) * scale;
            scores[(g + 2) * stride + i] = hsum8(a2) * scale;
            scores[(g + 3) * stride + i] = hsum8(a3) * scale;
        }
    }
    for (; g < group; ++g) {
        const float *qg = q + g * head_dim;
        for (int i = 0; i < n; ++i) {
            const float *kr = k + i * row;
            v8f a = {0};
            for (int d = 0; d < head_dim; d += 8) a += load8(qg + d) * load8(kr + d);
            scores[g * stride + i] = hsum8(a) * scale;
        }
    }
}

/* acc[g] += sum_i p[g * stride + i] * v[i] for n value rows (`row` apart). acc: [group, D]. */
static void block_values(const float *p, int stride, int group, const float *v, int64_t row, int n,
                         int head_dim, float *acc) {
    for (int d = 0; d < head_dim; d += 8) {
        int g = 0;
        for (; g + 4 <= group; g += 4) {
            v8f a0 = load8(acc + (g + 0) * head_dim + d), a1 = load8(acc + (g + 1) * head_dim + d);
            v8f a2 = load8(acc + (g + 2) * head_dim + d), a3 = load8(acc + (g + 3) * head_dim + d);
            const float *p0 = p + g * stride, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
            for (int i = 0; i < n; ++i) {
                const v8f vv = load8(v + i * row + d);
                a0 += p0[i] * vv;
                a1 += p1[i] * vv;
                a2 += p2[i] * vv;
                a3 += p3[i] * vv;
            }
            store8(acc + (g + 0) * head_dim + d, a0);
            store8(acc + (g + 1) * head_dim + d, a1);
            store8(acc + (g + 2) * head_dim + d, a2);
            store8(acc + (g + 3) * head_dim + d, a3);
        }
        for (; g < group; ++g) {
            v8f a = load8(acc + g * head_dim + d);
            for (int i = 0; i < n; ++i) a += p[g * stride + i] * load8(v + i * row + d);
            store8(acc + g * head_dim + d, a);
        }
    }
}

/* Softmax of each of `rows` rows of `len` scores in place (row i at s + i * len). */
static void softmax_rows(float *s, int rows, int len) {
    for (int r = 0; r < rows; ++r) {
        float *row = s + (size_t)r * len;
        float m = row[0];
        for (int j = 1; j < len; ++j) m = row[j] > m ? row[j] : m;
        float total = 0.0f;
        int j = 0;
        v8f sum8 = {0};
        for (; j + 8 <= len; j += 8) {
            const v8f e = exp8(load8(row + j) - m);
            store8(row + j, e);
            sum8 += e;
        }
        for (; j < len; ++j) {
            row[j] = expf(row[j] - m);
            total += row[j];
        }
        total += hsum8(sum8);
        const float inv = 1.0f / total;
        for (j = 0; j < len; ++j) row[j] *= inv;
    }
}

/* A bf16 cache block [rows, width] into float32 `dst` (same layout). */
static void widen_block(const bf16_t *src, size_t count, float *dst) {
    for (size_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}

/* Per-thread scratch, in floats: scores [Hq, max_len], q [Hq, D], acc [Hq, D], and one widened
 * block [block_size, Hkv, D] for bf16 caches. */
static size_t scratch_floats(int num_q_heads, int num_kv_heads, int max_len, int head_dim, int block_size) {
    return (size_t)num_q_heads * max_len + 2 * (size_t)num_q_heads * head_dim +
           (size_t)block_size * num_kv_heads * head_dim;
}

/* The block of cache `c` that holds keys [start, start + block_size) of a sequence, as float32 rows
 * [block_size, Hkv * D]: the cache itself for float32, widened into `widened` for bf16. */
static const float *block_rows(const void *c, int elem_size, int32_t block, int n, int block_size,
                               int64_t token_stride, float *widened) {
    const int64_t base = (int64_t)block * block_size * token_stride;
    if (elem_size == 4) return (const float *)c + base;
    widen_block((const bf16_t *)c + base, (size_t)n * token_stride, widened);
    return widened;
}

/* Asks for the `n` rows of cache block `block` ([block_size, Hkv, D] of elem_size bytes) ahead of use:
 * blocks sit at random places, so the hardware prefetcher cannot see the next one coming. */
static inline void prefetch_block(const void *c, int elem_size, int32_t block, int n, int block_size,
                                  int64_t token_stride) {
    const char *p = (const char *)c + (int64_t)block * block_size * token_stride * elem_size;
    const int64_t bytes = n * token_stride * elem_size;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

#define PREFETCH_AHEAD 2 /* blocks: one block's math is shorter than one block's trip from memory */

/* Prefetches block `index` of a sequence of `len` keys in cache `c`, if the sequence has it. */
static inline void prefetch_index(const void *c, int elem_size, const int32_t *table, int index, int len,
                                  int block_size, int64_t token_stride) {
    const int start = index * block_size;
    if (start < len)
        prefetch_block(c, elem_size, table[index], len - start < block_size ? len - start : block_size, block_size,
                       token_stride);
}

/* One sequence, all its heads: q heads [Hq, D] (float32 in qf) over `len` keys, result in acc [Hq, D].
 * Blocks are read whole and in order, PREFETCH_AHEAD blocks prefetched ahead of use: K's blocks, then
 * (after the softmax) V's, whose first blocks are asked for during K's last ones. */
static void attend_sequence(const float *qf, float *acc, const void *k, const void *v, int elem_size,
                            const int32_t *table, int len, int block_size, int num_kv_heads, int group,
                            int head_dim, float scale, float *scores, float *widened) {
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int num_blocks = (len + block_size - 1) / block_size;
    for (int i = 0; i < PREFETCH_AHEAD; ++i) prefetch_index(k, elem_size, table, i, len, block_size, token_stride);
    for (int i = 0; i < num_blocks; ++i) {
        const int start = i * block_size, n = len - start < block_size ? len - start : block_size;
        const int ahead = i + PREFETCH_AHEAD;
        if (ahead < num_blocks)
            prefetch_index(k, elem_size, table, ahead, len, block_size, token_stride);
        else
            prefetch_index(v, elem_size, table, ahead - num_blocks, len, block_size, token_stride);
        const float *rows = block_rows(k, elem_size, table[i], n, block_size, token_stride, widened);
        for (int h = 0; h < num_kv_heads; ++h)
            block_scores(qf + (size_t)h * group * head_dim, group, rows + (size_t)h * head_dim, token_stride, n,
                         head_dim, scale, scores + (size_t)h * group * len + start, len);
    }
    softmax_rows(scores, num_kv_heads * group, len);
    memset(acc, 0, sizeof(float) * (size_t)num_kv_heads * group * head_dim);
    for (int i = 0; i < num_blocks; ++i) {
        const int start = i * block_size, n = len - start < block_size ? len - start : block_size;
        prefetch_index(v, elem_size, table, i + PREFETCH_AHEAD, len, block_size, token_stride);
        const float *rows = block_rows(v, elem_size, table[i], n, block_size, token_stride, widened);
        for (int h = 0; h < num_kv_heads; ++h)
            block_values(scores + (size_t)h * group * len + start, len, group, rows + (size_t)h * head_dim,
                         token_stride, n, head_dim, acc + (size_t)h * group * head_dim);
    }
}

/* Shared driver: elem_size 4 reads float32 q/out/caches, 2 reads bfloat16 ones.
 * Returns 0; -1 when a thread's scratch could not be allocated (out is then incomplete); -2, having
 * written nothing, when the shapes are inconsistent or a sequence would read a block outside the
 * caches (a length past its table row, an id outside [0, num_blocks)). */
static int paged_decode(const void *q, int64_t q_sb, int64_t q_sh, void *out, int64_t o_sb, int64_t o_sh,
                        const void *k_cache, const void *v_cache, int64_t num_blocks, const int32_t *tables,
                        int64_t t_sb, int64_t table_width, const int32_t *seq_lens, int num_seqs,
                        int num_q_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                        int num_threads, int elem_size) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || head_dim % 8 != 0 || block_size <= 0)
        return -2;
    /* Every block a sequence reads must lie in the caches: check before touching memory. */
    int max_len = 1;
    for (int b = 0; b < num_seqs; ++b) {
        const int len = seq_lens[b];
        if (len < 0 || (int64_t)(len + block_size - 1) / block_size > table_width) return -2;
        for (int i = 0; i < (len + block_size - 1) / block_size; ++i)
            if (tables[b * t_sb + i] < 0 || tables[b * t_sb + i] >= num_blocks) return -2;
        max_len = len > max_len ? len : max_len;
    }
    const int group = num_q_heads / num_kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats(num_q_heads, num_kv_heads, max_len, head_dim,
                                                               block_size));
        if (scratch == NULL) {
            failed = 1;
        } else {
            float *qf = scratch + (size_t)num_q_heads * max_len;
            float *acc = qf + (size_t)num_q_heads * head_dim;
            float *widened = acc + (size_t)num_q_heads * head_dim;
#pragma omp for schedule(dynamic, 1)
            for (int b = 0; b < num_seqs; ++b) {
                for (int h = 0; h < num_q_heads; ++h)
                    for (int d = 0; d < head_dim; ++d) {
                        const int64_t at = b * q_sb + h * q_sh + d;
                        qf[h * head_dim + d] = elem_size == 4 ? ((const float *)q)[at]
                                                              : bf16_to_f32(((const bf16_t *)q)[at]);
                    }
                if (seq_lens[b] > 0)
                    attend_sequence(qf, acc, k_cache, v_cache, elem_size, tables + b * t_sb, seq_lens[b],
                                    block_size, num_kv_heads, group, head_dim, scale, scratch, widened);
                else /* a padding row: zeros, as the Triton kernel writes */
                    memset(acc, 0, sizeof(float) * (size_t)num_q_heads * head_dim);
                for (int h = 0; h < num_q_heads; ++h)
                    for (int d = 0; d < head_dim; ++d) {
                        const int64_t at = b * o_sb + h * o_sh + d;
                        if (elem_size == 4)
                            ((float *)out)[at] = acc[h * head_dim + d];
                        else
                            ((bf16_t *)out)[at] = f32_to_bf16(acc[h * head_dim + d]);
                    }
            }
            free(scratch);
        }
    }
    return failed ? -1 : 0;
}

int kvloom_paged_decode_f32(const float *q, int64_t q_sb, int64_t q_sh, float *out, int64_t o_sb, int64_t o_sh,
                            const float *k_cache, const float *v_cache, int64_t num_blocks, const int32_t *tables,
                            int64_t t_sb, int64_t table_width, const int32_t *seq_lens, int num_seqs,
                            int num_q_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                            int num_threads) {
    return paged_decode(q, q_sb, q_sh, out, o_sb, o_sh, k_cache, v_cache, num_blocks, tables, t_sb, table_width,
                        seq_lens, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale, num_threads, 4);
}

int kvloom_paged_decode_bf16(const bf16_t *q, int64_t q_sb, int64_t q_sh, bf16_t *out, int64_t o_sb,
                             int64_t o_sh, const bf16_t *k_cache, const bf16_t *v_cache, int64_t num_blocks,
                             const int32_t *tables, int64_t t_sb, int64_t table_width, const int32_t *seq_lens,
                             int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
                             float scale, int num_threads) {
    return paged_decode(q, q_sb, q_sh, out, o_sb, o_sh, k_cache, v_cache, num_blocks, tables, t_sb, table_width,
                        seq_lens, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale, num_threads, 2);
}
