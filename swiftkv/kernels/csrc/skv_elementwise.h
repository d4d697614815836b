/* The elementwise ops of a decoder layer, one pass each: fp32, or bf16 (`bf16`: computed in fp32, rounded once),
 * rows split across OpenMP threads. */
#ifndef SKV_ELEMENTWISE_H
#define SKV_ELEMENTWISE_H
#include <stdint.h>

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w for x, out [M, N] (rows `stride` apart in x), N % 8 == 0; w fp32 */
int skv_rms_norm(const void *x, int64_t stride, const float *w, void *out, int64_t M, int64_t N, float eps,
                 int nthreads, int bf16);
/* out[m, i] = silu(gate[m, i]) * up[m, i] for gate, up [M, I] (rows `ld` apart), out [M, I], I % 8 == 0 */
int skv_silu_and_mul(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int nthreads,
                     int bf16);
/* rotary embedding in place on the first `heads` heads of each of N rows of x (rows `stride` elements apart,
 * head_dim D % 16 == 0); cos, sin [N, D] fp32 (transformers' rotate_half convention) */
int skv_rotary_inplace(void *x, int64_t N, int64_t heads, int64_t D, int64_t stride, const float *cos,
                       const float *sin, int nthreads, int bf16);
#endif
