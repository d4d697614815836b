/* skv_gemv or skv_gemm by batch size, then the bias (see skv_linear.h). */
#include "skv_linear.h"
#include "skv_gemm.h"
#include "skv_gemv.h"

int skv_linear(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t gemv_rows,
               int64_t bf16_dot, int nthreads) {
    int rc;
    if (M <= gemv_rows && M <= SKV_GEMV_MAX_ROWS)
        rc = skv_gemv(w, x, M, y, ldy, nthreads);
    else if (!bf16_dot || (rc = skv_gemm_bf16(w, x, M, y, ldy, nthreads)) == -1)
        rc = skv_gemm(w, x, M, y, ldy, nthreads);
    if (rc == 0 && w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < w->out_features; o++) y[m * ldy + o] += w->bias[o];
    return rc;
}
