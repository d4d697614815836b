/* The panel GEMM of skv_gemm.c with AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products per instruction into
 * 16 fp32 sums, twice the fp32 FMA's work), for a model computing in bf16 on a CPU with avx512_bf16 (Zen 4,
 * Sapphire Rapids and later). Activations and weights are rounded to bf16 (nearest even) first -- the values a
 * bf16 model holds -- and every product is summed in fp32. Per panel of 8 output rows the weights are widened
 * once into a thread's own bf16 buffer (bf16 weights are read in place); a 6 x 4 register tile of 512-bit
 * accumulators runs over every input row. Compiled for these instructions through function attributes only:
 * call it only where the CPU has them (the Python side checks its flags). */
#include <stdlib.h>
#include <string.h>

#include "skv_dequant.h"
#include "skv_gemm.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
#define BF16_TARGET SKV_BF16_TARGET
#define NR SKV_GEMM_PANEL /* output rows per panel */
#define MR 6 /* input rows per micro-tile (the tile code below is written for MR <= 6) */
#define OR 4 /* output rows per micro-tile: MR x OR = 24 accumulators + 4 weight and 1 input vector = 29 of 32
              * registers (Zen 4, default model, batch-32 decode's matmuls: 229 -> 278 GFLOP/s over 3 x 4 tiles) */

/* n fp32 (n % 16 == 0) -> bf16 bits, rounded to nearest even */
BF16_TARGET static void to_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        memcpy(dst + i, &b, sizeof(b));
    }
}

/* [sum(a), sum(b), sum(c), sum(d)]: pairs interleaved and added within each 128-bit lane, then the four lanes added */
BF16_TARGET static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* a0+a2 b0+b2 a1+a3 b1+b3 */
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* y[r, c] (rows ldy apart) = x[r, :] . P[c, :] for R input rows and C panel rows, 32 inputs per step */
BF16_TARGET static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t I, const uint16_t *P,
                                                                   float *y, int64_t ldy, const int R, const int C) {
    __m512 acc[MR][OR];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < I; k += 32) {
        __m512bh w[OR];
        for (int c = 0; c < C; c++) w[c] = (__m512bh)_mm512_loadu_si512(P + c * I + k);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * I + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, w[c]);
        }
    }
    if (C == 4) { /* a row's four sums at once: 13 instructions instead of four reductions (~30) */
        for (int r = 0; r < R; r++) _mm_storeu_ps(y + r * ldy, sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
        return;
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

/* dst[0:I] = W[o, :] rounded to bf16: the blocked kinds straight from their codes (scale * q + offset by FMA, as
 * skv_dequant_row, then two vectors to 32 bf16 at once: ~3x fewer instructions than through an fp32 row) */
BF16_TARGET void skv_widen_row_bf16(const skv_weight *w, int64_t o, float *row, uint16_t *dst) {
    const int64_t I = w->in_features, nb = I / 32;
    if (w->kind == SKV_Q4) {
        const uint8_t *r = (const uint8_t *)w->q + o * I / 2;
        const uint16_t *s = (const uint16_t *)w->scale + o * nb, *off = (const uint16_t *)w->offset + o * nb;
        for (int64_t b = 0; b < nb; b++) { /* byte j: code j (low nibble), code 16 + j (high nibble) */
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(r + 16 * b)));
            const __m512 sb = _mm512_set1_ps(skv_f16(s[b])), ob = _mm512_set1_ps(skv_f16(off[b]));
            const __m512 lo = _mm512_fmadd_ps(sb, _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))), ob);
            const __m512 hi = _mm512_fmadd_ps(sb, _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), ob);
            _mm512_storeu_si512(dst + 32 * b, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    } else if (w->kind == SKV_Q8) {
        const uint8_t *r = (const uint8_t *)w->q + o * I;
        const float *s = (const float *)w->scale + o * nb, *off = (const float *)w->offset + o * nb;
        for (int64_t b = 0; b < nb; b++) {
            const __m512 sb = _mm512_set1_ps(s[b]), ob = _mm512_set1_ps(off[b]);
            const __m512 lo = _mm512_fmadd_ps(
                sb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(r + 32 * b)))), ob);
            const __m512 hi = _mm512_fmadd_ps(
                sb, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(r + 32 * b + 16)))), ob);
            _mm512_storeu_si512(dst + 32 * b, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    } else {
        skv_dequant_row_bf16(w, o, row, dst);
    }
}

