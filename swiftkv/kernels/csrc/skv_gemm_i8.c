/* The panel GEMM of the blocked kinds (SKV_Q4, SKV_Q8) with AVX512-VNNI integer dot products: skv_gemv_i8.c's
 * arithmetic -- each block of 32 activations quantized to int8 with its own scale (d = max|x| / 127, nearest even),
 *   y[m, o] = sum_b scale[o, b] d[m, b] (sum_j q[o, 32 b + j] xq[m, 32 b + j]) + sum_b offset[o, b] xsum[m, b]
 * with the code x activation sums exact in int32 and xsum the exact fp32 block sums -- for batches of rows
 * (batched decode, prompts). Per panel of 16 output rows the codes are laid out once, per call, in the order
 * vpdpbusd reads them as a matrix operand: per block, 8 vectors of [16 rows x 4 consecutive codes]; each input
 * row's 4 activations are broadcast against it, so one instruction makes 64 products into the 16 rows' int32 sums
 * and a block's 32 codes take 8 of them before one conversion and scaling (the bf16 panel GEMM: 16 vdpbf16ps per
 * 512 products, at the same rate per instruction on Zen 4). The held codes stay as they are (no second copy).
 * Compiled for these instructions through function attributes only: call it only where the CPU has them. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "skv_dequant.h"
#include "skv_gemm.h"
#include "skv_team.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
#define I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
/* input rows per micro-tile: int32 and fp32 sums of 8 rows x 16 outputs = 16 registers (Zen 4, the default model's
 * shapes: 6 rows x 2 panels, 4 x 3, 7 x 2, 10 x 1, 12 x 1 measured no better) */
#define MR 8
#define ROWS_CHUNK 192 /* input rows every panel passes over before the next rows (their int8 activations in L2) */

/* bf16 <-> fp32 with AVX-512F integer ops only (a CPU with AVX512-VNNI may lack AVX512-BF16): widening is exact,
 * narrowing rounds to nearest even (finite values) */
I8_TARGET static inline __m512 widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

I8_TARGET static inline __m256i narrow_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* rows' activations (fp32, or bf16 where `bf16`), block by block: xq [rows, I] int8, d and xsum [rows, nb] */
I8_TARGET static void quantize(const void *x, int bf16, int64_t rows, int64_t I, int8_t *xq, float *d, float *xsum) {
    const int64_t nb = I / 32;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t b = 0; b < nb; b++) {
            __m512 lo, hi;
            if (bf16) {
                const uint16_t *v = (const uint16_t *)x + m * I + 32 * b;
                lo = widen_bf16(_mm256_loadu_si256((const __m256i *)v));
                hi = widen_bf16(_mm256_loadu_si256((const __m256i *)(v + 16)));
            } else {
                const float *v = (const float *)x + m * I + 32 * b;
                lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const float dd = amax / 127.f, inv = dd > 0.f ? 1.f / dd : 0.f;
            const __m512 iv = _mm512_set1_ps(inv);
            d[m * nb + b] = dd;
            xsum[m * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            /* nearest even (the default rounding), as skv_gemv_i8 */
            int8_t *q = xq + m * I + 32 * b;
            _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, iv))));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, iv))));
        }
}

/* 32 codes of row o, block b, in order (unsigned bytes); zeros past the panel's rows */
I8_TARGET static inline __m256i block_codes(const skv_weight *w, int64_t o, int64_t b, int valid) {
    if (!valid) return _mm256_setzero_si256();
    const int64_t I = w->in_features;
    if (w->kind == SKV_Q8) return _mm256_loadu_si256((const __m256i *)((const uint8_t *)w->q + o * I + 32 * b));
    /* SKV_Q4, byte j: code j (low nibble), code 16 + j (high nibble) */
    const __m128i v = _mm_loadu_si128((const __m128i *)((const uint8_t *)w->q + o * I / 2 + 16 * b));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, m4)),
                                   _mm_and_si128(_mm_srli_epi16(v, 4), m4), 1);
}

