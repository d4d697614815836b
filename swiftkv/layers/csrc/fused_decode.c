/* Decoder layers of a decode step in one native call (see fused_decode.py): for each layer, RMSNorm,
 * the fused q/k/v projection, rotary, the K/V store into the paged cache, paged attention, o_proj and
 * residual, RMSNorm, gate/up, SiLU-and-mul, down and residual -- the same kernels the layers call one
 * by one from Python (included here as one translation unit), without ~20 Python calls per layer.
 * fp32 activations, compact (blocked8 / bf16) weights, AVX2 + FMA, OpenMP inside each kernel. */
#include <string.h>

#include "compact_gemm.c"
#include "compact_gemv.c"
#include "elementwise.c"
#include "paged_attention.c"

typedef struct {
    int64_t kind; /* 0: blocked8 (q uint8 codes, scale, offset); 1: bf16 (q bf16 bits) */
    const void *q;
    const float *scale, *offset, *bias; /* bias may be NULL */
    int64_t out_features, in_features;
} Weight;

typedef struct {
    const float *input_norm, *post_norm;
    Weight qkv;      /* [q; k; v], or q only (swiftkv = 1: K/V were stored from SingleInputKV) */
    Weight o, gate_up, down;
    int64_t owner;   /* KV owner whose cache this layer reads (and writes unless swiftkv) */
    int64_t swiftkv;
} Layer;

typedef struct {
    int64_t M, hidden, H, Hkv, D, intermediate;
    float eps;
    float *h;                          /* [M, hidden] residual stream, updated in place */
    const float *cos, *sin;            /* [M, D] */
    float *kv_cache;                   /* [owners, 2, Hkv, num_blocks, block_size, D] */
    int64_t num_blocks, block_size, max_blocks;
    const int64_t *slots;              /* [M] cache slot of each token (read only by layers that store) */
    const int64_t *block_tables;       /* [M, max_blocks] */
    const int64_t *kv_lens;            /* [M] */
    float *scratch;                    /* fused_decode_scratch_floats(...) floats */
    int64_t gemv_rows;                 /* up to this many rows: gemv; above: the panel GEMM */
    int nthreads;
} Step;

/* y [M, O] = x [M, I] W^T (+ bias); xsum: scratch of M * I / 32 floats */
static int linear(const Weight *w, const float *x, int64_t M, float *y, float *xsum, const Step *s) {
    const int64_t I = w->in_features, O = w->out_features;
    int rc;
    if (M <= s->gemv_rows && w->kind == 0) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < I / 32; b++) {
                float t = 0.f;
                for (int64_t i = 0; i < 32; i++) t += x[m * I + b * 32 + i];
                xsum[m * (I / 32) + b] = t;
            }
        rc = blocked_gemv(x, xsum, M, I, w->q, w->scale, w->offset, y, O, s->nthreads);
    } else if (M <= s->gemv_rows) {
        rc = bf16_gemv(x, M, I, w->q, y, O, s->nthreads);
    } else {
        rc = compact_gemm((int)w->kind, x, M, I, w->q, w->scale, w->offset, y, O, s->nthreads);
    }
    if (rc == 0 && w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < O; o++) y[m * O + o] += w->bias[o];
    return rc;
}

static void add_into(float *h, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(y + i)));
}

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Where each buffer of a step's scratch starts (in floats), and the total: x, y [M, hidden]; the
 * projection outputs [M, widest]; q, attention [M, H D]; SiLU(gate) * up [M, I]; block sums of a
 * blocked8 input [M, widest input / 32]. One place for the sizes and the carving. */
typedef struct { int64_t x, wide, q, attn, act, y, xsum, total; } Layout;

static Layout layout(int64_t M, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t I) {
    Layout o;
    o.x = 0;
    o.wide = o.x + M * N;
    o.q = o.wide + M * max3((H + 2 * Hkv) * D, 2 * I, 0);
    o.attn = o.q + M * H * D;
    o.act = o.attn + M * H * D;
    o.y = o.act + M * I;
    o.xsum = o.y + M * N;
    o.total = o.xsum + M * (max3(N, H * D, I) / 32 + 1);
    return o;
}

int64_t fused_decode_scratch_floats(int64_t M, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t I) {
    return layout(M, N, H, Hkv, D, I).total;
}

/* Layers layers[0..n) on the step's M tokens (one per sequence). Returns 0, or the first failing
 * kernel's code (-1 bad shapes, -2 out of memory). */
