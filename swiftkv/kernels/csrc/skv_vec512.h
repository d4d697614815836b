/* AVX-512 (+ AVX512-BF16) helpers for the kernels compiled for those instructions through function attributes only
 * (the library's flags stay AVX2): header only, static inline. Whoever calls them checks the CPU first (the Python
 * side reads its flags). SKV_BF16_TARGET is defined where the compiler can emit the instructions. */
#ifndef SKV_VEC512_H
#define SKV_VEC512_H
#include <immintrin.h>
#include <stdint.h>

#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define SKV_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* e^x, lane-wise: skv_vexp (skv_vec.h) sixteen lanes at a time, the same steps and constants, so the same values */
SKV_BF16_TARGET static inline __m512 skv_vexp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                           _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* 2^x, lane-wise, for x <= 0 (clamped at -126): 2^round(x) by scalef times a degree-5 fit of 2^f on [-0.5, 0.5]
 * (relative error 2.2e-7, as skv_vexp16's): half skv_vexp16's instructions, for softmaxes whose scores come in
 * log2 units (scaled by log2(e) beforehand) */
SKV_BF16_TARGET static inline __m512 skv_vexp2_16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(x, n);
    __m512 y = _mm512_set1_ps(1.3266970636323094e-3f);
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.675459936261177e-3f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550742521882057e-2f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022121727466583e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931469440460205e-1f));
    y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0000001192092896f));
    return _mm512_scalef_ps(y, n);
}

/* r[0..15] transposed in place as a 16 x 16 matrix of 32-bit elements (r[i] lane j <-> r[j] lane i): pairs of rows
 * interleaved, then pairs of pairs, then 128-bit lanes moved across two steps (64 shuffles) */
SKV_BF16_TARGET static inline void skv_transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int k = 0; k < 16; k += 4) { /* r[k + j] 128-bit lane L: rows k..k+3 at column 4 L + j */
        const __m512d a = _mm512_castps_pd(t[k]), b = _mm512_castps_pd(t[k + 1]);
        const __m512d c = _mm512_castps_pd(t[k + 2]), d = _mm512_castps_pd(t[k + 3]);
        r[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c)), r[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)), r[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; j++) { /* column 4 L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j] */
        const __m512 p0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), p1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        const __m512 q0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        const __m512 q1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(p0, q0, 0x88), t[4 + j] = _mm512_shuffle_f32x4(p1, q1, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(p0, q0, 0xDD), t[12 + j] = _mm512_shuffle_f32x4(p1, q1, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* [a0 b0 a1 b1 ... a15 b15]: two vectors of 16 bf16 interleaved into 16 pairs (the pair layout vdpbf16ps multiplies) */
SKV_BF16_TARGET static inline __m512i skv_pairs16(__m256i a, __m256i b) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                         5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
}

/* sixteen bf16 values (raw bits) widened to fp32: exact */
SKV_BF16_TARGET static inline __m512 skv_load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* sixteen fp32 stored as bf16 bits, rounded to nearest even in one instruction (as skv_store_bf16x8) */
SKV_BF16_TARGET static inline void skv_store_bf16x16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}
#endif
#endif
