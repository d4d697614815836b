/* Matmuls of a few rows (decode) over weights stored exactly in fewer bytes (see compact_weights.py).
 *
 * blocked8: y[M, O] = x[M, I] @ W^T for weights stored as 8-bit codes in blocks of 32 inputs:
 *   W[o, 32 b + j] = scale[o, b] * q[o, 32 b + j] + offset[o, b]
 * (exactly how GGUF's Q4_1 / Q8_0 weights dequantize), computed in fp32 as
 *   y[m, o] = sum_b scale[o, b] * (sum_j x[m, 32 b + j] * q[o, 32 b + j]) + sum_b offset[o, b] * xsum[m, b].
 * Decode is memory bound: reading 1.25 bytes per weight instead of 4 is the whole point.
 * AVX2 + FMA; rows of W split across the OpenMP threads (torch's own libgomp once torch is loaded). */
#include <immintrin.h>
#include <stdint.h>

#include "vec_math.h"

static inline __m256 q8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

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

/* one output row o for M (compile-time) input rows */
static inline __attribute__((always_inline)) void row(const float *x, const float *xsum, int64_t I, int64_t nb,
        const uint8_t *q, const float *scale, const float *offset, float *y, int64_t O, int64_t o, const int M) {
    __m256 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + 32 * b;
        __m256 q0 = q8(qb), q1 = q8(qb + 8), q2 = q8(qb + 16), q3 = q8(qb + 24);
        __m256 s = _mm256_set1_ps(scale[b]);
        for (int m = 0; m < M; m++) {
            const float *xb = x + m * I + 32 * b;
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xb), q0);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), q1, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), q2, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), q3, t);
            acc[m] = _mm256_fmadd_ps(s, t, acc[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        float r = hsum(acc[m]);
        const float *xs = xsum + m * nb;
        for (int64_t b = 0; b < nb; b++) r += offset[b] * xs[b];
        y[m * O + o] = r;
    }
}

#define ROWS(MM)                                                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t o = 0; o < O; o++)    \
        row(x, xsum, I, nb, q + o * I, scale + o * nb, offset + o * nb, y, O, o, MM);

/* x [M, I], xsum [M, I/32], q [O, I], scale/offset [O, I/32], y [M, O]; 1 <= M <= 8, I % 32 == 0 */
int blocked_gemv(const float *x, const float *xsum, int64_t M, int64_t I, const uint8_t *q, const float *scale,
                 const float *offset, float *y, int64_t O, int nthreads) {
    const int64_t nb = I / 32;
    if (M < 1 || M > 8 || I % 32) return -1;
    FOR_EACH_M(ROWS)
    return 0;
}

/* ---- bf16 weights (exact for checkpoints stored in bf16): y[m, o] = sum_k x[m, k] * float(W[o, k]) ---- */

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __attribute__((always_inline)) void bf16_row(const float *x, int64_t I, const uint16_t *w, float *y,
                                                          int64_t O, int64_t o, const int M) {
    __m256 acc[8];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < I; k += 8) {
        __m256 wv = bf16x8(w + k);
        for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * I + k), wv, acc[m]);
    }
    for (int m = 0; m < M; m++) y[m * O + o] = hsum(acc[m]);
}

#define BF16_ROWS(MM)                                                                                     \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)") for (int64_t o = 0; o < O; o++)    \
        bf16_row(x, I, w + o * I, y, O, o, MM);

/* x [M, I], w [O, I] (bf16 bits), y [M, O]; 1 <= M <= 8, I % 8 == 0 */
int bf16_gemv(const float *x, int64_t M, int64_t I, const uint16_t *w, float *y, int64_t O, int nthreads) {
    if (M < 1 || M > 8 || I % 8) return -1;
    FOR_EACH_M(BF16_ROWS)
    return 0;
}
