/* Decoder layers of a decode step in one native call (see skv_fused_decode.h): for each layer, RMSNorm,
 * the q/k/v projections, rotary, the K/V store into the paged cache, paged attention, o_proj and
 * residual, RMSNorm, gate/up, SiLU-and-mul, down and residual -- the same kernels the layers call one by
 * one from Python, without ~20 Python calls per layer. AVX2 + FMA, OpenMP inside each kernel. */
#include <math.h>
#include <string.h>

#include "skv_elementwise.h"
#include "skv_fused_decode.h"
#include "skv_linear.h"
#include "skv_paged_attention.h"
#include "skv_vec.h"

static void add_into(float *h, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(y + i)));
}

static int64_t max2(int64_t a, int64_t b) { return a > b ? a : b; }

/* D values of one token's K or V head into the cache at element `at` (fp32, or bf16 rounded to nearest even) */
static void put_row(void *cache, int64_t at, const float *src, int64_t D, int64_t bf16) {
    if (bf16)
        for (int64_t d = 0; d < D; d++) ((uint16_t *)cache)[at + d] = skv_to_bf16(src[d]);
    else
        memcpy((float *)cache + at, src, sizeof(float) * D);
}

/* Where each buffer of a step's scratch starts (in floats), and the total: x, y [M, hidden]; the
 * projection outputs [M, widest]; q, attention [M, H D]; SiLU(gate) * up [M, I]. One place for the sizes
 * and the carving. */
typedef struct { int64_t x, wide, q, attn, act, y, total; } Layout;

static Layout layout(int64_t M, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t I) {
    Layout o;
    o.x = 0;
    o.wide = o.x + M * N;
    o.q = o.wide + M * max2((H + 2 * Hkv) * D, 2 * I);
    o.attn = o.q + M * H * D;
    o.act = o.attn + M * H * D;
    o.y = o.act + M * I;
    o.total = o.y + M * N;
    return o;
}

int64_t skv_fused_decode_scratch_floats(int64_t M, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t I) {
    return layout(M, N, H, Hkv, D, I).total;
}

int skv_fused_decode_layers(const skv_layer *layers, int64_t n, const skv_step *s) {
    const int64_t M = s->M, N = s->hidden, H = s->H, Hkv = s->Hkv, D = s->D, I = s->intermediate;
    if (N % 8 || D % 16 || I % 8 || M < 1) return -1;
    const Layout o = layout(M, N, H, Hkv, D, I);
    float *x = s->scratch + o.x, *wide = s->scratch + o.wide, *q = s->scratch + o.q, *attn = s->scratch + o.attn,
          *act = s->scratch + o.act, *y = s->scratch + o.y;
    const int64_t head = s->num_blocks * s->block_size * D, owner_stride = 2 * Hkv * head, g = s->gemv_rows;
    const int T = s->nthreads;
    for (int64_t li = 0; li < n; li++) {
        const skv_layer *L = &layers[li];
        const int64_t heads = L->swiftkv ? H : H + 2 * Hkv, row = heads * D; /* [q | k | v] row width */
        int rc = skv_rms_norm(s->h, N, L->input_norm, x, M, N, s->eps, T, 0);
        if (!rc) rc = skv_linear(&L->q, x, M, wide, row, g, s->gemm_bf16, T);
        if (!rc && !L->swiftkv) rc = skv_linear(&L->k, x, M, wide + H * D, row, g, s->gemm_bf16, T);
        if (!rc && !L->swiftkv) rc = skv_linear(&L->v, x, M, wide + (H + Hkv) * D, row, g, s->gemm_bf16, T);
        if (!rc) rc = skv_rotary_inplace(wide, M, L->swiftkv ? H : H + Hkv, D, row, s->cos, s->sin, T, 0);
        if (rc) return rc;
        const int64_t kc = L->owner * owner_stride, vc = kc + Hkv * head; /* element offsets in the cache */
        for (int64_t m = 0; m < M; m++) {
            memcpy(q + m * H * D, wide + m * row, sizeof(float) * H * D);
            if (!L->swiftkv)
                for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                    put_row(s->kv_cache, kc + kvh * head + s->slots[m] * D, wide + m * row + (H + kvh) * D, D, s->kv_bf16);
                    put_row(s->kv_cache, vc + kvh * head + s->slots[m] * D, wide + m * row + (H + Hkv + kvh) * D, D,
                            s->kv_bf16);
                }
        }
        const int64_t esize = s->kv_bf16 ? 2 : 4;
        const skv_paged_attn pa = {q, attn, (char *)s->kv_cache + kc * esize, (char *)s->kv_cache + vc * esize,
                                   s->block_tables, NULL, s->kv_lens, M, H, Hkv, D, s->num_blocks, s->block_size,
                                   s->max_blocks, 1.0f / sqrtf((float)D), s->kv_bf16, T};
        rc = skv_paged_decode_attention(&pa);
        if (!rc) rc = skv_linear(&L->o, attn, M, y, N, g, s->gemm_bf16, T);
        if (rc) return rc;
        add_into(s->h, y, M * N);
        rc = skv_rms_norm(s->h, N, L->post_norm, x, M, N, s->eps, T, 0);
        if (!rc) rc = skv_linear(&L->gate, x, M, wide, 2 * I, g, s->gemm_bf16, T);
        if (!rc) rc = skv_linear(&L->up, x, M, wide + I, 2 * I, g, s->gemm_bf16, T);
        if (!rc) rc = skv_silu_and_mul(wide, wide + I, 2 * I, act, M, I, T, 0);
        if (!rc) rc = skv_linear(&L->down, act, M, y, N, g, s->gemm_bf16, T);
        if (rc) return rc;
        add_into(s->h, y, M * N);
    }
    return 0;
}

