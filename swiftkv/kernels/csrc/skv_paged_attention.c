/* Decode attention over a paged KV cache, in place (see swiftkv/kernels/paged_attention.py).
 *
 * One query token per sequence attends over that sequence's cached keys and values, read straight
 * from its blocks: no gathered copy of the K/V:
 *   scores[g, t] = scale * q[b, h, :] . K[kvh, slot(b, t), :]      (h = kvh * group + g)
 *   out[b, h, :] = sum_t softmax(scores[g, :])[t] * V[kvh, slot(b, t), :]
 * with slot(b, t) = block_tables[b, t / block_size] * block_size + t % block_size.
 * fp32 queries over an fp32 or bf16 cache (kv_bf16: rows widened as they are read), AVX2 + FMA for
 * head_dim % 8 == 0: scores eight keys at a time, a vectorized exp, the weighted sum of values in registers (over a
 * bf16 cache with bf16_dot: AVX512-BF16 dot products instead, skv_paged_decode_bf16.c). (sequence, KV head) pairs
 * are split across OpenMP threads; the query heads sharing a KV head read each cached row from memory once. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "skv_paged_attention.h"
#include "skv_vec.h"

/* [sum(a[0]), ..., sum(a[7])]: eight horizontal sums at once */
static inline __m256 hsum8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* eight cached values from element `i` of an fp32 or bf16 cache */
static inline __attribute__((always_inline)) __m256 load8(const void *base, int64_t i, const int bf16) {
    return bf16 ? skv_load_bf16x8((const uint16_t *)base + i) : _mm256_loadu_ps((const float *)base + i);
}

static inline __attribute__((always_inline)) float dot(const float *a, const void *base, int64_t row, int64_t D,
                                                       const int bf16) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(base, row + d, bf16), acc);
    return skv_hsum(acc);
}

/* element offset of token t's row in one head's region */
#define ROW(t) ((table[(t) / block_size] * block_size + (t) % block_size) * D)

/* scores s[g * n + t] = q[g] . K[t] for the group's query heads g and t < n, eight keys at a time (no
 * horizontal sum per key); the eight rows stay in L1 while every head of the group uses them */
static inline __attribute__((always_inline)) void scores_of(const float *q, int64_t group, const void *kh,
                                                            const int64_t *table, int64_t block_size, int64_t D,
                                                            int64_t n, float *s, const int bf16) {
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        int64_t k[8];
        for (int j = 0; j < 8; j++) k[j] = ROW(t + j);
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * D;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 qd = _mm256_loadu_ps(qg + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qd, load8(kh, k[j] + d, bf16), acc[j]);
            }
            _mm256_storeu_ps(s + g * n + t, hsum8(acc));
        }
    }
    for (; t < n; t++)
        for (int64_t g = 0; g < group; g++) s[g * n + t] = dot(q + g * D, kh, ROW(t), D, bf16);
}

/* s[t] = e^(s[t] - max s) for t < n; returns the sum */
static float softmax_numerators(float *s, int64_t n) {
    float mx = s[0];
    for (int64_t t = 1; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 e = skv_vexp(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = skv_hsum(vsum);
    for (; t < n; t++) sum += (s[t] = expf(s[t] - mx));
    return sum;
}

#define CHUNK 32 /* value rows per pass: they stay in L1 while every head of the group uses them */

/* acc[g, 0:D] += sum_{t in [t0, t1)} p[g * n + t] V[t], 64 dims at a time in registers */
static inline __attribute__((always_inline)) void weighted_values(const float *p, int64_t group, int64_t n,
                                                                  const void *vh, const int64_t *table,
                                                                  int64_t block_size, int64_t D, int64_t t0, int64_t t1,
                                                                  float *acc, const int bf16) {
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < D; c += 64) {
            const int width = D - c < 64 ? (int)(D - c) / 8 : 8;
            float *a = acc + g * D + c;
            __m256 r[8];
            for (int i = 0; i < width; i++) r[i] = _mm256_loadu_ps(a + 8 * i);
            for (int64_t t = t0; t < t1; t++) {
                const int64_t v = ROW(t) + c;
                const __m256 pt = _mm256_set1_ps(p[g * n + t]);
                if (width == 8)
                    for (int i = 0; i < 8; i++) r[i] = _mm256_fmadd_ps(pt, load8(vh, v + 8 * i, bf16), r[i]);
                else
                    for (int i = 0; i < width; i++) r[i] = _mm256_fmadd_ps(pt, load8(vh, v + 8 * i, bf16), r[i]);
            }
            for (int i = 0; i < width; i++) _mm256_storeu_ps(a + 8 * i, r[i]);
        }
}

/* q, out [B, H, D] fp32; k_cache, v_cache [Hkv, num_blocks, block_size, D] (one KV owner's K and V), fp32, or
 * bf16 when kv_bf16; block_tables [B, max_blocks]; kv_lens [B] (>= 1). Returns 0, or -1 for shapes it cannot
 * take, -2 when out of memory. */
/* one (sequence, KV head) item: the group's query heads over that sequence's cached rows */
static inline __attribute__((always_inline)) void attend_item(const float *q, const void *kh, const void *vh,
                                                              const int64_t *table, int64_t n, float *out,
                                                              int64_t group, int64_t D, int64_t block_size, float scale,
                                                              float *scores, float *work, const int bf16) {
    float *qs = work, *acc = work + group * D;
    for (int64_t i = 0; i < group * D; i++) qs[i] = scale * q[i], acc[i] = 0.f;
    scores_of(qs, group, kh, table, block_size, D, n, scores, bf16);
    float total[group];
    for (int64_t g = 0; g < group; g++) total[g] = softmax_numerators(scores + g * n, n);
    for (int64_t t0 = 0; t0 < n; t0 += CHUNK)
        weighted_values(scores, group, n, vh, table, block_size, D, t0, t0 + CHUNK < n ? t0 + CHUNK : n, acc, bf16);
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] / total[g];
}