int fused_decode_layers(const Layer *layers, int64_t n, const Step *s) {
    const int64_t M = s->M, N = s->hidden, H = s->H, Hkv = s->Hkv, D = s->D, I = s->intermediate;
    if (N % 8 || D % 16 || I % 8 || M < 1) return -1;
    const Layout o = layout(M, N, H, Hkv, D, I);
    float *x = s->scratch + o.x, *wide = s->scratch + o.wide, *q = s->scratch + o.q, *attn = s->scratch + o.attn,
          *act = s->scratch + o.act, *y = s->scratch + o.y, *xsum = s->scratch + o.xsum;
    const int64_t head = s->num_blocks * s->block_size * D, owner_stride = 2 * Hkv * head;
    for (int64_t li = 0; li < n; li++) {
        const Layer *L = &layers[li];
        const int64_t heads = L->swiftkv ? H : H + 2 * Hkv, row = heads * D; /* qkv row width */
        int rc = rms_norm(s->h, N, L->input_norm, x, M, N, s->eps, s->nthreads);
        if (!rc) rc = linear(&L->qkv, x, M, wide, xsum, s);
        if (!rc) rc = rotary_inplace(wide, M, L->swiftkv ? H : H + Hkv, D, row, s->cos, s->sin, s->nthreads);
        if (rc) return rc;
        float *kc = s->kv_cache + L->owner * owner_stride, *vc = kc + Hkv * head;
        for (int64_t m = 0; m < M; m++) {
            memcpy(q + m * H * D, wide + m * row, sizeof(float) * H * D);
            if (!L->swiftkv)
                for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                    memcpy(kc + kvh * head + s->slots[m] * D, wide + m * row + (H + kvh) * D, sizeof(float) * D);
                    memcpy(vc + kvh * head + s->slots[m] * D, wide + m * row + (H + Hkv + kvh) * D, sizeof(float) * D);
                }
        }
        rc = paged_decode_attention(q, kc, vc, s->block_tables, s->kv_lens, attn, M, H, Hkv, D, s->num_blocks,
                                    s->block_size, s->max_blocks, 1.0f / sqrtf((float)D), s->nthreads);
        if (!rc) rc = linear(&L->o, attn, M, y, xsum, s);
        if (rc) return rc;
        add_into(s->h, y, M * N);
        rc = rms_norm(s->h, N, L->post_norm, x, M, N, s->eps, s->nthreads);
        if (!rc) rc = linear(&L->gate_up, x, M, wide, xsum, s);
        if (!rc) rc = silu_and_mul(wide, act, M, I, s->nthreads);
        if (!rc) rc = linear(&L->down, act, M, y, xsum, s);
        if (rc) return rc;
        add_into(s->h, y, M * N);
    }
    return 0;
}

typedef struct {
    const float *norm;  /* norm_swiftkv */
    Weight kv;          /* [k_0; v_0; k_1; v_1; ...] of the group leaders, from the layer-l input */
    const int64_t *owners; /* [n] KV owner of each leader */
    int64_t n;
} StoreKV;

/* SingleInputKV: the K/V of every later KV owner from the residual stream entering layer l (s->h, not
 * modified): RMSNorm, one projection for all leaders, rotary on each K, the store into the cache. */
int fused_decode_store_kv(const StoreKV *d, const Step *s) {
    const int64_t M = s->M, N = s->hidden, Hkv = s->Hkv, D = s->D, row = d->n * 2 * Hkv * D;
    if (N % 8 || D % 16 || M < 1 || d->kv.out_features != row) return -1;
    float *x = s->scratch, *kv = x + M * N, *xsum = kv + M * row;
    int rc = rms_norm(s->h, N, d->norm, x, M, N, s->eps, s->nthreads);
    if (!rc) rc = linear(&d->kv, x, M, kv, xsum, s);
    for (int64_t j = 0; !rc && j < d->n; j++) /* the K heads of leader j: Hkv rows of D, `row` apart */
        rc = rotary_inplace(kv + j * 2 * Hkv * D, M, Hkv, D, row, s->cos, s->sin, s->nthreads);
    if (rc) return rc;
    const int64_t head = s->num_blocks * s->block_size * D;
    for (int64_t j = 0; j < d->n; j++) {
        float *kc = s->kv_cache + d->owners[j] * 2 * Hkv * head, *vc = kc + Hkv * head;
        for (int64_t m = 0; m < M; m++)
            for (int64_t h = 0; h < Hkv; h++) {
                memcpy(kc + h * head + s->slots[m] * D, kv + m * row + (j * 2 * Hkv + h) * D, sizeof(float) * D);
                memcpy(vc + h * head + s->slots[m] * D, kv + m * row + ((j * 2 + 1) * Hkv + h) * D, sizeof(float) * D);
            }
    }
    return 0;
}

/* Floats of scratch fused_decode_store_kv needs for M rows. */
int64_t fused_decode_store_kv_scratch_floats(int64_t M, int64_t N, int64_t row) { return M * (N + row + N / 32 + 1); }
