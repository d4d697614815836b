/* The decode gemv of the blocked kinds (SKV_Q4, SKV_Q8) with AVX512-VNNI integer dot products, for a model computing
 * in bf16 on a CPU with avx512_vnni (Zen 4, Cascade Lake and later Xeons): each block of 32 activations is quantized to
 * int8 with its own scale (d = max|x| / 127, round to nearest even: llama.cpp's Q8 activations), and
 *   y[m, o] = sum_b scale[o, b] d[m, b] (sum_j q[o, 32 b + j] xq[m, 32 b + j]) + sum_b offset[o, b] xsum[m, b]
 * with the dot products exact in int32 (vpdpbusd: 64 unsigned codes times 64 signed activations per instruction)
 * and xsum the exact fp32 block sums. The widened-fp32 gemv (skv_gemv.c) spends ~14 instructions per 32 weights
 * unpacking codes to floats; this one ~4. Compiled for these instructions through function attributes only: call
 * it only where the CPU has them (the Python side checks its flags). */
#include <math.h>
#include <stdlib.h>

#include "skv_gemv.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
#include <immintrin.h>
#define I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))

/* Activations of M rows in the order the codes are read, two blocks (64 values) per 512-bit vector:
 *   q8: [x_b (32), x_b+1 (32)]                       -- the codes' own order
 *   q4: [x_b[0:16], x_b+1[0:16], x_b[16:32], x_b+1[16:32]] -- low nibbles of both blocks, then high nibbles
 * with each int32 lane's block scale d in the same lane order (dv: 16 floats per pair), and the fp32 block sums. */
typedef struct {
    int8_t *xq;   /* [M, pairs, 64] */
    float *dv;    /* [M, pairs, 16] */
    float *xsum;  /* [M, 2 pairs] */
    int64_t pairs;
} Quantized;

I8_TARGET static int quantize(const float *x, int64_t M, int64_t I, int q4, Quantized *out) {
    const int64_t nb = I / 32, pairs = (nb + 1) / 2;
    out->pairs = pairs;
    out->xq = aligned_alloc(64, M * pairs * 64);
    out->dv = aligned_alloc(64, sizeof(float) * M * pairs * 16);
    out->xsum = malloc(sizeof(float) * M * 2 * pairs);
    if (!out->xq || !out->dv || !out->xsum) return -2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t p = 0; p < pairs; p++) {
            int8_t *q = out->xq + (m * pairs + p) * 64;
            float *dv = out->dv + (m * pairs + p) * 16;
            for (int h = 0; h < 2; h++) { /* block 2p + h (a missing last block: zeros) */
                const int64_t b = 2 * p + h;
                float v[32] = {0}, amax = 0.f, sum = 0.f;
                if (b < nb)
                    for (int j = 0; j < 32; j++) {
                        v[j] = x[m * I + 32 * b + j];
                        amax = fmaxf(amax, fabsf(v[j]));
                        sum += v[j];
                    }
                const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
                out->xsum[m * 2 * pairs + b] = sum;
                for (int j = 0; j < 32; j++) {
                    const int8_t c = (int8_t)nearbyintf(v[j] * inv);
                    /* q8: block h fills bytes [32 h, 32 h + 32); q4: j < 16 to [16 h + j], else [32 + 16 h + j - 16] */
                    q[q4 ? (j < 16 ? 16 * h + j : 32 + 16 * h + j - 16) : 32 * h + j] = c;
                }
                for (int l = 0; l < 8; l++) dv[q4 ? (l < 4 ? 4 * h + l : 8 + 4 * h + l - 4) : 8 * h + l] = d;
            }
        }
    return 0;
}

/* the two blocks' weight scales (zero for a missing block) in the lane order of `dv` */
I8_TARGET static inline __m512 pair_scales(const skv_weight *w, int64_t i, int two, int q4) {
    __m128 s;
    if (q4) {
        const uint16_t *h = (const uint16_t *)w->scale + i;
        s = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(h[0] | (uint32_t)(two ? h[1] : 0) << 16)));
    } else {
        const float *f = (const float *)w->scale + i;
        s = _mm_setr_ps(f[0], two ? f[1] : 0.f, 0.f, 0.f);
    }
    const __m512i q4_lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512i q8_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(q4 ? q4_lanes : q8_lanes, _mm512_castps128_ps512(s));
}

/* sum_b offset[o, b] * xsum[b] over the row's nb blocks, 16 at a time */
I8_TARGET static inline float offset_term(const skv_weight *w, int64_t o, int64_t nb, const float *xs, int q4) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 k = nb - b >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
        const __m512 off = q4 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, (const uint16_t *)w->offset + o * nb + b))
                              : _mm512_maskz_loadu_ps(k, (const float *)w->offset + o * nb + b);
        acc = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(k, xs + b), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* 64 codes of blocks 2p, 2p + 1 of row `row`, as unsigned bytes in the activations' order */
I8_TARGET static inline __m512i pair_codes(const uint8_t *row, int64_t p, int two, int q4) {
    if (q4) {
        const __m256i v = _mm256_maskz_loadu_epi8(two ? 0xFFFFFFFFu : 0xFFFFu, row + 32 * p);
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    return _mm512_maskz_loadu_epi8(two ? ~0ULL : 0xFFFFFFFFULL, row + 64 * p);
}

#define ROWS(MM)                                                                                          \
    for (int64_t o = o_lo; o < o_hi; o++) {                                                               \
        const uint8_t *row = (const uint8_t *)w->q + (q4 ? o * I / 2 : o * I);                            \
        __m512 acc[MM];                                                                                   \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();                                        \
        for (int64_t p = 0; p < X.pairs; p++) {                                                           \
            const int two = 2 * p + 1 < nb;                                                               \
            const __m512i c = pair_codes(row, p, two, q4);                                                \
            const __m512 s = pair_scales(w, o * nb + 2 * p, two, q4);                                     \
            for (int m = 0; m < MM; m++) {                                                                \
                const int64_t at = m * X.pairs + p;                                                       \
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c,                        \
                                                        _mm512_load_si512(X.xq + at * 64));               \
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_load_ps(X.dv + at * 16)), \
                                         acc[m]);                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int m = 0; m < MM; m++)                                                                      \
            y[m * ldy + o] = _mm512_reduce_add_ps(acc[m]) + offset_term(w, o, nb, X.xsum + m * 2 * X.pairs, q4); \
    }

I8_TARGET int skv_gemv_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                               int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features, nb = I / 32;
    if (skv_weight_check(w) || (w->kind != SKV_Q4 && w->kind != SKV_Q8) || M < 1 || M > 4 || ldy < O) return -1;
    if (o_lo >= o_hi) return 0;
    const int q4 = w->kind == SKV_Q4;
    Quantized X = {0};
    int rc = quantize(x, M, I, q4, &X);
    if (!rc) switch (M) {
            case 1: ROWS(1) break;
            case 2: ROWS(2) break;
            case 3: ROWS(3) break;
            default: ROWS(4) break;
        }
    free(X.xq), free(X.dv), free(X.xsum);
    return rc;
}
#else
int skv_gemv_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                     int64_t o_hi) {
    (void)w, (void)x, (void)M, (void)y, (void)ldy, (void)o_lo, (void)o_hi;
    return -1; /* this compiler cannot emit the instructions: the caller uses skv_gemv_part */
}
#endif