/* shape checks; the longest context (sizes each slot's scores), or -1 */
static int64_t decode_check(const skv_paged_attn *a) {
    if (a->S < 1 || a->Hkv < 1 || a->H % a->Hkv || a->D % 8 || a->block_size < 1 || a->q_bf16) return -1;
    int64_t longest = 0;
    for (int64_t b = 0; b < a->S; b++) {
        if (a->kv_lens[b] < 1 || a->kv_lens[b] > a->max_blocks * a->block_size) return -1;
        if (a->kv_lens[b] > longest) longest = a->kv_lens[b];
    }
    return longest;
}

static int skv_paged_decode_attention_part(const skv_paged_attn *a, int64_t longest, int64_t item_lo, int64_t item_hi) {
    if (item_lo >= item_hi) return 0;
    const int64_t Hkv = a->Hkv, D = a->D, group = a->H / Hkv, head_stride = a->num_blocks * a->block_size * D;
    const int64_t esize = a->kv_bf16 ? 2 : 4;
    float *scores = malloc(sizeof(float) * group * longest); /* [group, kv_len] */
    float *work = malloc(sizeof(float) * 2 * group * D);     /* scaled queries, accumulators: [group, D] each */
    int rc = 0;
    if (!scores || !work) {
        rc = -2;
        item_hi = item_lo;
    }
    for (int64_t item = item_lo; item < item_hi; item++) { /* (sequence, KV head) */
        const int64_t b = item / Hkv, kvh = item % Hkv;
        const void *kh = (const char *)a->k_cache + kvh * head_stride * esize;
        const void *vh = (const char *)a->v_cache + kvh * head_stride * esize;
        const float *qi = a->q + item * group * D;
        float *oi = a->out + item * group * D;
        const int64_t *table = a->block_tables + b * a->max_blocks;
        if (a->kv_bf16 && a->bf16_dot &&
            skv_decode_item_bf16(qi, kh, vh, table, a->kv_lens[b], oi, group, D, a->block_size, a->scale, scores,
                                 work) == 0)
            continue;
        if (a->kv_bf16)
            attend_item(qi, kh, vh, table, a->kv_lens[b], oi, group, D, a->block_size, a->scale, scores, work, 1);
        else
            attend_item(qi, kh, vh, table, a->kv_lens[b], oi, group, D, a->block_size, a->scale, scores, work, 0);
    }
    free(scores);
    free(work);
    return rc;
}

int skv_paged_decode_attention_team(const skv_team *t, const skv_paged_attn *a) {
    const int64_t longest = decode_check(a);
    if (longest < 0) return -1;
    int64_t lo, hi;
    skv_team_range(t, a->S * a->Hkv, 1, &lo, &hi);
    return skv_paged_decode_attention_part(a, longest, lo, hi);
}

int skv_paged_decode_attention(const skv_paged_attn *a) {
    if (decode_check(a) < 0) return -1;
    int failed = 0;
#pragma omp parallel num_threads(a->nthreads)
    {
        const skv_team t = {omp_get_thread_num(), omp_get_num_threads(), NULL};
        if (t.ith == 0) SKV_COUNT_REGION();
        if (skv_paged_decode_attention_team(&t, a)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -2 : 0;
}
