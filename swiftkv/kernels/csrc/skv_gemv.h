/* y = x W^T for a few rows (decode, batch <= 8), reading W in its held form: the bytes are the time. */
#ifndef SKV_GEMV_H
#define SKV_GEMV_H
#include "skv_weight.h"

#define SKV_GEMV_MAX_ROWS 8

/* Outputs [o_lo, o_hi) of y: x [M, I] (rows I apart), y [M, O] (rows ldy apart); 1 <= M <= 8; no bias. Returns
 * 0, -1 for shapes it cannot take, -2 when out of memory. */
int skv_gemv_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo, int64_t o_hi);
#endif
