/* Causal attention of a fresh prompt on the AMX-BF16 tiles (Sapphire Rapids and later): bf16 queries, keys and values,
 * fp32 scores, softmax and sums, bf16 out -- the values PyTorch's flash attention computes for bf16, to summation
 * order and its exp.
 *
 * Per query head and block of 16 queries, keys in blocks of 32, flash-attention style (the blocks right of the
 * diagonal never read): S = Q K^T on the tiles (Q read in place as the A operand, 32 of its dims at a time; K packed
 * once per KV head into the B operand's pair layout: 16 keys x 16 dim pairs a tile), the online softmax on S in
 * AVX-512 (skv_vexp16), P rounded to bf16 (as PyTorch's bf16 flash attention does), then P V on the tiles (V packed
 * once into pairs of keys x 16 dims a tile), accumulated in the O tiles (rescaled lazily: query_block).
 * Tiles: 0-1 S, 2 A, 3 B, 4-7 O: one 16 x 16 block per 16 dims, over all the keys (D <= 64 in one pass; more in two,
 * the scores recomputed). */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "skv_amx.h"

#ifdef SKV_AMX_TARGET
#define AMX_TARGET SKV_AMX_TARGET
#define QB 16 /* queries per block: an A tile's rows */
#define KB 32 /* keys per block: two S tiles, one P tile's depth */

/* K of one KV head [T, ldk] (bf16) -> kp[(key tile * (D / 32) + dim chunk) * 512]: 16 dim pairs x 16 keys per tile,
 * Tk / 16 tiles (keys past T zero) */
AMX_TARGET static void pack_keys(const uint16_t *k, int64_t ldk, int64_t T, int64_t Tk, int64_t D, uint16_t *kp) {
    const int64_t tiles = Tk / 16;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t c = 0; c < D / 32; c++) {
            __m512 r[16];
            for (int n = 0; n < 16; n++)
                r[n] = 16 * t + n < T ? _mm512_loadu_ps((const float *)(k + (16 * t + n) * ldk + 32 * c))
                                      : _mm512_setzero_ps(); /* 32 bf16 = 16 dim pairs of one key */
            skv_transpose16(r);
            for (int p = 0; p < 16; p++) _mm512_store_ps((float *)(kp + (t * (D / 32) + c) * 512 + 32 * p), r[p]);
        }
}

/* V of one KV head -> vp[(key block * (D / 16) + dim tile) * 512]: 16 key pairs x 16 dims x 2 per tile */
AMX_TARGET static void pack_values(const uint16_t *v, int64_t ldv, int64_t T, int64_t D, uint16_t *vp) {
    const int64_t blocks = (T + KB - 1) / KB;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t d = 0; d < D / 16; d++)
            for (int p = 0; p < 16; p++) {
                const int64_t k0 = KB * b + 2 * p;
                const __m256i a = k0 < T ? _mm256_loadu_si256((const __m256i *)(v + k0 * ldv + 16 * d)) : zero;
                const __m256i c =
                    k0 + 1 < T ? _mm256_loadu_si256((const __m256i *)(v + (k0 + 1) * ldv + 16 * d)) : zero;
                _mm512_store_si512(vp + (b * (D / 16) + d) * 512 + 32 * p, skv_pairs16(a, c));
            }
}

/* O tiles 4.. (n of them) <-> o [16, 16 n] fp32 (rows 64 n bytes apart) */
AMX_TARGET static void store_o(float *o, int n) {
    _tile_stored(4, o, 256);
    if (n > 1) _tile_stored(5, o + 16, 256);
    if (n > 2) _tile_stored(6, o + 32, 256);
    if (n > 3) _tile_stored(7, o + 48, 256);
}

AMX_TARGET static void load_o(const float *o, int n) {
    _tile_loadd(4, o, 256);
    if (n > 1) _tile_loadd(5, o + 16, 256);
    if (n > 2) _tile_loadd(6, o + 32, 256);
    if (n > 3) _tile_loadd(7, o + 48, 256);
}

/* One block of QB queries (rows i0.., `rows` valid) of one head over keys [0, i0 + rows): out rows (bf16), 64 dims a
 * pass (the scores recomputed per pass where D > 64). Lazy rescaling: a row's reference max m is raised only when a
 * score passes it by more than RESCALE (then the O tiles are stored, scaled, reloaded), so P <= e^RESCALE and O stays
 * in its tiles over all the keys; the row sums are kept as 16 lanes, added up once at the end. */