/* Panel of rows o0 .. o0 + n - 1 (n <= 16): codes [nb][8][16 rows x 4 bytes], sf [nb][scale x 16, offset x 16] */
I8_TARGET static void pack_panel(const skv_weight *w, int64_t o0, int n, uint8_t *codes, float *sf) {
    const int64_t nb = w->in_features / 32;
    const __m512i lo_lanes = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i hi_lanes = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int64_t b = 0; b < nb; b++) {
        __m512i z[8], t[8], u[8];
        for (int i = 0; i < 8; i++) /* rows i (low 256 bits) and i + 8 (high): 8 dwords of 4 codes each */
            z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(block_codes(w, o0 + i, b, i < n)),
                                      block_codes(w, o0 + i + 8, b, i + 8 < n), 1);
        /* an 8 x 8 dword transpose in each 256-bit half: then vector k holds dword k of rows 0..15 */
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm512_unpacklo_epi32(z[i], z[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(z[i], z[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);     /* dwords 0, 4 of rows i..i+3 */
            u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]); /* 1, 5 */
            u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]); /* 2, 6 */
            u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]); /* 3, 7 */
        }
        uint8_t *dst = codes + b * 512;
        for (int k = 0; k < 4; k++) {
            _mm512_store_si512(dst + k * 64, _mm512_permutex2var_epi64(u[k], lo_lanes, u[k + 4]));
            _mm512_store_si512(dst + (k + 4) * 64, _mm512_permutex2var_epi64(u[k], hi_lanes, u[k + 4]));
        }
        float *s = sf + b * 32;
        for (int c = 0; c < 16; c++) {
            const int64_t at = (o0 + c) * nb + b;
            const int in = c < n;
            if (w->kind == SKV_Q4) {
                s[c] = in ? skv_f16(((const uint16_t *)w->scale)[at]) : 0.f;
                s[16 + c] = in ? skv_f16(((const uint16_t *)w->offset)[at]) : 0.f;
            } else {
                s[c] = in ? ((const float *)w->scale)[at] : 0.f;
                s[16 + c] = in ? ((const float *)w->offset)[at] : 0.f;
            }
        }
    }
}

/* y[r, 0:16] (+ bias[0:16] where given; the columns in `keep`; fp32, or bf16 where `y_bf16`) for R input rows
 * against one packed panel */
I8_TARGET static inline __attribute__((always_inline)) void tile(const int8_t *xq, const float *d, const float *xs,
                                                                 int64_t I, const uint8_t *P, const float *SF,
                                                                 void *y, int64_t ldy, int y_bf16, const float *bias,
                                                                 const int R, __mmask16 keep) {
    const int64_t nb = I / 32;
    __m512 acc[MR];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i s[MR];
        for (int r = 0; r < R; r++) s[r] = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) { /* codes 4k .. 4k + 3 of the block: 16 rows x 4 bytes against 4 activations */
            const __m512i wv = _mm512_load_si512(P + b * 512 + k * 64);
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, xq + r * I + 32 * b + 4 * k, 4);
                s[r] = _mm512_dpbusd_epi32(s[r], wv, _mm512_set1_epi32(four));
            }
        }
        const __m512 sv = _mm512_load_ps(SF + b * 32), ov = _mm512_load_ps(SF + b * 32 + 16);
        for (int r = 0; r < R; r++) { /* + scale d (sum of code x activation) + offset xsum */
            const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(d[r * nb + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xs[r * nb + b]), acc[r]);
        }
    }
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
        if (y_bf16)
            _mm256_mask_storeu_epi16((uint16_t *)y + r * ldy, keep, narrow_bf16(_mm512_add_ps(acc[r], bv)));
        else
            _mm512_mask_storeu_ps((float *)y + r * ldy, keep, _mm512_add_ps(acc[r], bv));
    }
}

#define TILE(R) tile(A->xq + m * I, A->d + m * nb, A->xsum + m * nb, I, Pp, SFp, ym, ldy, y_bf16, bp, R, keep)

typedef struct { /* quantized activations of M rows (quantize) */
    int8_t *xq;
    float *d, *xsum;
} Acts;

static void acts_free(Acts *a) { free(a->xq), free(a->d), free(a->xsum); }

static int acts_alloc(Acts *a, int64_t M, int64_t I) {
    a->xq = malloc(M * I);
    a->d = malloc(sizeof(float) * M * (I / 32));
    a->xsum = malloc(sizeof(float) * M * (I / 32));
    return a->xq && a->d && a->xsum ? 0 : -2;
}

/* y[:, o_lo:o_hi] from quantized rows: the slot's panels packed once, then rows ROWS_CHUNK at a time (their
 * activations stay in L2 while every panel passes over them), each panel against tiles of <= MR rows */
