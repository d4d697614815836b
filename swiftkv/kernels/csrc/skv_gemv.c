/* Matmuls of a few rows (decode) over held weights (skv_weight.h). Decode is memory bound: each weight
 * is read once per step in its held form (0.625, 1.25, 2 or 4 bytes) and widened in registers.
 *
 * Blocked kinds: y[m, o] = sum_b scale[o, b] * (sum_j x[m, 32 b + j] * q[o, 32 b + j])
 *                          + sum_b offset[o, b] * xsum[m, b],   xsum[m, b] = sum_j x[m, 32 b + j].
 * With one or two input rows, each row keeps ACC independent accumulator chains (FMA latency, not
 * bandwidth, would bound a single chain). Rows of W split across the team's slots (skv_gemv_part). */
#include <stdlib.h>

#include "skv_gemv.h"
#include "skv_vec.h"

#define ACC(M) ((M) <= 2 ? 4 : 1)

/* ROWS(M) with M a compile-time constant 1..8, so each row loop keeps its accumulators in registers */
#define FOR_EACH_M(ROWS)                                                                                  \
    switch (M) {                                                                                          \
        case 1: ROWS(1) break;                                                                            \
        case 2: ROWS(2) break;                                                                            \
        case 3: ROWS(3) break;                                                                            \
        case 4: ROWS(4) break;                                                                            \
        case 5: ROWS(5) break;                                                                            \
        case 6: ROWS(6) break;                                                                            \
        case 7: ROWS(7) break;                                                                            \
        default: ROWS(8) break;                                                                           \
    }

/* the 32 codes of block b of a blocked row, as four vectors of eight */
static inline __attribute__((always_inline)) void codes(const skv_weight *w, const uint8_t *row, int64_t b,
                                                        __m256 c[4]) {
    if (w->kind == SKV_Q4) {
        skv_load_u4x32(row + 16 * b, c);
    } else {
        for (int i = 0; i < 4; i++) c[i] = skv_load_u8x8(row + 32 * b + 8 * i);
    }
}

static inline __attribute__((always_inline)) float scale_at(const skv_weight *w, int64_t i) {
    return w->kind == SKV_Q4 ? skv_f16(((const uint16_t *)w->scale)[i]) : ((const float *)w->scale)[i];
}

/* sum_b offset[o, b] * xs[b] */
static inline float offset_term(const skv_weight *w, int64_t o, int64_t nb, const float *xs) {
    __m256 acc = _mm256_setzero_ps();
    float r = 0.f;
    int64_t b = 0;
    if (w->kind == SKV_Q4) {
        const uint16_t *off = (const uint16_t *)w->offset + o * nb;
        for (; b + 8 <= nb; b += 8)
            acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(off + b))), _mm256_loadu_ps(xs + b), acc);
        for (; b < nb; b++) r += skv_f16(off[b]) * xs[b];
    } else {
        const float *off = (const float *)w->offset + o * nb;
        for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(off + b), _mm256_loadu_ps(xs + b), acc);
        for (; b < nb; b++) r += off[b] * xs[b];
    }
    return r + skv_hsum(acc);
}