#define RESCALE 8.0f
AMX_TARGET static void query_block(const uint16_t *q, int64_t ldq, int64_t i0, int64_t rows, const uint16_t *kp,
                                   const uint16_t *vp, int64_t D, float scale, uint16_t *out, int64_t ldo,
                                   uint16_t *qpad, float *s, uint16_t *pb, float *o) {
    const uint16_t *a = q + i0 * ldq; /* a partial block: its rows copied and zero-padded (no read past T) */
    int64_t lda = ldq;
    if (rows < QB) {
        memset(qpad, 0, sizeof(uint16_t) * QB * D);
        for (int64_t r = 0; r < rows; r++) memcpy(qpad + r * D, q + (i0 + r) * ldq, sizeof(uint16_t) * D);
        a = qpad, lda = D;
    }
    const int64_t end = i0 + rows; /* keys the last query sees */
    const __m512 ninf = _mm512_set1_ps(-INFINITY), sc = _mm512_set1_ps(scale);
    float m[QB], alpha[QB];
    __m512 lsum[QB];
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int nd = D - d0 < 64 ? (int)((D - d0) / 16) : 4;
        for (int r = 0; r < QB; r++) m[r] = -INFINITY, lsum[r] = _mm512_setzero_ps();
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t k0 = 0; k0 < end; k0 += KB) {
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t c = 0; c < D / 32; c++) {
                _tile_loadd(2, a + 32 * c, lda * 2);
                _tile_loadd(3, kp + ((k0 / 16) * (D / 32) + c) * 512, 64);
                _tile_dpbf16ps(0, 2, 3);
                _tile_loadd(3, kp + ((k0 / 16 + 1) * (D / 32) + c) * 512, 64);
                _tile_dpbf16ps(1, 2, 3);
            }
            _tile_stored(0, s, KB * 4);
            _tile_stored(1, s + 16, KB * 4);
            int rescale = 0;
            const int full = k0 + KB <= i0 + 1; /* every row sees every key of the block: no mask */
            for (int r = 0; r < QB; r++) {
                const int64_t valid = r < rows ? i0 + r + 1 - k0 : 0; /* keys of this block row r sees (causal) */
                alpha[r] = 1.0f;
                if (valid <= 0) {
                    _mm512_store_si512(pb + KB * r, _mm512_setzero_si512());
                    continue;
                }
                __m512 v0 = _mm512_mul_ps(_mm512_loadu_ps(s + KB * r), sc);
                __m512 v1 = _mm512_mul_ps(_mm512_loadu_ps(s + KB * r + 16), sc);
                __mmask16 k_lo = 0xFFFF, k_hi = 0xFFFF;
                if (!full) {
                    k_lo = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1);
                    k_hi = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1);
                    v0 = _mm512_mask_mov_ps(ninf, k_lo, v0), v1 = _mm512_mask_mov_ps(ninf, k_hi, v1);
                }
                const __m512 limit = _mm512_set1_ps(m[r] + RESCALE); /* -inf + 8: every valid score passes it */
                if (_mm512_cmp_ps_mask(v0, limit, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v1, limit, _CMP_GT_OQ)) {
                    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
                    if (m[r] != -INFINITY) alpha[r] = expf(m[r] - mx), rescale = 1;
                    lsum[r] = _mm512_mul_ps(lsum[r], _mm512_set1_ps(alpha[r]));
                    m[r] = mx;
                }
                const __m512 mv = _mm512_set1_ps(m[r]);
                const __m512 p0 = _mm512_maskz_mov_ps(k_lo, skv_vexp16(_mm512_sub_ps(v0, mv)));
                const __m512 p1 = _mm512_maskz_mov_ps(k_hi, skv_vexp16(_mm512_sub_ps(v1, mv)));
                lsum[r] = _mm512_add_ps(lsum[r], _mm512_add_ps(p0, p1)); /* summed before P's rounding, as PyTorch */
                _mm512_store_si512(pb + KB * r, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            }
            if (rescale) { /* O's rows times alpha, through memory */
                store_o(o, nd);
                for (int r = 0; r < QB; r++)
                    for (int j = 0; j < nd; j++)
                        _mm512_store_ps(o + 64 * r + 16 * j,
                                        _mm512_mul_ps(_mm512_load_ps(o + 64 * r + 16 * j), _mm512_set1_ps(alpha[r])));
                load_o(o, nd);
            }
            _tile_loadd(2, pb, KB * 2); /* P: 16 queries x 32 keys */
            const uint16_t *vb = vp + ((k0 / KB) * (D / 16) + d0 / 16) * 512;
            SKV_AMX_DP(4, 5, 6, 7, 2, 3, vb, 512, nd); /* O tiles += P x V, 16 dims each */
        }
        store_o(o, nd);
        for (int64_t r = 0; r < rows; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lsum[r]));
            for (int j = 0; j < nd; j++)
                skv_store_bf16x16(out + (i0 + r) * ldo + d0 + 16 * j,
                                  _mm512_mul_ps(_mm512_load_ps(o + 64 * r + 16 * j), inv));
        }
    }
}

