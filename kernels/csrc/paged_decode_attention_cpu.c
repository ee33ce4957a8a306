/* Attention over the paged KV cache on the CPU, one query row at a time: decode rows (one per
 * sequence) and the rows of short prefills alike, read straight from the cache blocks (no gathered
 * copy), exact softmax (max, exp, sum over all keys), float32 arithmetic for float32 and bfloat16
 * caches alike.
 *
 * Shapes, in elements (the innermost dimension D is contiguous everywhere):
 *   q      [B, Hq, D]          strides (q_sb, q_sh, 1)
 *   out    [B, Hq, D]          strides (o_sb, o_sh, 1)
 *   k, v   [num_blocks, block_size, Hkv, D], contiguous; or int8 [num_blocks, block_size, Hkv, D + 4]: each
 *          token's row of a head holds D int8 values and then their float32 scale (kvloom.kernels.kv_int8)
 *   tables [S, M] int32        row stride t_sb, M = table_width (one row per sequence)
 *   row_seq [B] int32          the table row of each query row (NULL: query row b reads table row b)
 *   row_lens [B] int32         keys each query row attends (0: a zero row)
 * GQA: q head h reads kv head h / (Hq / Hkv). Query row b attends keys 0 .. row_lens[b]-1 of its
 * sequence, key j at block tables[s, j / block_size], offset j % block_size. D must be a multiple of 8.
 * A prefill row at position p of its sequence attends p + 1 keys: causal attention, row by row.
 *
 * q and out are float32 or bf16; the caches float32 or bf16 like q, or int8 (widened a block at a time to
 * float32 rows: value times its row's scale, as kv_int8.dequantize_rows computes it).
 *
 * Work is split over query rows with OpenMP (dynamic schedule: lengths differ). kvloom.kernels.native
 * loads this library after torch, so its "libgomp.so.1" is the OpenMP runtime torch already loaded:
 * one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

/* The scores of one key row k ([Hkv, D]) against every q head, into scores[0 .. Hq):
 * scores[j] = scale * (q[j] . k[j / group]). Eight q heads at a time where four q heads share a kv
 * head (each key vector then feeds four multiply-adds), their eight sums reduced together. */
static void key_scores(const float *q, const float *k, int num_q_heads, int group, int head_dim, float scale,
                       float *scores) {
    int j = 0;
    for (; group % 4 == 0 && j + 8 <= num_q_heads; j += 8) {
        const float *qj = q + (size_t)j * head_dim;
        const float *k0 = k + (size_t)(j / group) * head_dim, *k1 = k + (size_t)((j + 4) / group) * head_dim;
        v8f a[8] = {{0}};
        for (int d = 0; d < head_dim; d += 8) {
            const v8f x0 = load8(k0 + d), x1 = load8(k1 + d);
            for (int u = 0; u < 4; ++u) {
                a[u] += load8(qj + u * head_dim + d) * x0;
                a[u + 4] += load8(qj + (u + 4) * head_dim + d) * x1;
            }
        }
        store8(scores + j, hsum8x8(a) * scale);
    }
    for (; j < num_q_heads; ++j) {
        const float *qj = q + (size_t)j * head_dim, *kj = k + (size_t)(j / group) * head_dim;
        v8f a = {0};
        for (int d = 0; d < head_dim; d += 8) a += load8(qj + d) * load8(kj + d);
        scores[j] = hsum8(a) * scale;
    }
}

/* acc[g] += sum_i p[i * p_row + g] * v[i] for n value rows (`row` apart) and `group` q heads sharing
 * them; acc: [group, D]. Where it can, 16 columns of four heads at once: eight accumulators stay in
 * registers over the rows, and each row's two loads feed eight multiply-adds. */
