/* Decode attention read in place from a paged KV cache: one query token per sequence. */
#ifndef SKV_PAGED_ATTENTION_H
#define SKV_PAGED_ATTENTION_H
#include <stdint.h>

/* q, out [B, H, D] fp32; k_cache, v_cache [Hkv, num_blocks, block_size, D] (one KV owner's K and V), fp32,
 * or bf16 when kv_bf16; block_tables [B, max_blocks]; kv_lens [B] (>= 1). Returns 0, -1 for shapes it cannot
 * take, -2 when out of memory. */
int skv_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                               const int64_t *block_tables, const int64_t *kv_lens, float *out, int64_t B, int64_t H,
                               int64_t Hkv, int64_t D, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                               float scale, int64_t kv_bf16, int nthreads);
#endif