#define TILE_C(R, C)                                   \
    switch (C) {                                       \
        case 1: tile(xm, I, Pc, ym, ldy, R, 1); break; \
        case 2: tile(xm, I, Pc, ym, ldy, R, 2); break; \
        case 3: tile(xm, I, Pc, ym, ldy, R, 3); break; \
        default: tile(xm, I, Pc, ym, ldy, R, 4); break; \
    }

/* y[:, 0:rows] = x . P^T, OR panel rows at a time against every tile of at most MR input rows; the rows are shared
 * out evenly (32 = 6 + 6 + 5 + 5 + 5 + 5, not 6 x 5 + 2) */
BF16_TARGET static void panel_times_rows(const uint16_t *x, int64_t M, int64_t I, const uint16_t *P, float *y,
                                         int64_t ldy, int rows) {
    const int64_t tiles = (M + MR - 1) / MR;
    for (int c0 = 0; c0 < rows; c0 += OR) {
        const int C = rows - c0 < OR ? rows - c0 : OR;
        const uint16_t *Pc = P + c0 * I;
        for (int64_t t = 0, m = 0, R; t < tiles; t++, m += R) {
            R = M / tiles + (t < M % tiles);
            const uint16_t *xm = x + m * I;
            float *ym = y + m * ldy + c0;
            switch (R) {
                case 1: TILE_C(1, C) break;
                case 2: TILE_C(2, C) break;
                case 3: TILE_C(3, C) break;
                case 4: TILE_C(4, C) break;
                case 5: TILE_C(5, C) break;
                default: TILE_C(MR, C) break;
            }
        }
    }
}

BF16_TARGET int skv_gemm_bf16_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy,
                                   int64_t o_lo, int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features;
    if (skv_weight_check(w) || M < 1 || ldy < O || I % 32 || o_lo % NR) return -1;
    if (o_lo >= o_hi) return 0;
    const int inplace = w->kind == SKV_BF16; /* bf16 rows are a panel already */
    uint16_t *xb = aligned_alloc(64, ((sizeof(uint16_t) * M * I + 63) / 64) * 64); /* [M, I] bf16, each slot's own */
    uint16_t *P = inplace ? NULL : aligned_alloc(64, ((sizeof(uint16_t) * I * NR + 63) / 64) * 64); /* [NR, I] */
    float *row = inplace ? NULL : aligned_alloc(64, ((sizeof(float) * I + 63) / 64) * 64);
    if (!xb || (!inplace && (!P || !row))) {
        free(xb), free(P), free(row);
        return -2;
    }
    to_bf16(x, xb, M * I);
    for (int64_t o0 = o_lo; o0 < o_hi; o0 += NR) {
        const int rows = o_hi - o0 < NR ? (int)(o_hi - o0) : NR;
        for (int j = 0; j < rows && !inplace; j++) skv_widen_row_bf16(w, o0 + j, row, P + j * I);
        panel_times_rows(xb, M, I, inplace ? (const uint16_t *)w->q + o0 * I : P, y + o0, ldy, rows);
    }
    free(xb), free(P), free(row);
    return 0;
}
#else
int skv_gemm_bf16_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                       int64_t o_hi) {
    (void)w, (void)x, (void)M, (void)y, (void)ldy, (void)o_lo, (void)o_hi;
    return -1; /* this compiler cannot emit the instructions: the caller uses skv_gemm */
}

void skv_widen_row_bf16(const skv_weight *w, int64_t o, float *row, uint16_t *dst) { /* the portable two steps */
    skv_dequant_row_bf16(w, o, row, dst);
}
#endif
