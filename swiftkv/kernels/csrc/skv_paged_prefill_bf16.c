/* The prefill attention of skv_paged_prefill.c with AVX512-BF16 dot products, for a bf16 cache on a CPU with
 * avx512_bf16 (Zen 4, Sapphire Rapids and later): vdpbf16ps sums 32 bf16 products per instruction into 16 fp32
 * lanes, twice the work of an fp32 FMA. Same work items and tiles as skv_flash.h; what changes:
 *   scores: the tile's rows held as bf16 *pairs* of dims, Qt2 [D/2][R][2], sixteen rows per register (moved there
 *           by 16 x 16 transposes; bf16 queries as they are, fp32 ones rounded); each key's pair of dims broadcast,
 *           read in place from the cache (no widening); scaled in fp32 afterwards, into log2 units;
 *   softmax: online, sixteen rows per instruction, 2^x (skv_vexp2_16);
 *   values: the probabilities rounded to bf16 as pairs of keys as the softmax makes them, Pt2 [n/2][R][2] (as flash
 *           attention does for bf16 models), each chunk's values interleaved once into pairs of keys per dim,
 *           Vt2 [n/2][D][2]; the outputs transposed back, written as fp32 or bf16 (q_bf16);
 * every sum is fp32. D % 32 == 0 and a bf16 cache, else -1 (the caller then runs skv_paged_prefill_attention).
 * Compiled through function attributes only: call it only where the CPU has the instructions. */
#include <stdlib.h>
#include <string.h>

#include "skv_flash.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
#define BF16_TARGET SKV_BF16_TARGET
#define LOG2E 1.44269504088896341f
#define RV 4 /* row vectors (16 rows each) per micro-tile: 4 keys (or dims) x 4 = 16 accumulators */

/* R: the tile's rows rounded to 16 */
static int64_t rows16(int64_t rows) { return (rows + 15) / 16 * 16; }

/* scratch: Qt2 [D/2][R], Pt2 [chunk/2][R], Vt2 [chunk/2][D] (pairs, uint32); Ot [D][R], St [chunk][R], m, l, lim,
 * alpha [R] (floats) */
static size_t scratch_bytes(int64_t D, int64_t rows, int64_t chunk) {
    const int64_t R = rows16(rows);
    return sizeof(uint32_t) * (D / 2 * R + chunk / 2 * R + chunk / 2 * D) + sizeof(float) * (D * R + chunk * R + 4 * R);
}

/* st[j][r] = scale * sum_d K[j][d] q[r][d] for four keys j (rows D apart from k) and nrv row vectors */
BF16_TARGET static inline __attribute__((always_inline)) void qk_micro(const uint32_t *qt2, const uint16_t *k, float *st,
                                                                       int64_t R, int64_t D, float scale, const int nrv) {
    __m512 acc[4][RV];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < nrv; i++) acc[j][i] = _mm512_setzero_ps();
    for (int64_t d2 = 0; d2 < D / 2; d2++) {
        __m512bh q[RV];
        for (int i = 0; i < nrv; i++) q[i] = (__m512bh)_mm512_loadu_si512(qt2 + d2 * R + 16 * i);
        for (int j = 0; j < 4; j++) {
            uint32_t kp;
            memcpy(&kp, k + j * D + 2 * d2, sizeof(kp));
            const __m512bh kj = (__m512bh)_mm512_set1_epi32((int)kp);
            for (int i = 0; i < nrv; i++) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], q[i], kj);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < nrv; i++) _mm512_storeu_ps(st + j * R + 16 * i, _mm512_mul_ps(acc[j][i], sc));
}

/* ot[dd][r] = alpha[r] ot[dd][r] + sum_j V[j][d0 + dd] p[r][j] for four dims dd and nrv row vectors, over n2 pairs
 * of keys */
BF16_TARGET static inline __attribute__((always_inline)) void pv_micro(float *ot, const float *alpha, const uint32_t *vt2,
                                                                       const uint32_t *pt2, int64_t n2, int64_t R,
                                                                       int64_t D, const int nrv) {
    __m512 acc[4][RV];
    for (int dd = 0; dd < 4; dd++)
        for (int i = 0; i < nrv; i++)
            acc[dd][i] = _mm512_mul_ps(_mm512_loadu_ps(ot + dd * R + 16 * i), _mm512_loadu_ps(alpha + 16 * i));
    for (int64_t j2 = 0; j2 < n2; j2++) {
        __m512bh p[RV];
        for (int i = 0; i < nrv; i++) p[i] = (__m512bh)_mm512_loadu_si512(pt2 + j2 * R + 16 * i);
        for (int dd = 0; dd < 4; dd++) {
            const __m512bh v = (__m512bh)_mm512_set1_epi32((int)vt2[j2 * D + dd]);
            for (int i = 0; i < nrv; i++) acc[dd][i] = _mm512_dpbf16_ps(acc[dd][i], p[i], v);
        }
    }
    for (int dd = 0; dd < 4; dd++)
        for (int i = 0; i < nrv; i++) _mm512_storeu_ps(ot + dd * R + 16 * i, acc[dd][i]);
}

