/* y = x W^T for a few dozen rows (batched decode), reading W in its held form once per call. */
#ifndef SKV_GEMM_H
#define SKV_GEMM_H
#include "skv_weight.h"

/* x [M, I] (rows I apart), y [M, O] (rows ldy apart); any M >= 1; no bias. Returns 0, -1 for shapes it
 * cannot take, -2 when out of memory. */
int skv_gemm(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int nthreads);
/* The same with x and W rounded to bf16 and AVX512-BF16 dot products (skv_gemm_bf16.c): only on a CPU with
 * avx512_bf16; -1 also where I % 32 or the compiler could not build it (then use skv_gemm). */
int skv_gemm_bf16(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int nthreads);
#endif
