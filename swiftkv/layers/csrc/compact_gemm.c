/* Matmuls of a few dozen rows (batched decode) over exact compact weights (see compact_weights.py):
 * y[M, O] = x[M, I] @ W^T. Per panel of 8 output rows the weights are dequantized once (vectorized)
 * into an fp32 buffer (a thread's own, L1/L2 resident); a 3 x 4 register tile (12 accumulators; 4 panel
 * and 3 input loads per 12 FMAs, horizontal sums once per tile) then runs over every input row.
 * Weights are read from memory in their compact form once per call (1.25 or 2 bytes each), so at
 * batch 8-64 the work is the FMAs, not the bytes. AVX2 + FMA; panels split across OpenMP threads. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

#define NR 8 /* output rows per panel (dequantized, row-major: 8 x I floats, L1/L2 resident) */
#define MR 3 /* input rows per micro-tile */
#define OR 4 /* output rows per micro-tile: MR x OR = 12 accumulators */

/* y[r, c] (row stride O) = x[r, :] . P[c, :] for R input rows and C panel rows, 8 inputs per step */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t I, const float *P, float *y,
                                                       int64_t O, const int R, const int C) {
    __m256 acc[MR][OR];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < I; k += 8) {
        __m256 w[OR];
        for (int c = 0; c < C; c++) w[c] = _mm256_loadu_ps(P + c * I + k);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * I + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) y[r * O + c] = hsum(acc[r][c]);
}

#define TILE_C(R, C)                                                                                      \
    switch (C) {                                                                                          \
        case 1: tile(xm, I, Pc, ym, O, R, 1); break;                                                      \
        case 2: tile(xm, I, Pc, ym, O, R, 2); break;                                                      \
        case 3: tile(xm, I, Pc, ym, O, R, 3); break;                                                      \
        default: tile(xm, I, Pc, ym, O, R, 4); break;                                                     \
    }

/* every row of x against the `rows` panel rows */
static void panel_times_rows(const float *x, int64_t M, int64_t I, const float *P, float *y, int64_t O, int rows) {
    for (int c0 = 0; c0 < rows; c0 += OR) {
        const int C = rows - c0 < OR ? rows - c0 : OR;
        const float *Pc = P + c0 * I;
        for (int64_t m = 0; m < M; m += MR) {
            const float *xm = x + m * I;
            float *ym = y + m * O + c0;
            const int64_t R = M - m < MR ? M - m : MR;
            if (R == 3) { TILE_C(3, C) } else if (R == 2) { TILE_C(2, C) } else { TILE_C(1, C) }
        }
    }
}

/* panel rows j < rows: P[j * I + k] = W[o0 + j, k], 8 weights per instruction */
static void dequant_blocked(const uint8_t *q, const float *scale, const float *offset, int64_t I, int64_t o0,
                            int rows, float *P) {
    const int64_t nb = I / 32;
    for (int j = 0; j < rows; j++) {
        const uint8_t *qr = q + (o0 + j) * I;
        const float *s = scale + (o0 + j) * nb, *off = offset + (o0 + j) * nb;
        for (int64_t b = 0; b < nb; b++) {
            const __m256 sb = _mm256_set1_ps(s[b]), ob = _mm256_set1_ps(off[b]);
            for (int i = 0; i < 32; i += 8) {  /* scale * q is exact in fp32, so the FMA equals mul + add */
                const __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + 32 * b + i))));
                _mm256_storeu_ps(P + j * I + 32 * b + i, _mm256_fmadd_ps(sb, qv, ob));
            }
        }
    }
}

static void dequant_bf16(const uint16_t *w, int64_t I, int64_t o0, int rows, float *P) {
    for (int j = 0; j < rows; j++)
        for (int64_t k = 0; k < I; k += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(w + (o0 + j) * I + k));
            _mm256_storeu_ps(P + j * I + k, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
        }
}

/* kind 0: blocked8 (q [O, I] uint8, scale/offset [O, I/32]); kind 1: bf16 (q [O, I] bf16 bits).
 * x [M, I], y [M, O]. Returns 0, -1 for bad shapes, -2 when out of memory. */
int compact_gemm(int kind, const float *x, int64_t M, int64_t I, const void *q, const float *scale,
                 const float *offset, float *y, int64_t O, int nthreads) {
    if (M < 1 || I < 8 || I % 8 || (kind == 0 && I % 32) || kind < 0 || kind > 1) return -1;
    const int64_t panels = (O + NR - 1) / NR;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *P = aligned_alloc(64, ((sizeof(float) * I * NR + 63) / 64) * 64); /* [NR, I] */
        if (!P) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (!P) continue;
            const int64_t o0 = p * NR;
            const int rows = O - o0 < NR ? (int)(O - o0) : NR;
            if (kind == 0)
                dequant_blocked((const uint8_t *)q, scale, offset, I, o0, rows, P);
            else
                dequant_bf16((const uint16_t *)q, I, o0, rows, P);
            panel_times_rows(x, M, I, P, y + o0, O, rows);
        }
        free(P);
    }
    return failed ? -2 : 0;
}