/* the rows (of sixteen) whose last visible key `lim` is at or right of key k */
BF16_TARGET static inline __mmask16 visible(int64_t k, __m512 lim) {
    return _mm512_cmp_ps_mask(_mm512_set1_ps((float)k), lim, _CMP_LE_OQ);
}

/* skv_flash_softmax (skv_flash.h) sixteen rows per instruction (R % 16 == 0 here), the scores in log2 units (qk_micro
 * scales them by log2(e)), so 2^x in place of e^x (half the instructions per exponential); the probabilities go
 * straight to Pt2, rounded to bf16 as pairs of keys (a missing last key: 0), their fp32 values summed into l */
BF16_TARGET static inline void softmax16(const float *st, uint32_t *pt2, int64_t R, int64_t n, int64_t k0, int masked,
                                         const float *lim, float *m, float *l, float *alpha) {
    for (int64_t i = 0; i < R / 16; i++) {
        const float *s = st + 16 * i;
        const __m512 lm = _mm512_loadu_ps(lim + 16 * i), m_old = _mm512_loadu_ps(m + 16 * i);
        __m512 m_new = m_old;
        for (int64_t j = 0; j < n; j++) { /* a masked score: SKV_FLASH_NEG */
            const __m512 sj = _mm512_loadu_ps(s + j * R);
            m_new = masked ? _mm512_mask_max_ps(m_new, visible(k0 + j, lm), m_new, sj) : _mm512_max_ps(m_new, sj);
        }
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 2) {
            __m512 p[2];
            for (int h = 0; h < 2; h++) {
                if (j + h >= n) {
                    p[h] = _mm512_setzero_ps();
                    continue;
                }
                p[h] = skv_vexp2_16(_mm512_sub_ps(_mm512_loadu_ps(s + (j + h) * R), m_new));
                if (masked) p[h] = _mm512_maskz_mov_ps(visible(k0 + j + h, lm), p[h]); /* exact 0 */
                sum = _mm512_add_ps(sum, p[h]);
            }
            _mm512_storeu_si512(pt2 + j / 2 * R + 16 * i,
                                skv_pairs16((__m256i)_mm512_cvtneps_pbh(p[0]), (__m256i)_mm512_cvtneps_pbh(p[1])));
        }
        const __m512 a = skv_vexp2_16(_mm512_sub_ps(m_old, m_new));
        _mm512_storeu_ps(l + 16 * i, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * i), a, sum));
        _mm512_storeu_ps(m + 16 * i, m_new);
        _mm512_storeu_ps(alpha + 16 * i, a);
    }
}

/* the row vectors in groups of RV, then the rest (nrv a constant in each call, so the micro-kernels unroll) */
#define FOR_ROW_GROUPS(nv, rv, CALL)                               \
    do {                                                           \
        for (rv = 0; rv + RV <= nv; rv += RV) CALL(RV);            \
        switch (nv - rv) {                                         \
            case 3: CALL(3); break;                                \
            case 2: CALL(2); break;                                \
            case 1: CALL(1); break;                                \
            default: break;                                        \
        }                                                          \
    } while (0)

/* the first byte of tile row r's D values in q or out ([tokens, H, D], fp32 or bf16): r = token t * group + head g */
static inline char *row_of(const skv_flash_item *it, const void *base, int64_t r) {
    return (char *)base + ((it->t0 + r / it->group) * it->H + it->kvh * it->group + r % it->group) * it->D *
                              (it->q_bf16 ? 2 : 4);
}

