/* Row o of a held weight (skv_weight.h) as fp32 values: exact for every kind. Header only: the panel
 * GEMM and the widening kernel both read rows this way. */
#ifndef SKV_DEQUANT_H
#define SKV_DEQUANT_H
#include <immintrin.h>
#include <string.h>

#include "skv_vec.h"
#include "skv_weight.h"

/* dst[0:I] = W[o, :] */
static inline void skv_dequant_row(const skv_weight *w, int64_t o, float *dst) {
    const int64_t I = w->in_features, nb = I / 32;
    if (w->kind == SKV_F32) {
        memcpy(dst, (const float *)w->q + o * I, sizeof(float) * I);
    } else if (w->kind == SKV_BF16) {
        const uint16_t *r = (const uint16_t *)w->q + o * I;
        for (int64_t k = 0; k < I; k += 8) _mm256_storeu_ps(dst + k, skv_load_bf16x8(r + k));
    } else if (w->kind == SKV_Q8) {
        const uint8_t *r = (const uint8_t *)w->q + o * I;
        const float *s = (const float *)w->scale + o * nb, *off = (const float *)w->offset + o * nb;
        for (int64_t b = 0; b < nb; b++) {
            const __m256 sb = _mm256_set1_ps(s[b]), ob = _mm256_set1_ps(off[b]);
            for (int i = 0; i < 32; i += 8) /* scale * q is exact in fp32, so the FMA equals mul + add */
                _mm256_storeu_ps(dst + 32 * b + i, _mm256_fmadd_ps(sb, skv_load_u8x8(r + 32 * b + i), ob));
        }
    } else { /* SKV_Q4 */
        const uint8_t *r = (const uint8_t *)w->q + o * I / 2;
        const uint16_t *s = (const uint16_t *)w->scale + o * nb, *off = (const uint16_t *)w->offset + o * nb;
        for (int64_t b = 0; b < nb; b++) {
            const __m256 sb = _mm256_set1_ps(skv_f16(s[b])), ob = _mm256_set1_ps(skv_f16(off[b]));
            __m256 c[4];
            skv_load_u4x32(r + 16 * b, c);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(dst + 32 * b + 8 * i, _mm256_fmadd_ps(sb, c[i], ob));
        }
    }
}

/* dst[0:I] = W[o, :] as bf16 bits, rounded to nearest even (`row`: I floats of scratch) */
static inline void skv_dequant_row_bf16(const skv_weight *w, int64_t o, float *row, uint16_t *dst) {
    skv_dequant_row(w, o, row);
    for (int64_t k = 0; k < w->in_features; k += 8) skv_store_bf16x8(dst + k, _mm256_loadu_ps(row + k)); /* I % 8 == 0 */
}
#endif
