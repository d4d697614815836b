/* y = x W^T for a few dozen rows (batched decode), reading W in its held form once per call. */
#ifndef SKV_GEMM_H
#define SKV_GEMM_H
#include "skv_weight.h"

#define SKV_GEMM_PANEL 8 /* output rows per panel: a slot's share starts at a multiple of this */

/* Outputs [o_lo, o_hi) of y (o_lo % SKV_GEMM_PANEL == 0): x [M, I] (rows I apart), y [M, O] (rows ldy apart);
 * any M >= 1; no bias. Returns 0, -1 for shapes it cannot take, -2 when out of memory. */
int skv_gemm_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                  int64_t o_hi);
/* The same with x and W rounded to bf16 and AVX512-BF16 dot products (skv_gemm_bf16.c): only on a CPU with
 * avx512_bf16; -1 also where I % 32 or the compiler could not build it (then use skv_gemm_part). */
int skv_gemm_bf16_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                       int64_t o_hi);
/* dst[0:I] = W[o, :] rounded to bf16 (nearest even), the blocked kinds straight from their codes with AVX-512 (only on
 * a CPU with avx512_bf16; `row`: I floats of scratch) */
void skv_widen_row_bf16(const skv_weight *w, int64_t o, float *row, uint16_t *dst);
#endif