I8_TARGET static int rows_times_panels(const skv_weight *w, const Acts *A, int64_t M, void *y, int64_t ldy,
                                       int y_bf16, const float *bias, int64_t o_lo, int64_t o_hi) {
    const int64_t I = w->in_features, nb = I / 32, panels = (o_hi - o_lo + 15) / 16;
    if (o_lo >= o_hi) return 0;
    uint8_t *P = aligned_alloc(64, panels * nb * 512);
    float *SF = aligned_alloc(64, sizeof(float) * panels * nb * 32);
    if (!P || !SF) {
        free(P), free(SF);
        return -2;
    }
    for (int64_t p = 0; p < panels; p++) {
        const int64_t o0 = o_lo + 16 * p;
        pack_panel(w, o0, o_hi - o0 < 16 ? (int)(o_hi - o0) : 16, P + p * nb * 512, SF + p * nb * 32);
    }
    const size_t elt = y_bf16 ? 2 : 4;
    for (int64_t m0 = 0; m0 < M; m0 += ROWS_CHUNK) {
        const int64_t rows = M - m0 < ROWS_CHUNK ? M - m0 : ROWS_CHUNK, tiles = (rows + MR - 1) / MR;
        for (int64_t p = 0; p < panels; p++) {
            const int64_t n = o_hi - (o_lo + 16 * p);
            const __mmask16 keep = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
            const uint8_t *Pp = P + p * nb * 512;
            const float *SFp = SF + p * nb * 32, *bp = bias ? bias + o_lo + 16 * p : NULL;
            for (int64_t t = 0, m = m0, R; t < tiles; t++, m += R) { /* rows shared out evenly, as skv_gemm_bf16 */
                R = rows / tiles + (t < rows % tiles);
                void *ym = (char *)y + ((m * ldy + o_lo + 16 * p) * elt);
                switch (R) {
                    case 1: TILE(1); break;
                    case 2: TILE(2); break;
                    case 3: TILE(3); break;
                    case 4: TILE(4); break;
                    case 5: TILE(5); break;
                    case 6: TILE(6); break;
                    case 7: TILE(7); break;
                    default: TILE(MR); break;
                }
            }
        }
    }
    free(P), free(SF);
    return 0;
}

I8_TARGET int skv_gemm_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                               int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features;
    if (skv_weight_check(w) || (w->kind != SKV_Q4 && w->kind != SKV_Q8) || M < 1 || ldy < O) return -1;
    if (o_lo >= o_hi) return 0;
    Acts A;
    int rc = acts_alloc(&A, M, I);
    if (!rc) {
        quantize(x, 0, M, I, A.xq, A.d, A.xsum);
        rc = rows_times_panels(w, &A, M, y, ldy, 0, NULL, o_lo, o_hi);
    }
    acts_free(&A);
    return rc;
}

I8_TARGET int skv_gemm_i8(const skv_weight *w, const void *x, int x_bf16, int64_t M, void *y, int y_bf16, int64_t ldy,
                          int nthreads) {
    const int64_t I = w->in_features, O = w->out_features, nb = I / 32;
    if (skv_weight_check(w) || (w->kind != SKV_Q4 && w->kind != SKV_Q8) || M < 1 || ldy < O) return -1;
    Acts A;
    int rc = acts_alloc(&A, M, I);
    if (rc) {
        acts_free(&A);
        return rc;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const skv_team t = {omp_get_thread_num(), omp_get_num_threads(), NULL};
        if (t.ith == 0) SKV_COUNT_REGION();
        int64_t lo, hi;
        skv_team_range(&t, M, 1, &lo, &hi); /* the rows quantized once, shared out */
        if (lo < hi)
            quantize((const char *)x + lo * I * (x_bf16 ? 2 : 4), x_bf16, hi - lo, I, A.xq + lo * I, A.d + lo * nb,
                     A.xsum + lo * nb);
#pragma omp barrier
        skv_team_range(&t, O, 16, &lo, &hi);
        const int r = rows_times_panels(w, &A, M, y, ldy, y_bf16, w->bias, lo, hi);
        if (r) {
#pragma omp atomic write
            rc = r;
        }
    }
    acts_free(&A);
    return rc;
}
#else
int skv_gemm_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                     int64_t o_hi) {
    (void)w, (void)x, (void)M, (void)y, (void)ldy, (void)o_lo, (void)o_hi;
    return -1; /* this compiler cannot emit the instructions: the caller uses the other GEMMs */
}

int skv_gemm_i8(const skv_weight *w, const void *x, int x_bf16, int64_t M, void *y, int y_bf16, int64_t ldy,
                int nthreads) {
    (void)w, (void)x, (void)x_bf16, (void)M, (void)y, (void)y_bf16, (void)ldy, (void)nthreads;
    return -1;
}
#endif
