/* A weight [out_features, in_features] in the form it is held in memory (see swiftkv/layers/weights.py):
 *   SKV_Q8   uint8 codes [O, I], fp32 scale and offset [O, I / 32]: w = scale * q + offset per block of 32
 *            (GGUF Q8_0 / Q4_1 values, exactly; 1.25 bytes per weight)
 *   SKV_BF16 bf16 [O, I] (2 bytes)
 *   SKV_Q4   4-bit codes [O, I / 2] (16 bytes per block of 32, GGUF's nibble order), fp16 scale and offset
 *            [O, I / 32]: GGUF Q4_1 values exactly, in its own 0.625 bytes per weight
 *   SKV_F32  fp32 [O, I]
 * plus an optional fp32 bias [O]. Read by skv_gemv / skv_gemm / skv_widen / skv_linear. */
#ifndef SKV_WEIGHT_H
#define SKV_WEIGHT_H
#include <stdint.h>

enum { SKV_Q8 = 0, SKV_BF16 = 1, SKV_Q4 = 2, SKV_F32 = 3 };

typedef struct {
    int64_t kind;
    const void *q;                     /* codes or values */
    const void *scale, *offset;        /* SKV_Q8: float; SKV_Q4: fp16 bits; else NULL */
    const float *bias;                 /* [out_features] or NULL */
    int64_t out_features, in_features;
} skv_weight;

/* 0 if `w` is a weight the kernels can read (kind known, in_features a multiple of 8, of 32 for the
 * blocked kinds), else -1 */
static inline int skv_weight_check(const skv_weight *w) {
    if (w->kind < SKV_Q8 || w->kind > SKV_F32 || w->in_features < 8 || w->in_features % 8) return -1;
    if ((w->kind == SKV_Q8 || w->kind == SKV_Q4) && w->in_features % 32) return -1;
    return 0;
}
#endif
