/* A decode step's decoder layers in one call (see swiftkv/layers/fused_decode.py): one query token per
 * sequence over the paged KV cache (fp32, or bf16: stored rounded to nearest even), fp32 activations,
 * weights in their held form (skv_weight.h).
 * The Python side mirrors these structs (ctypes) and checks their layout against skv_abi_layout. */
#ifndef SKV_FUSED_DECODE_H
#define SKV_FUSED_DECODE_H
#include <stdint.h>

#include "skv_weight.h"

typedef struct {
    const float *input_norm, *post_norm;
    skv_weight q, k, v;  /* k.q == v.q == NULL on the SingleInputKV path (swiftkv = 1): K/V were stored */
    skv_weight o, gate, up, down;
    int64_t owner;       /* KV owner whose cache this layer reads (and writes unless swiftkv) */
    int64_t swiftkv;
} skv_layer;

typedef struct {
    int64_t M, hidden, H, Hkv, D, intermediate;
    float eps;
    float *h;                          /* [M, hidden] residual stream, updated in place */
    const float *cos, *sin;            /* [M, D] */
    void *kv_cache;                    /* [owners, 2, Hkv, num_blocks, block_size, D], fp32 or (kv_bf16) bf16 */
    int64_t num_blocks, block_size, max_blocks, kv_bf16;
    const int64_t *slots;              /* [M] cache slot of each token (read only where K/V are stored) */
    const int64_t *block_tables;       /* [M, max_blocks] */
    const int64_t *kv_lens;            /* [M] */
    float *scratch;                    /* skv_fused_decode_scratch_floats(...) floats */
    int64_t gemv_rows;                 /* up to this many rows: gemv; above: the panel GEMM */
    int64_t dots; /* SKV_DOT_* (skv_linear.h): a bf16 model's dot-product matmuls on this CPU; | SKV_STEP_EW512 */
    int nthreads;
} skv_step;

typedef struct {
    const float *norm;        /* norm_swiftkv */
    const skv_weight *kv;     /* [2 n]: k_0, v_0, k_1, v_1, ... of the group leaders, from the layer-l input */
    const int64_t *owners;    /* [n] KV owner of each leader */
    int64_t n;
} skv_store_kv;

/* floats of scratch skv_fused_decode_layers needs */
int64_t skv_fused_decode_scratch_floats(int64_t M, int64_t hidden, int64_t H, int64_t Hkv, int64_t D,
                                        int64_t intermediate);
/* layers[0..n) on the step's M tokens. Returns 0, or the first failing kernel's code (-1 bad shapes,
 * -2 out of memory). */
int skv_fused_decode_layers(const skv_layer *layers, int64_t n, const skv_step *s);
/* floats of scratch skv_fused_decode_store_kv needs */
int64_t skv_fused_decode_store_kv_scratch_floats(int64_t M, int64_t hidden, int64_t row);
/* SingleInputKV: the K/V of every later KV owner from the residual stream entering layer l (s->h, not
 * modified): RMSNorm, each leader's K and V projection, rotary on each K, the store into the cache. */
int skv_fused_decode_store_kv(const skv_store_kv *d, const skv_step *s);
/* A SwiftKV decode step in one call: layers[0..l), skv_fused_decode_store_kv from their output, layers[l..n).
 * Scratch: the larger of the two above. */
int skv_fused_decode_swiftkv(const skv_layer *layers, int64_t l, int64_t n, const skv_store_kv *d, const skv_step *s);
#define SKV_STEP_EW512 4 /* a `dots` bit (beside skv_linear.h's SKV_DOT_*): the elementwise ops' AVX-512 form (skv_elementwise.h) */
#endif