/* q [T, H, D] (rows ldq elements apart), k / v [T, Hkv, D] (rows ldk / ldv apart), out [T, H, D] (rows ldo apart),
 * all bf16; D 32, 64, 96 or 128; H a multiple of Hkv. Returns 0, -1 bad shapes, -2 out of memory. */
AMX_TARGET int skv_flash_attention_amx(const uint16_t *q, int64_t ldq, const uint16_t *k, int64_t ldk,
                                       const uint16_t *v, int64_t ldv, uint16_t *out, int64_t ldo, int64_t T,
                                       int64_t H, int64_t Hkv, int64_t D, float scale, int nthreads) {
    if (T < 1 || H < 1 || Hkv < 1 || H % Hkv || D % 32 || D > 128 || ldq < H * D || ldk < Hkv * D || ldv < Hkv * D ||
        ldo < H * D)
        return -1;
    const int64_t Tk = (T + KB - 1) / KB * KB; /* keys padded to whole blocks */
    uint16_t *kp = aligned_alloc(64, (size_t)(Hkv * Tk * D * 2)), *vp = aligned_alloc(64, (size_t)(Hkv * Tk * D * 2));
    if (!kp || !vp) {
        free(kp), free(vp);
        return -2;
    }
    int rc = 0;
    const int64_t blocks = (T + QB - 1) / QB, group = H / Hkv;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < 2 * Hkv; g++) {
            if (g < Hkv) pack_keys(k + g * D, ldk, T, Tk, D, kp + g * Tk * D);
            else pack_values(v + (g - Hkv) * D, ldv, T, D, vp + (g - Hkv) * Tk * D);
        }
        uint16_t *qpad = aligned_alloc(64, QB * 128 * 2), *pb = aligned_alloc(64, QB * KB * 2);
        float *s = aligned_alloc(64, QB * KB * 4), *o = aligned_alloc(64, QB * 64 * 4);
        const int ok = qpad && pb && s && o;
        if (!ok) {
#pragma omp atomic write
            rc = -2;
        } else {
            skv_amx_configure(8);
        }
        /* query blocks from the last (the most keys) down, handed out one at a time: causal work is uneven (every
         * thread reaches this loop, whatever its allocations did) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < H * blocks; w++) {
            const int64_t h = w % H, b = blocks - 1 - w / H, i0 = b * QB;
            const int64_t rows = T - i0 < QB ? T - i0 : QB, kvh = h / group;
            if (ok)
                query_block(q + h * D, ldq, i0, rows, kp + kvh * Tk * D, vp + kvh * Tk * D, D, scale, out + h * D, ldo,
                            qpad, s, pb, o);
        }
        if (ok) _tile_release();
        free(qpad), free(pb), free(s), free(o);
    }
    free(kp), free(vp);
    return rc;
}
#else
int skv_flash_attention_amx(const uint16_t *q, int64_t ldq, const uint16_t *k, int64_t ldk, const uint16_t *v,
                            int64_t ldv, uint16_t *out, int64_t ldo, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                            float scale, int nthreads) {
    (void)q, (void)ldq, (void)k, (void)ldk, (void)v, (void)ldv, (void)out, (void)ldo, (void)T, (void)H, (void)Hkv;
    (void)D, (void)scale, (void)nthreads;
    return -1; /* this compiler cannot emit the instructions: the caller uses PyTorch's SDPA */
}
#endif
