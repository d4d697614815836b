/* Prefill attention over a paged KV cache, in place (see swiftkv/kernels/paged_attention.py).
 *
 * Every sequence's queries are the last q_len of its kv_len tokens (a fresh prompt: q_len == kv_len; a
 * cached prefix or a chunked prompt: q_len < kv_len; a decode row: q_len == 1), bottom-right causal:
 *   out[i, h, :] = sum_{t <= p(i)} softmax_t(scale * q[i, h, :] . K[kvh, t, :]) V[kvh, t, :]
 * with p(i) = kv_len - q_len + i and the keys read straight from the sequence's blocks.
 *
 * Flash-attention style, one work item per (sequence, KV head, tile of query tokens): the tile's rows are
 * (token, query head of the group) pairs, held *transposed* so that eight rows fill one AVX2 register:
 * Qt [D][R] (scaled), the scores St [block_size][R], the accumulators Ot [D][R]. Each cached block of keys
 * is then one pass of broadcast-key-times-eight-rows FMAs (no transposition of K or V), the online softmax
 * runs eight rows per instruction, and a block wholly left of the diagonal needs no mask. Blocks right of
 * the tile's last query are never read. fp32 queries over an fp32 or bf16 cache (bf16 blocks are widened
 * once, as read). */
#include <stdlib.h>
#include <string.h>

#include "skv_paged_attention.h"
#include "skv_vec.h"

#define TILE_ROWS 64 /* query rows (token x head) per work item, before rounding up to eight */
#define CHUNK_KEYS 64 /* keys per online-softmax step: whole blocks, at least one */
#define NEG (-1e30f) /* the score of a masked key */

/* st[j][r] = sum_d k[j][d] qt[d][r] for the four keys j and the nrv row vectors from r = 0 (strides: R) */
static inline __attribute__((always_inline)) void qk_micro(const float *qt, const float *k, float *st, int64_t R,
                                                           int64_t D, const int nrv) {
    __m256 acc[4][3];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < nrv; i++) acc[j][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m256 q[3];
        for (int i = 0; i < nrv; i++) q[i] = _mm256_loadu_ps(qt + d * R + 8 * i);
        for (int j = 0; j < 4; j++) {
            const __m256 kj = _mm256_broadcast_ss(k + j * D + d);
            for (int i = 0; i < nrv; i++) acc[j][i] = _mm256_fmadd_ps(kj, q[i], acc[j][i]);
        }
    }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < nrv; i++) _mm256_storeu_ps(st + j * R + 8 * i, acc[j][i]);
}

/* ot[dd][r] += sum_j v[j][dd] pt[j][r] for the four dims dd and the nrv row vectors from r = 0, over the n
 * keys of a chunk: rows of block b start at v[b] (offset to the first of the four dims) */
static inline __attribute__((always_inline)) void pv_micro(float *ot, const float *const *v, const float *pt, int64_t n,
                                                           int64_t block_size, int64_t R, int64_t D, const int nrv) {
    __m256 acc[4][3];
    for (int dd = 0; dd < 4; dd++)
        for (int i = 0; i < nrv; i++) acc[dd][i] = _mm256_loadu_ps(ot + dd * R + 8 * i);
    for (int64_t j0 = 0, b = 0; j0 < n; j0 += block_size, b++) {
        const float *vb = v[b];
        for (int64_t j = 0; j < block_size && j0 + j < n; j++) {
            __m256 p[3];
            for (int i = 0; i < nrv; i++) p[i] = _mm256_loadu_ps(pt + (j0 + j) * R + 8 * i);
            for (int dd = 0; dd < 4; dd++) {
                const __m256 vj = _mm256_broadcast_ss(vb + j * D + dd);
                for (int i = 0; i < nrv; i++) acc[dd][i] = _mm256_fmadd_ps(vj, p[i], acc[dd][i]);
            }
        }
    }
    for (int dd = 0; dd < 4; dd++)
        for (int i = 0; i < nrv; i++) _mm256_storeu_ps(ot + dd * R + 8 * i, acc[dd][i]);
}

/* the row vectors in groups of three (twelve accumulators), then the one or two left */
#define FOR_ROW_GROUPS(rv, CALL3, CALL2, CALL1)       \
    do {                                              \
        for (rv = 0; rv + 3 <= nv; rv += 3) CALL3;    \
        if (nv - rv == 2) CALL2;                      \
        else if (nv - rv == 1) CALL1;                 \
    } while (0)

/* this pass's scratch, per thread (floats): Qt, Ot [D][R]; St [chunk][R]; m, l, lim [R]; K, V rows [chunk][D] */
typedef struct {
    float *qt, *ot, *st, *m, *l, *lim, *kbuf, *vbuf;
} tile_work;