static void block_values(const float *p, int p_row, int group, const float *v, int64_t row, int n,
                         int head_dim, float *acc) {
    int d = 0;
    for (; group % 4 == 0 && d + 16 <= head_dim; d += 16) {
        for (int g = 0; g < group; g += 4) {
            float *c0 = acc + (g + 0) * head_dim + d, *c1 = c0 + head_dim, *c2 = c1 + head_dim, *c3 = c2 + head_dim;
            v8f a0 = load8(c0), a1 = load8(c1), a2 = load8(c2), a3 = load8(c3);
            v8f b0 = load8(c0 + 8), b1 = load8(c1 + 8), b2 = load8(c2 + 8), b3 = load8(c3 + 8);
            const float *pi = p + g;
            const float *vi = v + d;
            for (int i = 0; i < n; ++i, pi += p_row, vi += row) {
                const v8f x = load8(vi), y = load8(vi + 8);
                a0 += pi[0] * x;
                b0 += pi[0] * y;
                a1 += pi[1] * x;
                b1 += pi[1] * y;
                a2 += pi[2] * x;
                b2 += pi[2] * y;
                a3 += pi[3] * x;
                b3 += pi[3] * y;
            }
            store8(c0, a0);
            store8(c1, a1);
            store8(c2, a2);
            store8(c3, a3);
            store8(c0 + 8, b0);
            store8(c1 + 8, b1);
            store8(c2 + 8, b2);
            store8(c3 + 8, b3);
        }
    }
    for (; d < head_dim; d += 8)
        for (int g = 0; g < group; ++g) {
            v8f a = load8(acc + g * head_dim + d);
            for (int i = 0; i < n; ++i) a += p[i * p_row + g] * load8(v + i * row + d);
            store8(acc + g * head_dim + d, a);
        }
}

/* Softmax over keys of scores [len, H] (key-major: one column per head), in place but unnormalised:
 * column j becomes exp(s - max_j), and inv[j] = 1 / its sum (the caller scales the output by it). */
static void softmax_columns(float *s, int len, int num_heads, float *inv) {
    int j = 0;
    for (; j + 8 <= num_heads; j += 8) {
        v8f m = load8(s + j);
        for (int t = 1; t < len; ++t) m = max8(m, load8(s + (size_t)t * num_heads + j));
        v8f sum = {0};
        for (int t = 0; t < len; ++t) {
            float *at = s + (size_t)t * num_heads + j;
            const v8f e = exp8(load8(at) - m);
            store8(at, e);
            sum += e;
        }
        store8(inv + j, 1.0f / sum);
    }
    for (; j < num_heads; ++j) {
        float m = s[j];
        for (int t = 1; t < len; ++t) m = s[(size_t)t * num_heads + j] > m ? s[(size_t)t * num_heads + j] : m;
        float sum = 0.0f;
        for (int t = 0; t < len; ++t) {
            float *at = s + (size_t)t * num_heads + j;
            *at = expf(*at - m);
            sum += *at;
        }
        inv[j] = 1.0f / sum;
    }
}

