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
/* The same for SKV_Q4 / SKV_Q8 weights with each block of 32 activations quantized to int8 and AVX512-VNNI integer dot
 * products (skv_gemm_i8.c, skv_gemv_i8's arithmetic): only on a CPU with avx512_vnni; -1 for other kinds or where the
 * compiler could not build it (then use the other GEMMs). */
int skv_gemm_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                     int64_t o_hi);
/* The same values as skv_gemm_bf16_part on the AMX-BF16 tiles (skv_gemm_amx.c): only on a CPU with amx_bf16, after
 * skv_amx_init() returned 0; -1 for fp32 weights, I % 32 or where the compiler could not build it. */
int skv_gemm_amx_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                      int64_t o_hi);
/* Asks Linux for the tiles' state for this process (once, before any tile instruction): 0, or -1 where it is refused
 * or the compiler could not build the AMX kernel. */
int skv_amx_init(void);
/* The whole product, w->bias included, in one parallel region of `nthreads`: x [M, I] fp32 or bf16 (`x_bf16`), y
 * [M, O] (rows ldy apart) fp32 or bf16 (`y_bf16`, rounded to nearest even); the rows quantized once, shared out. */
int skv_gemm_i8(const skv_weight *w, const void *x, int x_bf16, int64_t M, void *y, int y_bf16, int64_t ldy,
                int nthreads);
/* dst[0:I] = W[o, :] rounded to bf16 (nearest even), the blocked kinds straight from their codes with AVX-512 (only on
 * a CPU with avx512_bf16; `row`: I floats of scratch) */
void skv_widen_row_bf16(const skv_weight *w, int64_t o, float *row, uint16_t *dst);
#endif
