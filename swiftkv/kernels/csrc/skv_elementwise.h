/* The elementwise ops of a decoder layer, one pass each: fp32, or bf16 (`bf16`: computed in fp32, rounded once),
 * rows split across OpenMP threads. */
#ifndef SKV_ELEMENTWISE_H
#define SKV_ELEMENTWISE_H
#include <stdint.h>

#include "skv_team.h"

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
/* the same, slot by slot (no threads of their own; the checks above are the caller's): rows [m_lo, m_hi);
 * columns [i_lo, i_hi) (multiples of 8) of every row; (token, head) pairs [p_lo, p_hi) of the N x heads */
void skv_rms_norm_part(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps, int bf16,
                       int64_t m_lo, int64_t m_hi);
void skv_silu_and_mul_part(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int bf16,
                           int64_t i_lo, int64_t i_hi);
void skv_rotary_part(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos, const float *sin, int bf16,
                     int64_t p_lo, int64_t p_hi);
#endif
