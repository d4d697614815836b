/* skv_gemv or skv_gemm by batch size, then the bias (see skv_linear.h). */
#include <omp.h>

#include "skv_gemm.h"
#include "skv_gemv.h"
#include "skv_linear.h"
#include "skv_team.h"

int skv_linear_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t gemv_rows,
                    int64_t dots, int64_t o_lo, int64_t o_hi) {
    int rc = -1;
    const int gemv = M <= gemv_rows && M <= SKV_GEMV_MAX_ROWS;
    /* A dense bf16 weight from 1 row: the AVX512-BF16 panel beats the fp32 gemv (Llama-3.2-1B shape, Zen 4, all
     * layers: 74 vs 94 ms at 2 rows, 88 vs 149 ms at 4; at 1 row 1.02-1.04x, the gemv already near the memory's
     * rate); a blocked weight's gemv stays ahead up to gemv_rows. */
    if (gemv && w->kind == SKV_BF16 && (dots & SKV_DOT_BF16)) rc = skv_gemm_bf16_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && gemv && (dots & SKV_DOT_I8)) rc = skv_gemv_i8_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && gemv) rc = skv_gemv_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && !gemv && (dots & SKV_DOT_AMX)) rc = skv_gemm_amx_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && !gemv && (dots & SKV_DOT_I8)) rc = skv_gemm_i8_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && !gemv && (dots & SKV_DOT_BF16)) rc = skv_gemm_bf16_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == -1 && !gemv) rc = skv_gemm_part(w, x, M, y, ldy, o_lo, o_hi);
    if (rc == 0 && w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = o_lo; o < o_hi; o++) y[m * ldy + o] += w->bias[o];
    return rc;
}

int skv_linear_team(const skv_team *t, const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy,
                    int64_t gemv_rows, int64_t dots, int64_t *o_lo, int64_t *o_hi) {
    skv_team_range(t, w->out_features, SKV_GEMM_PANEL, o_lo, o_hi);
    return skv_linear_part(w, x, M, y, ldy, gemv_rows, dots, *o_lo, *o_hi);
}

int skv_linear(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t gemv_rows,
               int64_t dots, int nthreads) {
    const int small = M <= gemv_rows && w->out_features * w->in_features < 32768; /* not worth a second thread */
    int rc = 0;
#pragma omp parallel num_threads(small ? 1 : nthreads)
    {
        const skv_team t = {omp_get_thread_num(), omp_get_num_threads(), NULL};
        if (t.ith == 0) SKV_COUNT_REGION();
        int64_t lo, hi;
        const int r = skv_linear_team(&t, w, x, M, y, ldy, gemv_rows, dots, &lo, &hi);
        if (r) {
#pragma omp atomic write
            rc = r;
        }
    }
    return rc;
}
