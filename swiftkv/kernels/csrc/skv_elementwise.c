/* The elementwise ops of a decoder layer, one pass each (see swiftkv/kernels/elementwise.py): fp32 or bf16 rows
 * (bf16: widened exactly, computed in fp32, rounded once to nearest even on the way out), AVX2 + FMA, or AVX-512
 * where the `form` asks (skv_elementwise512.c); the work split across a team's slots (the `_part` functions). In
 * PyTorch each is 3-6 ops with their temporaries (and, in bf16, a rounding per op). */
#include <math.h>
#include <omp.h>

#include "skv_elementwise.h"
#include "skv_vec.h"

/* eight values of row-major data of either dtype (bf16: raw bits) at element i, as fp32 */
static inline __m256 load8(const void *base, int64_t i, int bf16) {
    return bf16 ? skv_load_bf16x8((const uint16_t *)base + i) : _mm256_loadu_ps((const float *)base + i);
}

static inline void store8(void *base, int64_t i, __m256 v, int bf16) {
    if (bf16)
        skv_store_bf16x8((uint16_t *)base + i, v);
    else
        _mm256_storeu_ps((float *)base + i, v);
}

void skv_rms_norm_part(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps, int form,
                       int64_t m_lo, int64_t m_hi) {
    const int bf16 = form & SKV_EW_BF16;
    if ((form & SKV_EW_AVX512) && skv_rms_norm_part16(x, stride, w, out, N, eps, bf16, m_lo, m_hi) == 0) return;
    for (int64_t m = m_lo; m < m_hi; m++) {
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < N; i += 8) {
            __m256 v = load8(x, m * stride + i, bf16);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(skv_hsum(ss) / (float)N + eps));
        for (int64_t i = 0; i < N; i += 8)
            store8(out, m * N + i, _mm256_mul_ps(_mm256_mul_ps(load8(x, m * stride + i, bf16), r),
                                                 _mm256_loadu_ps(w + i)), bf16);
    }
}

void skv_silu_and_mul_part(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int form,
                           int64_t i_lo, int64_t i_hi) {
    const int bf16 = form & SKV_EW_BF16;
    if ((form & SKV_EW_AVX512) && skv_silu_and_mul_part16(gate, up, ld, out, M, I, bf16, i_lo, i_hi) == 0) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = i_lo; i < i_hi; i += 8) {
            const __m256 g = load8(gate, m * ld + i, bf16), u = load8(up, m * ld + i, bf16);
            const __m256 e = skv_vexp(_mm256_sub_ps(_mm256_setzero_ps(), g)); /* silu(g) = g / (1 + e^-g) */
            store8(out, m * I + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u), bf16);
        }
}

void skv_rotary_part(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos, const float *sin, int form,
                     int64_t p_lo, int64_t p_hi) {
    const int bf16 = form & SKV_EW_BF16;
    if ((form & SKV_EW_AVX512) && skv_rotary_part16(x, heads, D, stride, cos, sin, bf16, p_lo, p_hi) == 0) return;
    const int64_t h = D / 2;
    for (int64_t p = p_lo; p < p_hi; p++) {
        const int64_t n = p / heads, hd = p % heads;
        const float *c = cos + n * D, *s = sin + n * D;
        const int64_t a = n * stride + hd * D, b = a + h; /* element offsets of the two halves */
        for (int64_t i = 0; i < h; i += 8) {
            const __m256 x1 = load8(x, a + i, bf16), x2 = load8(x, b + i, bf16);
            store8(x, a + i, _mm256_fnmadd_ps(x2, _mm256_loadu_ps(s + i), _mm256_mul_ps(x1, _mm256_loadu_ps(c + i))), bf16);
            store8(x, b + i, _mm256_fmadd_ps(x1, _mm256_loadu_ps(s + h + i), _mm256_mul_ps(x2, _mm256_loadu_ps(c + h + i))), bf16);
        }
    }
}

/* the public calls: one region each, the work split by skv_team_range */
#define TEAM_REGION(BODY) /* over T threads */                                                                        \
    _Pragma("omp parallel num_threads(T)") {                                                        \
        const skv_team t = {omp_get_thread_num(), omp_get_num_threads(), NULL};                           \
        if (t.ith == 0) SKV_COUNT_REGION();                                                               \
        int64_t lo, hi;                                                                                   \
        BODY                                                                                              \
    }

int skv_rms_norm(const skv_rows *x, const float *w, void *out, float eps, int nthreads) {
    if (x->width % 8) return -1;
    const int T = x->rows > 1 ? nthreads : 1;
    TEAM_REGION(skv_team_range(&t, x->rows, 1, &lo, &hi);
                skv_rms_norm_part(x->data, x->stride, w, out, x->width, eps, (int)x->form, lo, hi);)
    return 0;
}

int skv_silu_and_mul(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int nthreads,
                     int form) {
    if (I % 8) return -1;
    const int T = M * I > 16384 ? nthreads : 1;
    TEAM_REGION(skv_team_range(&t, I, 8, &lo, &hi); skv_silu_and_mul_part(gate, up, ld, out, M, I, form, lo, hi);)
    return 0;
}

int skv_rotary_inplace(const skv_rows *x, int64_t heads, int64_t D, const float *cos, const float *sin, int nthreads) {
    if (D % 16) return -1;
    const int T = x->rows * heads * D > 16384 ? nthreads : 1;
    TEAM_REGION(skv_team_range(&t, x->rows * heads, 1, &lo, &hi);
                skv_rotary_part(x->data, heads, D, x->stride, cos, sin, (int)x->form, lo, hi);)
    return 0;
}