/* n elements of a bf16 head region from element `row`, widened into buf; fp32 rows are used in place */
static inline const float *rows_of(const void *head, int64_t row, int64_t n, int bf16, float *buf) {
    if (!bf16) return (const float *)head + row;
    const uint16_t *src = (const uint16_t *)head + row;
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, skv_load_bf16x8(src + i));
    return buf;
}

/* one item: query tokens [t0, t0 + nq) of a sequence (query 0 at key position p0), the group's heads of KV
 * head kvh (q, out point at the sequence's first query token, [tokens, H, D]) */
static void attend_tile(const float *q, float *out, int64_t t0, int64_t nq, int64_t p0, int64_t kvh, int64_t group,
                        int64_t H, int64_t D, const void *kh, const void *vh, const int64_t *table, int64_t block_size,
                        float scale, int bf16, tile_work *w) {
    const int64_t rows = nq * group, R = (rows + 7) / 8 * 8, nv = R / 8;
    int64_t rv;
    for (int64_t r = 0; r < R; r++) {  /* row r = token t * group + head g; padded rows: zero queries */
        const int64_t t = r < rows ? r / group : nq - 1, g = r % group;
        const float *qr = q + ((t0 + t) * H + kvh * group + g) * D;
        for (int64_t d = 0; d < D; d++) w->qt[d * R + r] = r < rows ? scale * qr[d] : 0.f;
        w->lim[r] = (float)(p0 + t0 + t); /* the last key this row sees */
        w->m[r] = NEG, w->l[r] = 0.f;
    }
    memset(w->ot, 0, sizeof(float) * D * R);
    const int64_t first_lim = p0 + t0, end = p0 + t0 + nq; /* keys [0, end) are read */
    const int64_t chunk = block_size >= CHUNK_KEYS ? block_size : CHUNK_KEYS / block_size * block_size;
    const float *kb[CHUNK_KEYS], *vb[CHUNK_KEYS]; /* each block's rows (a chunk holds at most CHUNK_KEYS blocks) */
    for (int64_t k0 = 0; k0 < end; k0 += chunk) {
        const int64_t n = end - k0 < chunk ? end - k0 : chunk;
        for (int64_t j = 0, b = 0; j < n; j += block_size, b++) {
            const int64_t row = table[(k0 + j) / block_size] * block_size * D, m = n - j < block_size ? n - j : block_size;
            kb[b] = rows_of(kh, row, (m + 3) / 4 * 4 * D, bf16, w->kbuf + j * D);
            vb[b] = rows_of(vh, row, m * D, bf16, w->vbuf + j * D);
        }
        for (int64_t j = 0; j < n; j += 4) { /* rows past n in the last four are read, never used */
            const float *k = kb[j / block_size] + j % block_size * D;
            FOR_ROW_GROUPS(rv, qk_micro(w->qt + 8 * rv, k, w->st + j * R + 8 * rv, R, D, 3),
                           qk_micro(w->qt + 8 * rv, k, w->st + j * R + 8 * rv, R, D, 2),
                           qk_micro(w->qt + 8 * rv, k, w->st + j * R + 8 * rv, R, D, 1));
        }
        const int masked = k0 + n - 1 > first_lim; /* some key is right of some row's diagonal */
        for (int64_t i = 0; i < nv; i++) { /* online softmax, eight rows at once */
            float *s = w->st + 8 * i;
            const __m256 lim = _mm256_loadu_ps(w->lim + 8 * i), m_old = _mm256_loadu_ps(w->m + 8 * i);
            __m256 m_new = m_old;
            for (int64_t j = 0; j < n; j++) {
                __m256 sj = _mm256_loadu_ps(s + j * R);
                if (masked) {
                    sj = _mm256_blendv_ps(sj, _mm256_set1_ps(NEG),
                                          _mm256_cmp_ps(_mm256_set1_ps((float)(k0 + j)), lim, _CMP_GT_OQ));
                    _mm256_storeu_ps(s + j * R, sj);
                }
                m_new = _mm256_max_ps(m_new, sj);
            }
            __m256 sum = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const __m256 sj = _mm256_loadu_ps(s + j * R);
                __m256 p = skv_vexp(_mm256_sub_ps(sj, m_new));
                if (masked) p = _mm256_and_ps(p, _mm256_cmp_ps(sj, _mm256_set1_ps(NEG), _CMP_GT_OQ)); /* exact 0 */
                _mm256_storeu_ps(s + j * R, p);
                sum = _mm256_add_ps(sum, p);
            }
            const __m256 alpha = skv_vexp(_mm256_sub_ps(m_old, m_new));
            _mm256_storeu_ps(w->l + 8 * i, _mm256_fmadd_ps(_mm256_loadu_ps(w->l + 8 * i), alpha, sum));
            _mm256_storeu_ps(w->m + 8 * i, m_new);
            if (_mm256_movemask_ps(_mm256_cmp_ps(m_new, m_old, _CMP_GT_OQ))) /* a new maximum: rescale */
                for (int64_t d = 0; d < D; d++) {
                    float *o = w->ot + d * R + 8 * i;
                    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), alpha));
                }
        }
        for (int64_t d = 0; d < D; d += 4) {
            const float *vd[CHUNK_KEYS];
            for (int64_t b = 0; b * block_size < n; b++) vd[b] = vb[b] + d;
            FOR_ROW_GROUPS(rv, pv_micro(w->ot + d * R + 8 * rv, vd, w->st + 8 * rv, n, block_size, R, D, 3),
                           pv_micro(w->ot + d * R + 8 * rv, vd, w->st + 8 * rv, n, block_size, R, D, 2),
                           pv_micro(w->ot + d * R + 8 * rv, vd, w->st + 8 * rv, n, block_size, R, D, 1));
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = r / group, g = r % group;
        float *o = out + ((t0 + t) * H + kvh * group + g) * D;
        const float inv = 1.f / w->l[r];
        for (int64_t d = 0; d < D; d++) o[d] = w->ot[d * R + r] * inv;
    }
}

