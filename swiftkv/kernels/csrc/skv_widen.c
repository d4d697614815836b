/* Widening of held weights for prefill-sized GEMMs (see skv_widen.h). Rows split across OpenMP threads. */
#include <stdlib.h>
#include <string.h>

#include "skv_dequant.h"
#include "skv_gemm.h"
#include "skv_linear.h"
#include "skv_widen.h"

int skv_widen(const skv_weight *w, int64_t o0, int64_t rows, void *out, int64_t out_bf16, int64_t dots,
              int nthreads) {
    const int64_t I = w->in_features;
    if (skv_weight_check(w) || o0 < 0 || rows < 0 || o0 + rows > w->out_features) return -1;
    if (out_bf16 && w->kind == SKV_BF16) { /* already bf16: a copy */
        memcpy(out, (const uint16_t *)w->q + o0 * I, sizeof(uint16_t) * rows * I);
        return 0;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (rows * I >= 65536)
    {
        float *tmp = out_bf16 ? malloc(sizeof(float) * I) : NULL;
        if (out_bf16 && !tmp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!out_bf16) {
                skv_dequant_row(w, o0 + r, (float *)out + r * I);
            } else if (tmp && (dots & SKV_DOT_BF16)) { /* AVX-512, from the codes */
                skv_widen_row_bf16(w, o0 + r, tmp, (uint16_t *)out + r * I);
            } else if (tmp) {
                skv_dequant_row_bf16(w, o0 + r, tmp, (uint16_t *)out + r * I);
            }
        }
        free(tmp);
    }
    return failed ? -2 : 0;
}
