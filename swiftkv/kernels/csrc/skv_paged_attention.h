/* Attention read in place from a paged KV cache: one query token per sequence (decode), or the last q_len
 * of each sequence's kv_len tokens, bottom-right causal (prefill, cached prefix, chunked prompt). */
#ifndef SKV_PAGED_ATTENTION_H
#define SKV_PAGED_ATTENTION_H
#include <stdint.h>

#include "skv_team.h"

/* One call's arguments (the Python side mirrors this struct with ctypes; skv_abi_layout checks it).
 * decode: q, out [S, H, D] fp32, one query token per sequence (q_lens unused);
 * prefill: q, out [sum(q_lens), H, D] fp32 (the sequences' query tokens, one after another), 1 <= q_lens[s] <=
 * kv_lens[s], block_size % 4 == 0. Both: k_cache, v_cache [Hkv, num_blocks, block_size, D] (one KV owner's K and
 * V), fp32, or bf16 when kv_bf16; block_tables [S, max_blocks]; kv_lens [S] (>= 1). */
typedef struct {
    const float *q;
    float *out;
    const void *k_cache, *v_cache;
    const int64_t *block_tables, *q_lens, *kv_lens;
    int64_t S, H, Hkv, D, num_blocks, block_size, max_blocks;
    float scale;
    int64_t kv_bf16;
    int64_t bf16_dot; /* decode over a bf16 cache with D % 64 == 0: AVX512-BF16 dot products (only on such a CPU) */
    int64_t q_bf16;   /* q and out hold bf16 (skv_paged_prefill_attention_bf16 only; the others refuse it) */
    int nthreads;
} skv_paged_attn;

/* Return 0, -1 for shapes they cannot take, -2 when out of memory. */
int skv_paged_decode_attention(const skv_paged_attn *a);
/* decode, slot t->ith's share of the (sequence, KV head) items, inside a team's region (a->nthreads unused) */
int skv_paged_decode_attention_team(const skv_team *t, const skv_paged_attn *a);
int skv_paged_prefill_attention(const skv_paged_attn *a);
/* one decode item (a sequence's query heads of one KV head) with AVX512-BF16 dot products (skv_paged_decode_bf16.c:
 * a bf16 cache, D % 64 == 0, only on a CPU with avx512_bf16): queries and probabilities rounded to bf16, fp32 sums;
 * scores [group * n] and work [2 * group * D] floats of scratch. -1 where it cannot (the AVX2 form then runs) */
int skv_decode_item_bf16(const float *q, const uint16_t *kh, const uint16_t *vh, const int64_t *table, int64_t n,
                         float *out, int64_t group, int64_t D, int64_t block_size, float scale, float *scores,
                         float *work);
/* the same with AVX512-BF16 dot products (skv_paged_prefill_bf16.c): a bf16 cache, D % 32 == 0, only on a CPU with
 * avx512_bf16; -1 also where the compiler could not build it (then use skv_paged_prefill_attention) */
int skv_paged_prefill_attention_bf16(const skv_paged_attn *a);
#endif