int skv_fused_decode_store_kv(const skv_store_kv *d, const skv_step *s) {
    const int64_t M = s->M, N = s->hidden, Hkv = s->Hkv, D = s->D, row = d->n * 2 * Hkv * D;
    if (N % 8 || D % 16 || M < 1) return -1;
    for (int64_t j = 0; j < 2 * d->n; j++)
        if (d->kv[j].out_features != Hkv * D) return -1;
    float *x = s->scratch, *kv = x + M * N; /* kv [M, row]: [k_0 | v_0 | k_1 | v_1 | ...] per token */
    int rc = skv_rms_norm(s->h, N, d->norm, x, M, N, s->eps, s->nthreads, 0);
    for (int64_t j = 0; !rc && j < 2 * d->n; j++)
        rc = skv_linear(&d->kv[j], x, M, kv + j * Hkv * D, row, s->gemv_rows, s->gemm_bf16, s->nthreads);
    for (int64_t j = 0; !rc && j < d->n; j++) /* the K heads of leader j: Hkv rows of D, `row` apart */
        rc = skv_rotary_inplace(kv + j * 2 * Hkv * D, M, Hkv, D, row, s->cos, s->sin, s->nthreads, 0);
    if (rc) return rc;
    const int64_t head = s->num_blocks * s->block_size * D;
    for (int64_t j = 0; j < d->n; j++) {
        const int64_t kc = d->owners[j] * 2 * Hkv * head, vc = kc + Hkv * head;
        for (int64_t m = 0; m < M; m++)
            for (int64_t h = 0; h < Hkv; h++) {
                put_row(s->kv_cache, kc + h * head + s->slots[m] * D, kv + m * row + (j * 2 * Hkv + h) * D, D,
                        s->kv_bf16);
                put_row(s->kv_cache, vc + h * head + s->slots[m] * D, kv + m * row + ((j * 2 + 1) * Hkv + h) * D, D,
                        s->kv_bf16);
            }
    }
    return 0;
}

int64_t skv_fused_decode_store_kv_scratch_floats(int64_t M, int64_t N, int64_t row) { return M * (N + row); }
