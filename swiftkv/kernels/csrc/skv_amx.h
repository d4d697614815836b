/* What the AMX kernels (skv_gemm_amx.c, skv_flash_amx.c) share: their target attribute, the tiles' configuration and
 * the dot products over up to four accumulators. Header only; SKV_AMX_TARGET is defined where the compiler can emit
 * the instructions (GCC 11, clang 12 and later). Whoever calls the kernels checks the CPU and Linux's grant first
 * (skv_amx_init; the Python side: kernels.linear.amx_available). */
#ifndef SKV_AMX_H
#define SKV_AMX_H
#include <stdint.h>

#include "skv_vec512.h"

#if defined(SKV_BF16_TARGET) && ((defined(__clang__) && __clang_major__ >= 12) || \
                                 (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SKV_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

typedef struct { /* the tiles' configuration (palette 1): see Intel's SDM, LDTILECFG */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} skv_tile_config;

/* tiles 0 .. n-1 all 16 rows x 64 bytes */
SKV_AMX_TARGET static inline void skv_amx_configure(int n) {
    skv_tile_config cfg = {.palette = 1};
    for (int t = 0; t < n; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* tiles c0, c1, c2, c3 (the first n <= 4 of them) += tile a x the B tiles at p, p + step, ... (each loaded into tile
 * b, rows 64 bytes apart). Tile numbers are pasted into the instructions as written: literals, one statement each. */
#define SKV_AMX_DP(c0, c1, c2, c3, a, b, p, step, n) \
    do {                                             \
        _tile_loadd(b, (p), 64);                     \
        _tile_dpbf16ps(c0, a, b);                    \
        if ((n) > 1) {                               \
            _tile_loadd(b, (p) + (step), 64);        \
            _tile_dpbf16ps(c1, a, b);                \
        }                                            \
        if ((n) > 2) {                               \
            _tile_loadd(b, (p) + 2 * (step), 64);    \
            _tile_dpbf16ps(c2, a, b);                \
        }                                            \
        if ((n) > 3) {                               \
            _tile_loadd(b, (p) + 3 * (step), 64);    \
            _tile_dpbf16ps(c3, a, b);                \
        }                                            \
    } while (0)
#endif
#endif
