/* The elementwise ops of skv_elementwise.c sixteen lanes at a time, for a CPU with avx512_bf16 (Zen 4, Sapphire
 * Rapids and later): bf16 rows widened exactly and rounded back in one instruction (vcvtneps2bf16: nearest even, the
 * values skv_store_bf16x8 gives), a row's last partial vector masked. The same steps as the AVX2 forms (an RMSNorm's
 * sum of squares is added in another order: the last bit of its fp32 statistic may differ). Each returns 0, or -1
 * where the compiler could not build it (the caller then runs the AVX2 form). */
#include <math.h>

#include "skv_elementwise.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
/* lanes [i, i + 16) of row-major data of either dtype, as fp32; `k`: which lanes exist (the others read as 0) */
SKV_BF16_TARGET static inline __m512 load16(const void *base, int64_t i, int bf16, __mmask16 k) {
    if (k == 0xFFFF) return bf16 ? skv_load_bf16x16((const uint16_t *)base + i) : _mm512_loadu_ps((const float *)base + i);
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)base + i)), 16));
    return _mm512_maskz_loadu_ps(k, (const float *)base + i);
}

SKV_BF16_TARGET static inline void store16(void *base, int64_t i, __m512 v, int bf16, __mmask16 k) {
    if (k == 0xFFFF && bf16)
        skv_store_bf16x16((uint16_t *)base + i, v);
    else if (k == 0xFFFF)
        _mm512_storeu_ps((float *)base + i, v);
    else if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)base + i, k, (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_mask_storeu_ps((float *)base + i, k, v);
}

/* the lanes of [i, end) that exist in a vector starting at i */
static inline __mmask16 lanes(int64_t i, int64_t end) {
    return end - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - i)) - 1);
}

SKV_BF16_TARGET int skv_rms_norm_part16(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps,
                                        int bf16, int64_t m_lo, int64_t m_hi) {
    for (int64_t m = m_lo; m < m_hi; m++) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < N; i += 16) {
            const __m512 v = load16(x, m * stride + i, bf16, lanes(i, N));
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)N + eps));
        for (int64_t i = 0; i < N; i += 16) {
            const __mmask16 k = lanes(i, N);
            store16(out, m * N + i, _mm512_mul_ps(_mm512_mul_ps(load16(x, m * stride + i, bf16, k), r),
                                                  _mm512_maskz_loadu_ps(k, w + i)), bf16, k);
        }
    }
    return 0;
}

SKV_BF16_TARGET int skv_silu_and_mul_part16(const void *gate, const void *up, int64_t ld, void *out, int64_t M,
                                            int64_t I, int bf16, int64_t i_lo, int64_t i_hi) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = i_lo; i < i_hi; i += 16) {
            const __mmask16 k = lanes(i, i_hi);
            const __m512 g = load16(gate, m * ld + i, bf16, k), u = load16(up, m * ld + i, bf16, k);
            const __m512 e = skv_vexp16(_mm512_sub_ps(_mm512_setzero_ps(), g)); /* silu(g) = g / (1 + e^-g) */
            store16(out, m * I + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u), bf16, k);
        }
    return 0;
}

SKV_BF16_TARGET int skv_rotary_part16(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos,
                                      const float *sin, int bf16, int64_t p_lo, int64_t p_hi) {
    const int64_t h = D / 2;
    for (int64_t p = p_lo; p < p_hi; p++) {
        const int64_t n = p / heads, hd = p % heads;
        const float *c = cos + n * D, *s = sin + n * D;
        const int64_t a = n * stride + hd * D, b = a + h; /* element offsets of the two halves */
        for (int64_t i = 0; i < h; i += 16) {
            const __mmask16 k = lanes(i, h);
            const __m512 x1 = load16(x, a + i, bf16, k), x2 = load16(x, b + i, bf16, k);
            store16(x, a + i, _mm512_fnmadd_ps(x2, _mm512_maskz_loadu_ps(k, s + i),
                                               _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(k, c + i))), bf16, k);
            store16(x, b + i, _mm512_fmadd_ps(x1, _mm512_maskz_loadu_ps(k, s + h + i),
                                              _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(k, c + h + i))), bf16, k);
        }
    }
    return 0;
}
#else
int skv_rms_norm_part16(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps, int bf16,
                        int64_t m_lo, int64_t m_hi) {
    return -1;
}
int skv_silu_and_mul_part16(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int bf16,
                            int64_t i_lo, int64_t i_hi) {
    return -1;
}
int skv_rotary_part16(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos, const float *sin, int bf16,
                      int64_t p_lo, int64_t p_hi) {
    return -1;
}
#endif