/* output o of a blocked weight for M (compile-time) input rows */
static inline __attribute__((always_inline)) void blocked_row(const skv_weight *w, const float *x, const float *xsum,
                                                              int64_t o, float *y, int64_t ldy, const int M) {
    const int64_t I = w->in_features, nb = I / 32, A = ACC(M);
    const uint8_t *row = (const uint8_t *)w->q + (w->kind == SKV_Q4 ? o * I / 2 : o * I);
    __m256 acc[8][4];
    for (int m = 0; m < M; m++)
        for (int a = 0; a < A; a++) acc[m][a] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + A <= nb; b += A)
        for (int a = 0; a < A; a++) {
            __m256 c[4];
            codes(w, row, b + a, c);
            const __m256 s = _mm256_set1_ps(scale_at(w, o * nb + b + a));
            for (int m = 0; m < M; m++) {
                const float *xb = x + m * I + 32 * (b + a);
                __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), c[0]);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), c[1], t);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), c[2], t);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), c[3], t);
                acc[m][a] = _mm256_fmadd_ps(s, t, acc[m][a]);
            }
        }
    for (; b < nb; b++) {
        __m256 c[4];
        codes(w, row, b, c);
        const __m256 s = _mm256_set1_ps(scale_at(w, o * nb + b));
        for (int m = 0; m < M; m++) {
            const float *xb = x + m * I + 32 * b;
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), c[0]);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), c[1], t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), c[2], t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), c[3], t);
            acc[m][0] = _mm256_fmadd_ps(s, t, acc[m][0]);
        }
    }
    for (int m = 0; m < M; m++) {
        for (int a = 1; a < A; a++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][a]);
        y[m * ldy + o] = skv_hsum(acc[m][0]) + offset_term(w, o, nb, xsum + m * nb);
    }
}

/* output o of a dense (bf16 or fp32) weight for M (compile-time) input rows */
static inline __attribute__((always_inline)) void dense_row(const skv_weight *w, const float *x, int64_t o, float *y,
                                                            int64_t ldy, const int M, const int bf16) {
    const int64_t I = w->in_features, A = ACC(M);
    const uint16_t *rb = (const uint16_t *)w->q + o * I;
    const float *rf = (const float *)w->q + o * I;
    __m256 acc[8][4];
    for (int m = 0; m < M; m++)
        for (int a = 0; a < A; a++) acc[m][a] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * A <= I; k += 8 * A)
        for (int a = 0; a < A; a++) {
            const __m256 wv = bf16 ? skv_load_bf16x8(rb + k + 8 * a) : _mm256_loadu_ps(rf + k + 8 * a);
            for (int m = 0; m < M; m++) acc[m][a] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * I + k + 8 * a), wv, acc[m][a]);
        }
    for (; k < I; k += 8) {
        const __m256 wv = bf16 ? skv_load_bf16x8(rb + k) : _mm256_loadu_ps(rf + k);
        for (int m = 0; m < M; m++) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * I + k), wv, acc[m][0]);
    }
    for (int m = 0; m < M; m++) {
        for (int a = 1; a < A; a++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][a]);
        y[m * ldy + o] = skv_hsum(acc[m][0]);
    }
}

#define BLOCKED_ROWS(MM) for (int64_t o = o_lo; o < o_hi; o++) blocked_row(w, x, xsum, o, y, ldy, MM);
#define BF16_ROWS(MM) for (int64_t o = o_lo; o < o_hi; o++) dense_row(w, x, o, y, ldy, MM, 1);
#define F32_ROWS(MM) for (int64_t o = o_lo; o < o_hi; o++) dense_row(w, x, o, y, ldy, MM, 0);

int skv_gemv_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo, int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features;
    if (skv_weight_check(w) || M < 1 || M > SKV_GEMV_MAX_ROWS || ldy < O) return -1;
    if (o_lo >= o_hi) return 0;
    if (w->kind == SKV_BF16) {
        FOR_EACH_M(BF16_ROWS)
    } else if (w->kind == SKV_F32) {
        FOR_EACH_M(F32_ROWS)
    } else {
        const int64_t nb = I / 32;
        float *xsum = malloc(sizeof(float) * M * nb); /* [M, blocks]: the offset term's input (each slot its own) */
        if (!xsum) return -2;
        for (int64_t i = 0; i < M * nb; i++) {
            __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x + 32 * i), _mm256_loadu_ps(x + 32 * i + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(x + 32 * i + 16), _mm256_loadu_ps(x + 32 * i + 24)));
            xsum[i] = skv_hsum(s);
        }
        FOR_EACH_M(BLOCKED_ROWS)
        free(xsum);
    }
    return 0;
}
