/* y = x W^T for a few rows (decode, batch <= 8), reading W in its held form: the bytes are the time. */
#ifndef SKV_GEMV_H
#define SKV_GEMV_H
#include "skv_weight.h"

#define SKV_GEMV_MAX_ROWS 8

/* Outputs [o_lo, o_hi) of y: x [M, I] (rows I apart), y [M, O] (rows ldy apart); 1 <= M <= 8; no bias. Returns
 * 0, -1 for shapes it cannot take, -2 when out of memory. */
int skv_gemv_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo, int64_t o_hi);
/* The same for SKV_Q4 / SKV_Q8 weights and M <= 4 with each block of 32 activations quantized to int8 and AVX512-VNNI
 * integer dot products (skv_gemv_i8.c): only on a CPU with avx512_vnni; -1 for other kinds or where the compiler
 * could not build it (then use skv_gemv_part). */
int skv_gemv_i8_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                     int64_t o_hi);
#endif