int skv_paged_prefill_attention(const skv_paged_attn *a) {
    const float *q = a->q;
    float *out = a->out;
    const void *k_cache = a->k_cache, *v_cache = a->v_cache;
    const int64_t *block_tables = a->block_tables, *q_lens = a->q_lens, *kv_lens = a->kv_lens;
    const int64_t S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, num_blocks = a->num_blocks, block_size = a->block_size;
    const int64_t max_blocks = a->max_blocks, kv_bf16 = a->kv_bf16;
    const float scale = a->scale;
    const int nthreads = a->nthreads;
    if (S < 1 || Hkv < 1 || H % Hkv || D % 8 || block_size < 1 || block_size % 4) return -1;
    const int64_t group = H / Hkv, tile = TILE_ROWS / group > 0 ? TILE_ROWS / group : 1;
    const int64_t chunk = block_size >= CHUNK_KEYS ? block_size : CHUNK_KEYS / block_size * block_size;
    const int64_t R = (tile * group + 7) / 8 * 8, head_stride = num_blocks * block_size * D, esize = kv_bf16 ? 2 : 4;
    int64_t *first_item = malloc(sizeof(int64_t) * (S + 1)), *q_start = malloc(sizeof(int64_t) * S);
    if (!first_item || !q_start) {
        free(first_item), free(q_start);
        return -2;
    }
    first_item[0] = 0;
    int bad = 0;
    for (int64_t s = 0, t = 0; s < S; t += q_lens[s], s++) {
        bad |= q_lens[s] < 1 || q_lens[s] > kv_lens[s] || kv_lens[s] > max_blocks * block_size;
        q_start[s] = t;
        first_item[s + 1] = first_item[s] + (q_lens[s] + tile - 1) / tile * Hkv;
    }
    int failed = 0;
    if (!bad) {
#pragma omp parallel num_threads(nthreads)
        {
            float *buf = malloc(sizeof(float) * (2 * D * R + chunk * R + 3 * R + 2 * chunk * D));
            tile_work w = {buf, buf + D * R, buf + 2 * D * R, buf + (2 * D + chunk) * R, buf + (2 * D + chunk + 1) * R,
                           buf + (2 * D + chunk + 2) * R, buf + (2 * D + chunk + 3) * R,
                           buf + (2 * D + chunk + 3) * R + chunk * D};
            if (!buf) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = first_item[S] - 1; item >= 0; item--) { /* last tiles (the longest) first */
                if (!buf) continue;
                int64_t s = 0;
                while (first_item[s + 1] <= item) s++;
                const int64_t i = item - first_item[s], t0 = i / Hkv * tile, kvh = i % Hkv;
                const int64_t nq = q_lens[s] - t0 < tile ? q_lens[s] - t0 : tile;
                attend_tile(q + q_start[s] * H * D, out + q_start[s] * H * D, t0, nq, kv_lens[s] - q_lens[s], kvh,
                            group, H, D, (const char *)k_cache + kvh * head_stride * esize,
                            (const char *)v_cache + kvh * head_stride * esize, block_tables + s * max_blocks, block_size,
                            scale, (int)kv_bf16, &w);
            }
            free(buf);
        }
    }
    free(first_item), free(q_start);
    return bad ? -1 : failed ? -2 : 0;
}
