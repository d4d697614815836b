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

#include "skv_flash.h"

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

/* ot[dd][r] = alpha[r] ot[dd][r] + sum_j v[j][dd] pt[j][r] for the four dims dd and the nrv row vectors from
 * r = 0, over the n keys of a chunk: rows of block b start at v[b] (offset to the first of the four dims) */
static inline __attribute__((always_inline)) void pv_micro(float *ot, const float *alpha, const float *const *v,
                                                           const float *pt, int64_t n, int64_t block_size, int64_t R,
                                                           int64_t D, const int nrv) {
    __m256 acc[4][3];
    for (int dd = 0; dd < 4; dd++)
        for (int i = 0; i < nrv; i++) acc[dd][i] = _mm256_mul_ps(_mm256_loadu_ps(ot + dd * R + 8 * i), _mm256_loadu_ps(alpha + 8 * i));
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

/* n elements of a bf16 head region from element `row`, widened into buf; fp32 rows are used in place */
static inline const float *rows_of(const void *head, int64_t row, int64_t n, int bf16, float *buf) {
    if (!bf16) return (const float *)head + row;
    const uint16_t *src = (const uint16_t *)head + row;
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(buf + i, skv_load_bf16x8(src + i));
    return buf;
}

/* scratch (floats): Qt, Ot [D][R]; St [chunk][R]; m, l, lim, alpha [R]; K, V rows [chunk][D] (R: rows rounded to 8) */
static size_t scratch_bytes(int64_t D, int64_t rows, int64_t chunk) {
    const int64_t R = (rows + 7) / 8 * 8;
    return sizeof(float) * (2 * D * R + chunk * R + 4 * R + 2 * chunk * D);
}

/* one item (skv_flash.h), fp32 FMAs over the cache's rows (bf16 rows widened as read) */
static void attend_tile(const skv_flash_item *it, void *scratch) {
    const int64_t nq = it->nq, group = it->group, D = it->D, t0 = it->t0, block_size = it->block_size;
    const int64_t rows = nq * group, R = (rows + 7) / 8 * 8, nv = R / 8, chunk = it->chunk;
    float *qt = scratch, *ot = qt + D * R, *st = ot + D * R, *m = st + chunk * R, *l = m + R, *lim = l + R;
    float *alpha = lim + R, *kbuf = alpha + R, *vbuf = kbuf + chunk * D;
    int64_t rv;
    for (int64_t r = 0; r < R; r++) {  /* row r = token t * group + head g; padded rows: zero queries */
        const int64_t t = r < rows ? r / group : nq - 1, g = r % group;
        const float *qr = (const float *)it->q + ((t0 + t) * it->H + it->kvh * group + g) * D;
        for (int64_t d = 0; d < D; d++) qt[d * R + r] = r < rows ? it->scale * qr[d] : 0.f;
        lim[r] = (float)(it->p0 + t0 + t); /* the last key this row sees */
        m[r] = SKV_FLASH_NEG, l[r] = 0.f;
    }
    memset(ot, 0, sizeof(float) * D * R);
    const int64_t first_lim = it->p0 + t0, end = it->p0 + t0 + nq; /* keys [0, end) are read */
    const float *kb[SKV_FLASH_CHUNK_KEYS], *vb[SKV_FLASH_CHUNK_KEYS]; /* each block's rows (<= CHUNK_KEYS blocks) */
    for (int64_t k0 = 0; k0 < end; k0 += chunk) {
        const int64_t n = end - k0 < chunk ? end - k0 : chunk;
        for (int64_t j = 0, b = 0; j < n; j += block_size, b++) {
            const int64_t row = it->table[(k0 + j) / block_size] * block_size * D;
            const int64_t mm = n - j < block_size ? n - j : block_size;
            kb[b] = rows_of(it->kh, row, (mm + 3) / 4 * 4 * D, it->bf16, kbuf + j * D);
            vb[b] = rows_of(it->vh, row, mm * D, it->bf16, vbuf + j * D);
        }
        for (int64_t j = 0; j < n; j += 4) { /* rows past n in the last four are read, never used */
            const float *k = kb[j / block_size] + j % block_size * D;
            FOR_ROW_GROUPS(rv, qk_micro(qt + 8 * rv, k, st + j * R + 8 * rv, R, D, 3),
                           qk_micro(qt + 8 * rv, k, st + j * R + 8 * rv, R, D, 2),
                           qk_micro(qt + 8 * rv, k, st + j * R + 8 * rv, R, D, 1));
        }
        skv_flash_softmax(st, R, n, k0, k0 + n - 1 > first_lim, lim, m, l, alpha);
        for (int64_t d = 0; d < D; d += 4) {
            const float *vd[SKV_FLASH_CHUNK_KEYS];
            for (int64_t b = 0; b * block_size < n; b++) vd[b] = vb[b] + d;
            FOR_ROW_GROUPS(rv, pv_micro(ot + d * R + 8 * rv, alpha + 8 * rv, vd, st + 8 * rv, n, block_size, R, D, 3),
                           pv_micro(ot + d * R + 8 * rv, alpha + 8 * rv, vd, st + 8 * rv, n, block_size, R, D, 2),
                           pv_micro(ot + d * R + 8 * rv, alpha + 8 * rv, vd, st + 8 * rv, n, block_size, R, D, 1));
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = r / group, g = r % group;
        float *o = (float *)it->out + ((t0 + t) * it->H + it->kvh * group + g) * D;
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; d++) o[d] = ot[d * R + r] * inv;
    }
}

int skv_flash_run(const skv_paged_attn *a, skv_flash_tile tile_fn, skv_flash_scratch scratch_bytes_fn) {
    const int64_t *q_lens = a->q_lens, *kv_lens = a->kv_lens;
    const int64_t S = a->S, H = a->H, Hkv = a->Hkv, D = a->D, block_size = a->block_size;
    if (S < 1 || Hkv < 1 || H % Hkv || D % 8 || block_size < 1 || block_size % 4) return -1;
    const int64_t group = H / Hkv, tile = SKV_FLASH_TILE_ROWS / group > 0 ? SKV_FLASH_TILE_ROWS / group : 1;
    const int64_t chunk = skv_flash_chunk(block_size), head_stride = a->num_blocks * block_size * D;
    const int64_t esize = a->kv_bf16 ? 2 : 4, qsize = a->q_bf16 ? 2 : 4;
    int64_t *first_item = malloc(sizeof(int64_t) * (S + 1)), *q_start = malloc(sizeof(int64_t) * S);
    if (!first_item || !q_start) {
        free(first_item), free(q_start);
        return -2;
    }
    first_item[0] = 0;
    int bad = 0;
    for (int64_t s = 0, t = 0; s < S; t += q_lens[s], s++) {
        bad |= q_lens[s] < 1 || q_lens[s] > kv_lens[s] || kv_lens[s] > a->max_blocks * block_size;
        q_start[s] = t;
        first_item[s + 1] = first_item[s] + (q_lens[s] + tile - 1) / tile * Hkv;
    }
    int failed = 0;
    if (!bad) {
#pragma omp parallel num_threads(a->nthreads)
        {
            void *buf = aligned_alloc(64, (scratch_bytes_fn(D, tile * group, chunk) + 63) / 64 * 64);
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
                const skv_flash_item it = {
                    (const char *)a->q + q_start[s] * H * D * qsize, (char *)a->out + q_start[s] * H * D * qsize, t0,
                    q_lens[s] - t0 < tile ? q_lens[s] - t0 : tile, kv_lens[s] - q_lens[s], kvh, group, H, D,
                    (const char *)a->k_cache + kvh * head_stride * esize,
                    (const char *)a->v_cache + kvh * head_stride * esize, a->block_tables + s * a->max_blocks,
                    block_size, chunk, a->scale, (int)a->kv_bf16, (int)a->q_bf16};
                tile_fn(&it, buf);
            }
            free(buf);
        }
    }
    free(first_item), free(q_start);
    return bad ? -1 : failed ? -2 : 0;
}

int skv_paged_prefill_attention(const skv_paged_attn *a) {
    return a->q_bf16 ? -1 : skv_flash_run(a, attend_tile, scratch_bytes); /* fp32 queries only */
}
