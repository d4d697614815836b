/* Decoder layers of a decode step in one native call (see skv_fused_decode.h): for each layer, RMSNorm,
 * the q/k/v projections, rotary, the K/V store into the paged cache, paged attention, o_proj and
 * residual, RMSNorm, gate/up, SiLU-and-mul, down and residual -- the same kernels the layers call one by
 * one from Python, without ~20 Python calls per layer. AVX2 + FMA; one OpenMP region per call, each kernel doing
 * its slot's share (skv_team.h) between spin barriers. */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "skv_elementwise.h"
#include "skv_fused_decode.h"
#include "skv_linear.h"
#include "skv_paged_attention.h"
#include "skv_vec.h"

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

/* A step's team: one region of s->nthreads threads for the whole call, a spin barrier between dependent ops.
 * An op's error is kept in *rc (the first one) and the later ops are skipped, but every slot still meets every
 * barrier, so no slot waits for one that left. */
typedef struct {
    skv_team t;
    atomic_int *rc;
} Team;

static void keep(const Team *T, int r) {
    int none = 0;
    if (r) atomic_compare_exchange_strong(T->rc, &none, r);
}

static int failed(const Team *T) { return atomic_load_explicit(T->rc, memory_order_acquire) != 0; }

/* y's outputs of this slot, added into h (rows `n` wide): the residual of o_proj and down without a barrier */
static void linear_into(const Team *T, const skv_weight *w, const float *x, int64_t M, float *y, float *h, int64_t n,
                        const skv_step *s) {
    int64_t lo, hi;
    if (failed(T)) return;
    keep(T, skv_linear_team(&T->t, w, x, M, y, n, s->gemv_rows, s->dots, &lo, &hi));
    for (int64_t m = 0; m < M; m++)
        for (int64_t o = lo; o < hi; o++) h[m * n + o] += y[m * n + o];
}

static void linear(const Team *T, const skv_weight *w, const float *x, int64_t M, float *y, int64_t ldy,
                   const skv_step *s) {
    int64_t lo, hi;
    if (!failed(T)) keep(T, skv_linear_team(&T->t, w, x, M, y, ldy, s->gemv_rows, s->dots, &lo, &hi));
}

/* the elementwise ops' form for the step's fp32 rows (skv_elementwise.h) */
static inline int ew_form(const skv_step *s) { return (s->dots & SKV_STEP_EW512) ? SKV_EW_AVX512 : 0; }

static void rms_norm(const Team *T, const float *x, const float *w, float *out, const skv_step *s) {
    int64_t lo, hi;
    skv_team_range(&T->t, s->M, 1, &lo, &hi);
    if (!failed(T)) skv_rms_norm_part(x, s->hidden, w, out, s->hidden, s->eps, ew_form(s), lo, hi);
}

static void rotary(const Team *T, float *x, int64_t heads, int64_t row, const skv_step *s) {
    int64_t lo, hi;
    skv_team_range(&T->t, s->M * heads, 1, &lo, &hi);
    if (!failed(T)) skv_rotary_part(x, heads, s->D, row, s->cos, s->sin, ew_form(s), lo, hi);
}

static void layers_of_slot(const Team *T, const skv_layer *layers, int64_t n, const skv_step *s) {
    const int64_t M = s->M, N = s->hidden, H = s->H, Hkv = s->Hkv, D = s->D, I = s->intermediate;
    const Layout o = layout(M, N, H, Hkv, D, I);
    float *x = s->scratch + o.x, *wide = s->scratch + o.wide, *q = s->scratch + o.q, *attn = s->scratch + o.attn,
          *act = s->scratch + o.act, *y = s->scratch + o.y;
    const int64_t head = s->num_blocks * s->block_size * D, owner_stride = 2 * Hkv * head, esize = s->kv_bf16 ? 2 : 4;
    const skv_team *t = &T->t;
    int64_t lo, hi;
    for (int64_t li = 0; li < n; li++) {
        const skv_layer *L = &layers[li];
        const int64_t heads = L->swiftkv ? H : H + 2 * Hkv, row = heads * D; /* [q | k | v] row width */
        rms_norm(T, s->h, L->input_norm, x, s);
        skv_team_sync(t);
        linear(T, &L->q, x, M, wide, row, s);
        if (!L->swiftkv) {
            linear(T, &L->k, x, M, wide + H * D, row, s);
            linear(T, &L->v, x, M, wide + (H + Hkv) * D, row, s);
        }
        skv_team_sync(t);
        rotary(T, wide, L->swiftkv ? H : H + Hkv, row, s);
        skv_team_sync(t);
        const int64_t kc = L->owner * owner_stride, vc = kc + Hkv * head; /* element offsets in the cache */
        skv_team_range(t, M, 1, &lo, &hi);
        for (int64_t m = lo; m < hi && !failed(T); m++) {
            memcpy(q + m * H * D, wide + m * row, sizeof(float) * H * D);
            if (!L->swiftkv)
                for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                    put_row(s->kv_cache, kc + kvh * head + s->slots[m] * D, wide + m * row + (H + kvh) * D, D, s->kv_bf16);
                    put_row(s->kv_cache, vc + kvh * head + s->slots[m] * D, wide + m * row + (H + Hkv + kvh) * D, D,
                            s->kv_bf16);
                }
        }
        skv_team_sync(t);
        if (!failed(T)) {
            const skv_paged_attn pa = {q, attn, (char *)s->kv_cache + kc * esize, (char *)s->kv_cache + vc * esize,
                                       s->block_tables, NULL, s->kv_lens, M, H, Hkv, D, s->num_blocks, s->block_size,
                                       s->max_blocks, 1.0f / sqrtf((float)D), s->kv_bf16,
                                       (s->dots & SKV_DOT_BF16) != 0, 0, 1};
            keep(T, skv_paged_decode_attention_team(t, &pa));
        }
        skv_team_sync(t);
        linear_into(T, &L->o, attn, M, y, s->h, N, s);
        skv_team_sync(t);
        rms_norm(T, s->h, L->post_norm, x, s);
        skv_team_sync(t);
        linear(T, &L->gate, x, M, wide, 2 * I, s);
        linear(T, &L->up, x, M, wide + I, 2 * I, s);
        skv_team_sync(t);
        skv_team_range(t, I, 8, &lo, &hi);
        if (!failed(T)) skv_silu_and_mul_part(wide, wide + I, 2 * I, act, M, I, ew_form(s), lo, hi);
        skv_team_sync(t);
        linear_into(T, &L->down, act, M, y, s->h, N, s);
        skv_team_sync(t);
    }
}

