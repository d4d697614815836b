/* The elementwise ops of a decoder layer, one pass each (see swiftkv/kernels/elementwise.py): fp32, AVX2 + FMA, rows
 * split across OpenMP threads. In PyTorch each is 3-6 ops with their temporaries. */
#include <math.h>

#include "skv_elementwise.h"
#include "skv_vec.h"

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, for x, out [M, N] (rows `stride` apart in x), N % 8 == 0 */
int skv_rms_norm(const float *x, int64_t stride, const float *w, float *out, int64_t M, int64_t N, float eps,
                 int nthreads) {
    if (N % 8) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * stride;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < N; i += 8) {
            __m256 v = _mm256_loadu_ps(xm + i);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(skv_hsum(ss) / (float)N + eps));
        for (int64_t i = 0; i < N; i += 8)
            _mm256_storeu_ps(out + m * N + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + i), r),
                                                            _mm256_loadu_ps(w + i)));
    }
    return 0;
}

/* out[m, i] = silu(gate[m, i]) * up[m, i] for gate, up [M, I] (rows `ld` apart in both), out [M, I], I % 8 == 0 */
int skv_silu_and_mul(const float *gate, const float *up, int64_t ld, float *out, int64_t M, int64_t I, int nthreads) {
    if (I % 8) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * I > 16384)
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + m * ld + i), u = _mm256_loadu_ps(up + m * ld + i);
            const __m256 e = skv_vexp(_mm256_sub_ps(_mm256_setzero_ps(), g)); /* silu(g) = g / (1 + e^-g) */
            _mm256_storeu_ps(out + m * I + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u));
        }
    return 0;
}

/* Rotary embedding in place on the first `heads` heads of each token's row of x (rows `stride` floats
 * apart, head_dim D, D % 16 == 0): with h = D / 2, x[:h], x[h:] <- x[:h] cos[:h] - x[h:] sin[:h],
 * x[h:] cos[h:] + x[:h] sin[h:]; cos, sin [N, D] (transformers' rotate_half convention). */
int skv_rotary_inplace(float *x, int64_t N, int64_t heads, int64_t D, int64_t stride, const float *cos,
                       const float *sin, int nthreads) {
    if (D % 16) return -1;
    const int64_t h = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N * heads * D > 16384)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin + n * D;
        for (int64_t hd = 0; hd < heads; hd++) {
            float *a = x + n * stride + hd * D, *b = a + h;
            for (int64_t i = 0; i < h; i += 8) {
                const __m256 x1 = _mm256_loadu_ps(a + i), x2 = _mm256_loadu_ps(b + i);
                _mm256_storeu_ps(a + i, _mm256_fnmadd_ps(x2, _mm256_loadu_ps(s + i), _mm256_mul_ps(x1, _mm256_loadu_ps(c + i))));
                _mm256_storeu_ps(b + i, _mm256_fmadd_ps(x1, _mm256_loadu_ps(s + h + i), _mm256_mul_ps(x2, _mm256_loadu_ps(c + h + i))));
            }
        }
    }
    return 0;
}