/* A bf16 cache block [rows, width] into float32 `dst` (same layout). */
static void widen_block(const bf16_t *src, size_t count, float *dst) {
    for (size_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}

/* An int8 cache block of n token rows ([Hkv, D + 4] bytes each: D values, then the float32 scale) into
 * float32 `dst` [n, Hkv, D]. */
static void widen_int8_block(const int8_t *src, int n, int num_kv_heads, int head_dim, float *dst) {
    for (int r = 0; r < n * num_kv_heads; ++r) {
        const int8_t *row = src + (size_t)r * (head_dim + 4);
        float scale;
        memcpy(&scale, row + head_dim, sizeof scale);
        float *out = dst + (size_t)r * head_dim;
        for (int d = 0; d < head_dim; ++d) out[d] = (float)row[d] * scale;
    }
}

/* Per-thread scratch, in floats: scores [max_len, Hq], q [Hq, D], acc [Hq, D], inv [Hq], and one widened
 * block [block_size, Hkv, D] for bf16 caches. */
static size_t scratch_floats(int num_q_heads, int num_kv_heads, int max_len, int head_dim, int block_size) {
    return (size_t)num_q_heads * max_len + 2 * (size_t)num_q_heads * head_dim + (size_t)num_q_heads +
           (size_t)block_size * num_kv_heads * head_dim;
}

/* Cache kinds: the bytes of one element, or CACHE_INT8 for int8 rows with their scale (kv_int8). */
#define CACHE_INT8 1

/* Bytes of one token's row (all kv heads) in a cache of `kind`. */
static inline int64_t row_bytes(int kind, int num_kv_heads, int head_dim) {
    return kind == CACHE_INT8 ? (int64_t)num_kv_heads * (head_dim + 4) : (int64_t)num_kv_heads * head_dim * kind;
}

/* The block of cache `c` that holds keys [start, start + block_size) of a sequence, as float32 rows
 * [block_size, Hkv * D]: the cache itself for float32, widened into `widened` for bf16 and int8. */
static const float *block_rows(const void *c, int kind, int32_t block, int n, int block_size, int num_kv_heads,
                               int head_dim, float *widened) {
    const int64_t base = (int64_t)block * block_size * row_bytes(kind, num_kv_heads, head_dim);
    const char *p = (const char *)c + base;
    if (kind == 4) return (const float *)p;
    if (kind == CACHE_INT8)
        widen_int8_block((const int8_t *)p, n, num_kv_heads, head_dim, widened);
    else
        widen_block((const bf16_t *)p, (size_t)n * num_kv_heads * head_dim, widened);
    return widened;
}

/* Asks for token row `t` (`bytes` long) of block `index` of a sequence of `len` keys in cache `c`, if the
 * sequence has that row. Blocks sit at random places, so the hardware prefetcher cannot see the next one
 * coming; asking a row at a time spreads the requests over the math. */
static inline void prefetch_row(const void *c, int64_t bytes, const int32_t *table, int index, int t, int len,
                                int block_size) {
    if (index * block_size + t >= len) return;
    const char *p = (const char *)c + ((int64_t)table[index] * block_size + t) * bytes;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

#define PREFETCH_AHEAD 2 /* blocks: one block's math is shorter than one block's trip from memory */

/* One sequence, all its heads: q heads [Hq, D] (float32 in qf) over `len` keys, result in acc [Hq, D].
 *
 * Scores are kept key-major, [len, Hq]. K pass, key by key: each key's row of all kv heads
 * (Hkv * D contiguous values) is scored against every q head, so the cache is read front to back
 * (reading one head's columns of a block at a time, as an earlier version did, was ~25% slower from
 * memory).
 * Softmax per column. V pass, head by head within a block, accumulators in registers; the sums'
 * reciprocals scale acc at the end. Each row read asks for the row PREFETCH_AHEAD blocks ahead: K's,
 * then V's first blocks during K's last. */
static void attend_sequence(const float *qf, float *acc, const void *k, const void *v, int kind,
                            const int32_t *table, int len, int block_size, int num_kv_heads, int group,
                            int head_dim, float scale, float *scores, float *inv, float *widened) {
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim, bytes = row_bytes(kind, num_kv_heads, head_dim);
    const int num_blocks = (len + block_size - 1) / block_size;
    const int num_q_heads = num_kv_heads * group;
    for (int i = 0; i < num_blocks; ++i) {
        const int start = i * block_size, n = len - start < block_size ? len - start : block_size;
        const int ahead = i + PREFETCH_AHEAD;
        const float *rows = block_rows(k, kind, table[i], n, block_size, num_kv_heads, head_dim, widened);
        for (int t = 0; t < n; ++t) {
            if (ahead < num_blocks)
                prefetch_row(k, bytes, table, ahead, t, len, block_size);
            else
                prefetch_row(v, bytes, table, ahead - num_blocks, t, len, block_size);
            key_scores(qf, rows + t * token_stride, num_q_heads, group, head_dim, scale,
                       scores + (size_t)(start + t) * num_q_heads);
        }
    }
    softmax_columns(scores, len, num_q_heads, inv);
    memset(acc, 0, sizeof(float) * (size_t)num_q_heads * head_dim);
    for (int i = 0; i < num_blocks; ++i) {
        const int start = i * block_size, n = len - start < block_size ? len - start : block_size;
        const float *rows = block_rows(v, kind, table[i], n, block_size, num_kv_heads, head_dim, widened);
        for (int h = 0; h < num_kv_heads; ++h) {
            for (int t = h * block_size / num_kv_heads; t < (h + 1) * block_size / num_kv_heads; ++t)
                prefetch_row(v, bytes, table, i + PREFETCH_AHEAD, t, len, block_size);
            block_values(scores + (size_t)start * num_q_heads + h * group, num_q_heads, group,
                         rows + (size_t)h * head_dim, token_stride, n, head_dim, acc + (size_t)h * group * head_dim);
        }
    }
    for (int j = 0; j < num_q_heads; ++j)
        for (int d = 0; d < head_dim; ++d) acc[(size_t)j * head_dim + d] *= inv[j];
}

/* Shared driver: q_size 4 reads float32 q/out, 2 bfloat16 ones; `kind` is the caches' (see CACHE_INT8). Query row r reads the
 * table row row_seq[r] (r itself when row_seq is NULL) and attends its first row_lens[r] keys.
 * Returns 0; -1 when a thread's scratch could not be allocated (out is then incomplete); -2, having
 * written nothing, when the shapes are inconsistent or a row would read a block outside the caches (a
 * table row outside [0, num_tables), a length past its table row, an id outside [0, num_blocks)). */
static int paged_rows(const void *q, int64_t q_sb, int64_t q_sh, void *out, int64_t o_sb, int64_t o_sh,
                      const void *k_cache, const void *v_cache, int64_t num_blocks, const int32_t *tables,
                      int64_t t_sb, int64_t table_width, int64_t num_tables, const int32_t *row_seq,
                      const int32_t *row_lens, int num_rows, int num_q_heads, int num_kv_heads, int head_dim,
                      int block_size, float scale, int num_threads, int q_size, int kind) {
    if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || head_dim % 8 != 0 || block_size <= 0 ||
        (row_seq == NULL && num_tables < num_rows))
        return -2;
    /* Every block a row reads must lie in the caches: check before touching memory, each table row up to
     * the longest length any row asks of it. */
    int32_t *need = calloc(num_tables > 0 ? (size_t)num_tables : 1, sizeof(int32_t));
    if (need == NULL) return -1;
    int max_len = 1, bad = 0;
    for (int r = 0; r < num_rows && !bad; ++r) {
        const int64_t t = row_seq == NULL ? r : row_seq[r];
        const int len = row_lens[r];
        if (t < 0 || t >= num_tables || len < 0) {
            bad = 1;
        } else {
            need[t] = len > need[t] ? len : need[t];
            max_len = len > max_len ? len : max_len;
        }
    }
    for (int64_t t = 0; t < num_tables && !bad; ++t) {
        const int64_t blocks = (need[t] + block_size - 1) / block_size;
        if (blocks > table_width) bad = 1;
        for (int64_t i = 0; i < blocks && !bad; ++i)
            if (tables[t * t_sb + i] < 0 || tables[t * t_sb + i] >= num_blocks) bad = 1;
    }
    free(need);
    if (bad) return -2;
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
            float *inv = acc + (size_t)num_q_heads * head_dim;
            float *widened = inv + num_q_heads;
#pragma omp for schedule(dynamic, 1)
            for (int r = 0; r < num_rows; ++r) {
                for (int h = 0; h < num_q_heads; ++h)
                    for (int d = 0; d < head_dim; ++d) {
                        const int64_t at = r * q_sb + h * q_sh + d;
                        qf[h * head_dim + d] = q_size == 4 ? ((const float *)q)[at]
                                                           : bf16_to_f32(((const bf16_t *)q)[at]);
                    }
                const int64_t t = row_seq == NULL ? r : row_seq[r];
                if (row_lens[r] > 0)
                    attend_sequence(qf, acc, k_cache, v_cache, kind, tables + t * t_sb, row_lens[r],
                                    block_size, num_kv_heads, group, head_dim, scale, scratch, inv, widened);
                else /* a padding row: zeros, as the Triton kernel writes */
                    memset(acc, 0, sizeof(float) * (size_t)num_q_heads * head_dim);
                for (int h = 0; h < num_q_heads; ++h)
                    for (int d = 0; d < head_dim; ++d) {
                        const int64_t at = r * o_sb + h * o_sh + d;
                        if (q_size == 4)
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

/* The entry point: bf16 0 reads float32 q/out, 1 bfloat16 ones; int8_cache 0 reads caches in q's dtype, 1 int8
 * caches (kv_int8 rows: D values, then the float32 scale). See paged_rows. */
int kvloom_paged_rows(const void *q, int64_t q_sb, int64_t q_sh, void *out, int64_t o_sb, int64_t o_sh,
                      const void *k_cache, const void *v_cache, int64_t num_blocks, const int32_t *tables,
                      int64_t t_sb, int64_t table_width, int64_t num_tables, const int32_t *row_seq,
                      const int32_t *row_lens, int num_rows, int num_q_heads, int num_kv_heads, int head_dim,
                      int block_size, float scale, int num_threads, int bf16, int int8_cache) {
    const int q_size = bf16 ? 2 : 4;
    return paged_rows(q, q_sb, q_sh, out, o_sb, o_sh, k_cache, v_cache, num_blocks, tables, t_sb, table_width,
                      num_tables, row_seq, row_lens, num_rows, num_q_heads, num_kv_heads, head_dim, block_size, scale,
                      num_threads, q_size, int8_cache ? CACHE_INT8 : q_size);
}