static void store_kv_of_slot(const Team *T, const skv_store_kv *d, const skv_step *s) {
    const int64_t M = s->M, N = s->hidden, Hkv = s->Hkv, D = s->D, row = d->n * 2 * Hkv * D;
    float *x = s->scratch, *kv = x + M * N; /* kv [M, row]: [k_0 | v_0 | k_1 | v_1 | ...] per token */
    const skv_team *t = &T->t;
    rms_norm(T, s->h, d->norm, x, s);
    skv_team_sync(t);
    for (int64_t j = 0; j < 2 * d->n; j++) linear(T, &d->kv[j], x, M, kv + j * Hkv * D, row, s);
    skv_team_sync(t);
    int64_t lo, hi;
    skv_team_range(t, d->n * M * Hkv, 1, &lo, &hi); /* (leader, token, K head) */
    for (int64_t p = lo; p < hi && !failed(T); p++) {
        const int64_t j = p / (M * Hkv), rest = p % (M * Hkv);
        skv_rotary_part(kv + j * 2 * Hkv * D, Hkv, D, row, s->cos, s->sin, ew_form(s), rest, rest + 1);
    }
    skv_team_sync(t);
    const int64_t head = s->num_blocks * s->block_size * D;
    skv_team_range(t, M, 1, &lo, &hi);
    for (int64_t j = 0; j < d->n && !failed(T); j++) {
        const int64_t kc = d->owners[j] * 2 * Hkv * head, vc = kc + Hkv * head;
        for (int64_t m = lo; m < hi; m++)
            for (int64_t h = 0; h < Hkv; h++) {
                put_row(s->kv_cache, kc + h * head + s->slots[m] * D, kv + m * row + (j * 2 * Hkv + h) * D, D,
                        s->kv_bf16);
                put_row(s->kv_cache, vc + h * head + s->slots[m] * D, kv + m * row + ((j * 2 + 1) * Hkv + h) * D, D,
                        s->kv_bf16);
            }
    }
}

/* a SwiftKV decode step: layers 0..l-1, SingleInputKV's store from their output (s->h then), layers l..n-1 */
static void swiftkv_of_slot(const Team *T, const skv_layer *layers, int64_t l, int64_t n, const skv_store_kv *d,
                            const skv_step *s) {
    layers_of_slot(T, layers, l, s);
    store_kv_of_slot(T, d, s);
    skv_team_sync(&T->t); /* its K/V in the cache, its scratch free, before layer l reads either */
    layers_of_slot(T, layers + l, n - l, s);
}

/* one parallel region for the whole call: `body` runs on every slot */
#define STEP_REGION(body)                                                                                 \
    atomic_int rc = 0;                                                                                    \
    skv_barrier barrier = {0, 0, 0};                                                                      \
    _Pragma("omp parallel num_threads(s->nthreads)") {                                                    \
        _Pragma("omp single") {                                                                           \
            SKV_COUNT_REGION();                                                                           \
            barrier.n = omp_get_num_threads();                                                            \
        } /* (its implied barrier: every slot sees n) */                                                  \
        const Team T = {{omp_get_thread_num(), omp_get_num_threads(), &barrier}, &rc};                    \
        body;                                                                                             \
    }                                                                                                     \
    return atomic_load(&rc);

/* shapes the layers' kernels take (0), else -1 */
static int layers_take(const skv_step *s) {
    return s->hidden % 8 || s->D % 16 || s->intermediate % 8 || s->M < 1 || s->H % s->Hkv ? -1 : 0;
}

/* shapes the SingleInputKV store takes (0), else -1 */
static int store_takes(const skv_store_kv *d, const skv_step *s) {
    if (s->hidden % 8 || s->D % 16 || s->M < 1) return -1;
    for (int64_t j = 0; j < 2 * d->n; j++)
        if (d->kv[j].out_features != s->Hkv * s->D) return -1;
    return 0;
}

int skv_fused_decode_layers(const skv_layer *layers, int64_t n, const skv_step *s) {
    if (layers_take(s)) return -1;
    STEP_REGION(layers_of_slot(&T, layers, n, s))
}

int skv_fused_decode_store_kv(const skv_store_kv *d, const skv_step *s) {
    if (store_takes(d, s)) return -1;
    STEP_REGION(store_kv_of_slot(&T, d, s))
}

int skv_fused_decode_swiftkv(const skv_layer *layers, int64_t l, int64_t n, const skv_store_kv *d, const skv_step *s) {
    if (layers_take(s) || store_takes(d, s) || l < 0 || l > n) return -1;
    STEP_REGION(swiftkv_of_slot(&T, layers, l, n, d, s))
}

int64_t skv_fused_decode_store_kv_scratch_floats(int64_t M, int64_t N, int64_t row) { return M * (N + row); }
