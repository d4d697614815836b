/* y = x W^T for a few dozen rows (batched decode), reading W in its held form once per call. */
#ifndef SKV_GEMM_H
#define SKV_GEMM_H
#include "skv_weight.h"

/* x [M, I] (rows I apart), y [M, O] (rows ldy apart); any M >= 1; no bias. Returns 0, -1 for shapes it
 * cannot take, -2 when out of memory. */
int skv_gemm(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int nthreads);
#endif