BF16_TARGET static void attend_tile(const skv_flash_item *it, void *scratch) {
    const int64_t nq = it->nq, group = it->group, D = it->D, t0 = it->t0, block_size = it->block_size;
    const int64_t rows = nq * group, R = rows16(rows), nv = R / 16, chunk = it->chunk;
    uint32_t *qt2 = scratch, *pt2 = qt2 + D / 2 * R, *vt2 = pt2 + chunk / 2 * R;
    float *ot = (float *)(vt2 + chunk / 2 * D), *st = ot + D * R, *m = st + chunk * R, *l = m + R, *lim = l + R;
    float *alpha = lim + R;
    const uint16_t *kh = it->kh, *vh = it->vh;
    int64_t rv;
    for (int64_t r0 = 0; r0 < R; r0 += 16) /* row r = token t * group + head g; padded rows: zero queries */
        for (int64_t c = 0; c < D; c += 32) { /* pairs c / 2 .. c / 2 + 15 of sixteen rows, transposed */
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                const char *qr = r0 + j < rows ? row_of(it, it->q, r0 + j) : NULL;
                if (!qr)
                    v[j] = _mm512_setzero_ps();
                else if (it->q_bf16) /* bf16 queries: pairs already */
                    v[j] = _mm512_loadu_ps((const uint16_t *)qr + c);
                else
                    v[j] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps((const float *)qr + c + 16),
                                                       _mm512_loadu_ps((const float *)qr + c));
            }
            skv_transpose16(v);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps((float *)(qt2 + (c / 2 + i) * R + r0), v[i]);
        }
    for (int64_t r = 0; r < R; r++) {
        lim[r] = (float)(it->p0 + t0 + (r < rows ? r / group : nq - 1));
        m[r] = SKV_FLASH_NEG, l[r] = 0.f;
    }
    memset(ot, 0, sizeof(float) * D * R);
    const int64_t first_lim = it->p0 + t0, end = it->p0 + t0 + nq;
    for (int64_t k0 = 0; k0 < end; k0 += chunk) {
        const int64_t n = end - k0 < chunk ? end - k0 : chunk, n2 = (n + 1) / 2;
        for (int64_t j = 0; j < n; j += 4) { /* in place; rows past n in the last four are read, never used */
            const uint16_t *k = kh + (it->table[(k0 + j) / block_size] * block_size + j % block_size) * D;
#define QK(NRV) qk_micro(qt2 + 16 * rv, k, st + j * R + 16 * rv, R, D, it->scale * LOG2E, NRV)
            FOR_ROW_GROUPS(nv, rv, QK);
#undef QK
        }
        softmax16(st, pt2, R, n, k0, k0 + n - 1 > first_lim, lim, m, l, alpha);
        for (int64_t j2 = 0; j2 < n2; j2++) { /* keys 2 j2, 2 j2 + 1 (a missing last key: 0) as pairs */
            const int64_t j = 2 * j2;
            const uint16_t *v0 = vh + (it->table[(k0 + j) / block_size] * block_size + j % block_size) * D;
            for (int64_t d = 0; d < D; d += 16) { /* block_size % 4 == 0: both keys in one block */
                const __m256i a = _mm256_loadu_si256((const __m256i *)(v0 + d));
                const __m256i b = j + 1 < n ? _mm256_loadu_si256((const __m256i *)(v0 + D + d)) : _mm256_setzero_si256();
                _mm512_storeu_si512(vt2 + j2 * D + d, skv_pairs16(a, b));
            }
        }
        for (int64_t d = 0; d < D; d += 4) {
#define PV(NRV) pv_micro(ot + d * R + 16 * rv, alpha + 16 * rv, vt2 + d, pt2 + 16 * rv, n2, R, D, NRV)
            FOR_ROW_GROUPS(nv, rv, PV);
#undef PV
        }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 16) /* the output rows, sixteen dims of sixteen rows transposed at a time */
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
            __m512 v[16];
            for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_ps(ot + (d0 + i) * R + r0);
            skv_transpose16(v);
            for (int j = 0; j < 16 && r0 + j < rows; j++) {
                const __m512 o = _mm512_mul_ps(v[j], _mm512_set1_ps(1.f / l[r0 + j]));
                char *orow = row_of(it, it->out, r0 + j);
                if (it->q_bf16)
                    skv_store_bf16x16((uint16_t *)orow + d0, o);
                else
                    _mm512_storeu_ps((float *)orow + d0, o);
            }
        }
}

int skv_paged_prefill_attention_bf16(const skv_paged_attn *a) {
    if (!a->kv_bf16 || a->D % 32) return -1;
    return skv_flash_run(a, attend_tile, scratch_bytes);
}
#else
int skv_paged_prefill_attention_bf16(const skv_paged_attn *a) {
    (void)a;
    return -1; /* this compiler cannot emit the instructions: the caller uses skv_paged_prefill_attention */
}
#endif
