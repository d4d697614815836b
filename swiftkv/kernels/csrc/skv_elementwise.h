/* The elementwise ops of a decoder layer, one pass each: fp32, or bf16 (computed in fp32, rounded once), rows split
 * across OpenMP threads; AVX2, or AVX-512 on a CPU with avx512_bf16 (skv_elementwise512.c). */
#ifndef SKV_ELEMENTWISE_H
#define SKV_ELEMENTWISE_H
#include <stdint.h>

#include "skv_team.h"

#define SKV_EW_BF16 1   /* a `form` bit: the rows are bf16 (else fp32) */
#define SKV_EW_AVX512 2 /* a `form` bit: the AVX-512 form (only on a CPU with avx512_bf16; the Python side checks) */

/* Rows of fp32 or bf16 values, `stride` elements apart, and the form to run on them (SKV_EW_* bits; mirrored by the
 * Python bindings; ABI-checked) */
typedef struct {
    void *data;
    int64_t rows, width, stride, form;
} skv_rows;

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w for x [M, N] (x->rows, x->width; N % 8 == 0), out [M, N] of x's dtype,
 * contiguous; w fp32 */
int skv_rms_norm(const skv_rows *x, const float *w, void *out, float eps, int nthreads);
/* out[m, i] = silu(gate[m, i]) * up[m, i] for gate, up [M, I] (rows `ld` apart), out [M, I], I % 8 == 0 */
int skv_silu_and_mul(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int nthreads,
                     int form);
/* rotary embedding in place on the first `heads` heads of each of the N = x->rows rows of x (head_dim D % 16 == 0;
 * x->width unused); cos, sin [N, D] fp32 (transformers' rotate_half convention) */
int skv_rotary_inplace(const skv_rows *x, int64_t heads, int64_t D, const float *cos, const float *sin, int nthreads);
/* the same, slot by slot (no threads of their own; the checks above are the caller's): rows [m_lo, m_hi);
 * columns [i_lo, i_hi) (multiples of 8) of every row; (token, head) pairs [p_lo, p_hi) of the N x heads; `form`: SKV_EW_* */
void skv_rms_norm_part(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps, int form,
                       int64_t m_lo, int64_t m_hi);
void skv_silu_and_mul_part(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int form,
                           int64_t i_lo, int64_t i_hi);
void skv_rotary_part(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos, const float *sin, int form,
                     int64_t p_lo, int64_t p_hi);
/* the AVX-512 forms of the `_part` functions (bf16: 0 or 1): 0, or -1 where the compiler could not build them */
int skv_rms_norm_part16(const void *x, int64_t stride, const float *w, void *out, int64_t N, float eps, int bf16,
                        int64_t m_lo, int64_t m_hi);
int skv_silu_and_mul_part16(const void *gate, const void *up, int64_t ld, void *out, int64_t M, int64_t I, int bf16,
                            int64_t i_lo, int64_t i_hi);
int skv_rotary_part16(void *x, int64_t heads, int64_t D, int64_t stride, const float *cos, const float *sin, int bf16,
                      int64_t p_lo, int64_t p_hi);
#endif
