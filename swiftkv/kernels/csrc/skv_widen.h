/* Rows of a held weight widened into a plain fp32 or bf16 matrix, so a GEMM library (oneDNN through
 * PyTorch) can run prefill-sized matmuls on them: the widening is one pass over the bytes, the GEMM
 * thousands of FLOPs per weight. */
#ifndef SKV_WIDEN_H
#define SKV_WIDEN_H
#include "skv_weight.h"

/* out [rows, I] = W[o0 : o0 + rows, :] as fp32 (out_bf16 = 0) or bf16 bits rounded to nearest even
 * (out_bf16 = 1; exact for bf16 weights; `dots` & SKV_DOT_BF16, only on a CPU with avx512_bf16: AVX-512 from the
 * codes). Returns 0, -1 for shapes it cannot take, -2 when out of memory. */
int skv_widen(const skv_weight *w, int64_t o0, int64_t rows, void *out, int64_t out_bf16, int64_t dots, int nthreads);
#endif
