/* y = x W^T + b for decode-sized batches: skv_gemv up to `gemv_rows` rows, skv_gemm above. */
#ifndef SKV_LINEAR_H
#define SKV_LINEAR_H
#include "skv_team.h"
#include "skv_weight.h"

#define SKV_DOT_BF16 1 /* above gemv_rows: skv_gemm_bf16 where it takes the shape (a bf16 model, avx512_bf16) */
#define SKV_DOT_I8 2   /* skv_gemv_i8 up to gemv_rows, skv_gemm_i8 above: the blocked kinds (a bf16 model, avx512_vnni) */
#define SKV_DOT_AMX 8  /* above gemv_rows: skv_gemm_amx, before the others (a bf16 model, amx_bf16, skv_amx_init done) */

/* x [M, I], y [M, O] (rows ldy apart), plus w->bias if any; `dots`: the SKV_DOT_* forms a bf16 model may use on
 * this CPU. Returns 0, -1 bad shapes, -2 out of memory. One parallel region of `nthreads`. */
int skv_linear(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t gemv_rows,
               int64_t dots, int nthreads);
/* Outputs [o_lo, o_hi) only (o_lo a multiple of SKV_GEMM_PANEL), bias included; no threads of its own. */
int skv_linear_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t gemv_rows,
                    int64_t dots, int64_t o_lo, int64_t o_hi);
/* Slot t->ith's share of the outputs (written to *o_lo, *o_hi), inside a team's region. */
int skv_linear_team(const skv_team *t, const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy,
                    int64_t gemv_rows, int64_t dots, int64_t *o_lo, int64_t *o_hi);
#endif
