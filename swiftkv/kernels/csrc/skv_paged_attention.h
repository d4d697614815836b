/* Attention read in place from a paged KV cache: one query token per sequence (decode), or the last q_len
 * of each sequence's kv_len tokens, bottom-right causal (prefill, cached prefix, chunked prompt). */
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

/* q, out [sum(q_lens), H, D] fp32 (the sequences' query tokens, one after another); the cache, block_tables as
 * above; q_lens, kv_lens [S] with 1 <= q_lens[s] <= kv_lens[s]; block_size % 4 == 0. Returns as above. */
int skv_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                                const int64_t *block_tables, const int64_t *q_lens, const int64_t *kv_lens, float *out,
                                int64_t S, int64_t H, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t block_size,
                                int64_t max_blocks, float scale, int64_t kv_bf16, int nthreads);
#endif
