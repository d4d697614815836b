/* The panel GEMM on the AMX-BF16 tiles (Sapphire Rapids and later), for decode-sized batches of a model computing in
 * bf16: the same values as skv_gemm_bf16.c (activations and weights rounded to bf16, nearest even; every product
 * summed in fp32), on the tiles' 16 x 16 x 32 dot products instead of vdpbf16ps.
 *
 * It computes y^T = W x^T, so that the weight is the tiles' A operand as it lies, row-major: per panel of 16 output
 * rows the blocked kinds are widened once into a thread's own bf16 buffer (skv_widen_row_bf16, as the AVX512-BF16
 * panel does) and bf16 weights are read in place; each A tile is 16 outputs x 32 inputs of it. The activations are
 * the B operand, in the tiles' pair layout: per block of 32 inputs and group of 16 rows, 16 pairs x 16 rows (a
 * 16 x 16 dword transpose), made once per call. Up to four groups (64 rows) accumulate in tiles 0-3 over all inputs;
 * then each 16 x 16 result is transposed back into y's rows. Compiled for these instructions through function
 * attributes only: call it only where the CPU has them and skv_amx_init() returned 0 (the Python side checks). */
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "skv_amx.h"
#include "skv_gemm.h"

#ifdef SKV_AMX_TARGET
#define AMX_TARGET SKV_AMX_TARGET
#define P 16      /* output rows per panel: an A tile's rows */
#define GROUPS 4  /* groups of 16 input rows accumulated at once: tiles 0-3 (A: tile 4, B: tile 5) */

int skv_amx_init(void) { /* Linux hands a process the tiles' state only when asked (ARCH_REQ_XCOMP_PERM, XTILEDATA) */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : -1;
}

/* B tiles of x: xt[(b * G + g) * 512 ...] = rows 16 g .. 16 g + 15, inputs 32 b .. 32 b + 31 as 16 pairs x 16 rows
 * (rows past M zero) */
AMX_TARGET static void pack_rows(const float *x, int64_t M, int64_t I, int64_t G, uint16_t *xt) {
    for (int64_t g = 0; g < G; g++)
        for (int64_t b = 0; b < I / 32; b++) {
            __m512 r[16];
            for (int n = 0; n < 16; n++) {
                const int64_t m = 16 * g + n;
                if (m >= M) {
                    r[n] = _mm512_setzero_ps();
                    continue;
                }
                const float *xm = x + m * I + 32 * b;
                r[n] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + 16), _mm512_loadu_ps(xm)); /* 16 pairs */
            }
            skv_transpose16(r); /* r[k]: pair k of rows 0..15 */
            uint16_t *dst = xt + (b * G + g) * 512;
            for (int k = 0; k < 16; k++) _mm512_store_ps((float *)(dst + 32 * k), r[k]);
        }
}

/* y[16 g + n, o0 + c] = acc[c][n] for the valid rows and columns: the 16 x 16 result transposed back */
AMX_TARGET static void store_group(const float *acc, int64_t rows, int cols, float *y, int64_t ldy) {
    __m512 r[16];
    for (int c = 0; c < 16; c++) r[c] = _mm512_load_ps(acc + 16 * c);
    skv_transpose16(r);
    const __mmask16 k = (__mmask16)((1u << cols) - 1);
    for (int64_t n = 0; n < rows; n++) _mm512_mask_storeu_ps(y + n * ldy, k, r[n]);
}

AMX_TARGET int skv_gemm_amx_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                                 int64_t o_hi) {
    const int64_t I = w->in_features, O = w->out_features, G = (M + 15) / 16, nb = I / 32;
    if (skv_weight_check(w) || M < 1 || ldy < O || I % 32 || o_lo % SKV_GEMM_PANEL || w->kind == SKV_F32) return -1;
    if (o_lo >= o_hi) return 0;
    uint16_t *xt = aligned_alloc(64, (size_t)(G * nb * 1024));             /* B tiles of every row group */
    uint16_t *panel = aligned_alloc(64, (size_t)(((P * I * 2) + 63) / 64 * 64)); /* [16, I] bf16 */
    float *row = aligned_alloc(64, (size_t)((I * 4 + 63) / 64 * 64)), *acc = aligned_alloc(64, 1024);
    if (!xt || !panel || !row || !acc) {
        free(xt), free(panel), free(row), free(acc);
        return -2;
    }
    pack_rows(x, M, I, G, xt);
    skv_amx_configure(6);
    for (int64_t o0 = o_lo; o0 < o_hi; o0 += P) {
        const int cols = o_hi - o0 < P ? (int)(o_hi - o0) : P;
        const uint16_t *a = panel; /* the panel's bf16 rows, I apart */
        if (w->kind == SKV_BF16 && cols == P) {
            a = (const uint16_t *)w->q + o0 * I; /* in place */
        } else {
            for (int j = 0; j < cols; j++) skv_widen_row_bf16(w, o0 + j, row, panel + j * I);
            if (cols < P) memset(panel + cols * I, 0, (size_t)((P - cols) * I * 2));
        }
        for (int64_t g0 = 0; g0 < G; g0 += GROUPS) {
            const int64_t ng = G - g0 < GROUPS ? G - g0 : GROUPS;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t b = 0; b < nb; b++) {
                _tile_loadd(4, a + 32 * b, I * 2);
                const uint16_t *bt = xt + (b * G + g0) * 512;
                SKV_AMX_DP(0, 1, 2, 3, 4, 5, bt, 512, ng); /* tiles 0 .. ng - 1 += A x the groups' B tiles */
            }
            for (int64_t g = g0; g < g0 + ng; g++) {
                switch (g - g0) {
                    case 0: _tile_stored(0, acc, 64); break;
                    case 1: _tile_stored(1, acc, 64); break;
                    case 2: _tile_stored(2, acc, 64); break;
                    default: _tile_stored(3, acc, 64); break;
                }
                const int64_t rows = M - 16 * g < 16 ? M - 16 * g : 16;
                store_group(acc, rows, cols, y + 16 * g * ldy + o0, ldy);
            }
        }
    }
    _tile_release();
    free(xt), free(panel), free(row), free(acc);
    return 0;
}
#else
int skv_amx_init(void) { return -1; /* this compiler cannot emit the instructions */ }

int skv_gemm_amx_part(const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t o_lo,
                      int64_t o_hi) {
    (void)w, (void)x, (void)M, (void)y, (void)ldy, (void)o_lo, (void)o_hi;
    return -1; /* the caller uses the other GEMMs */
}
#endif
