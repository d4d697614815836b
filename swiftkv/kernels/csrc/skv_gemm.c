/* Matmuls of a few dozen rows (batched decode) over held weights (skv_weight.h): y[M, O] = x[M, I] @ W^T.
 * Per panel of 8 output rows the weights are widened once (skv_dequant.h) into an fp32 buffer (a thread's
 * own, L1/L2 resident; fp32 weights are read in place); a 3 x 4 register tile (12 accumulators; 4 panel
 * and 3 input loads per 12 FMAs, horizontal sums once per tile) then runs over every input row.
 * Weights are read from memory in their held form once per call, so at batch 8-64 the work is the
 * FMAs, not the bytes. AVX2 + FMA; panels split across the team's slots (skv_gemm_part). */
#include <stdlib.h>

#include "skv_dequant.h"
#include "skv_gemm.h"
#include "skv_vec.h"

#define NR SKV_GEMM_PANEL /* output rows per panel (widened, row-major: 8 x I floats, L1/L2 resident) */
#define MR 3 /* input rows per micro-tile */
#define OR 4 /* output rows per micro-tile: MR x OR = 12 accumulators */

/* y[r, c] (rows ldy apart) = x[r, :] . P[c, :] for R input rows and C panel rows, 8 inputs per step */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t I, const float *P, float *y,
                                                       int64_t ldy, const int R, const int C) {
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
        for (int c = 0; c < C; c++) y[r * ldy + c] = skv_hsum(acc[r][c]);
}

#define TILE_C(R, C)                                                                                      \
    switch (C) {                                                                                          \
        case 1: tile(xm, I, Pc, ym, ldy, R, 1); break; \
        case 2: tile(xm, I, Pc, ym, ldy, R, 2); break; \
        case 3: tile(xm, I, Pc, ym, ldy, R, 3); break; \
        default: tile(xm, I, Pc, ym, ldy, R, 4); break; \
    }

/* every row of x against the `rows` panel rows */
static void panel_times_rows(const float *x, int64_t M, int64_t I, const float *P, float *y, int64_t ldy, int rows) {
    for (int c0 = 0; c0 < rows; c0 += OR) {
        const int C = rows - c0 < OR ? rows - c0 : OR;
        const float *Pc = P + c0 * I;
        for (int64_t m = 0; m < M; m += MR) {
            const float *xm = x + m * I;
            float *ym = y + m * ldy + c0;
            const int64_t R = M - m < MR ? M - m : MR;
            if (R == 3) { TILE_C(3, C) } else if (R == 2) { TILE_C(2, C) } else { TILE_C(1, C) }
        }
    }
}

int skv_gemm_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                  int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features;
    if (skv_weight_check(w) || M < 1 || ldy < O || o_lo % NR) return -1;
    if (o_lo >= o_hi) return 0;
    const int dense = w->kind == SKV_F32; /* fp32 rows are a panel already */
    float *P = dense ? NULL : aligned_alloc(64, ((sizeof(float) * I * NR + 63) / 64) * 64); /* [NR, I] */
    if (!dense && !P) return -2;
    for (int64_t o0 = o_lo; o0 < o_hi; o0 += NR) {
        const int rows = o_hi - o0 < NR ? (int)(o_hi - o0) : NR;
        const float *panel = dense ? (const float *)w->q + o0 * I : P;
        for (int j = 0; j < rows && !dense; j++) skv_dequant_row(w, o0 + j, P + j * I);
        panel_times_rows(x, M, I, panel, y + o0, ldy, rows);
    }
    free(P);
    return 0;
}
