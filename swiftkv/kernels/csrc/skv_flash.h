/* What the prefill attention kernels share (skv_paged_prefill.c: fp32 FMAs; skv_paged_prefill_bf16.c: AVX512-BF16
 * dot products): the work items of a call and one chunk's online softmax over a tile's rows held transposed. */
#ifndef SKV_FLASH_H
#define SKV_FLASH_H
#include <stddef.h>

#include "skv_paged_attention.h"
#include "skv_vec.h"

#define SKV_FLASH_TILE_ROWS 64 /* query rows (token x head) per work item, before rounding up */
#define SKV_FLASH_CHUNK_KEYS 64 /* keys per online-softmax step: whole blocks, at least one */
#define SKV_FLASH_NEG (-1e30f) /* the score of a masked key */

/* One work item: query tokens [t0, t0 + nq) of a sequence (query 0 at key position p0), the group's heads of KV
 * head kvh (q, out point at the sequence's first query token, [tokens, H, D], fp32, or bf16 where q_bf16; kh, vh
 * at that KV head's region). */
typedef struct {
    const void *q;
    void *out;
    int64_t t0, nq, p0, kvh, group, H, D;
    const void *kh, *vh;
    const int64_t *table;
    int64_t block_size, chunk; /* chunk: keys per softmax step */
    float scale;
    int bf16;   /* the cache's rows are bf16 */
    int q_bf16; /* q and out are bf16 (the AVX512-BF16 kernel only) */
} skv_flash_item;

/* runs one item with `scratch`: this thread's, of the size the variant's skv_flash_scratch gave */
typedef void (*skv_flash_tile)(const skv_flash_item *it, void *scratch);
/* bytes of scratch an item of at most `rows` query rows (token x head) needs */
typedef size_t (*skv_flash_scratch)(int64_t D, int64_t rows, int64_t chunk);

/* Every (sequence, KV head, tile of query tokens) item of the call across a->nthreads threads, the longest first.
 * Returns 0, -1 for shapes it cannot take, -2 when out of memory. */
int skv_flash_run(const skv_paged_attn *a, skv_flash_tile tile, skv_flash_scratch scratch_bytes);

/* keys per softmax step for this block size (whole blocks, at least SKV_FLASH_CHUNK_KEYS unless a block is longer) */
static inline int64_t skv_flash_chunk(int64_t block_size) {
    return block_size >= SKV_FLASH_CHUNK_KEYS ? block_size : SKV_FLASH_CHUNK_KEYS / block_size * block_size;
}

/* The online softmax of one chunk, eight rows per instruction: st [n][R] holds the n keys' (from key k0) scores
 * of the R rows (R % 8 == 0) and gets their exp(s - max), exact 0 where masked; m, l: each row's running maximum
 * and sum; lim: each row's last visible key (`masked`: some key of the chunk is right of some row's); alpha: the
 * factor each row's output so far must take for the new maximum (the P.V step applies it as it loads them). */
static inline __attribute__((always_inline)) void skv_flash_softmax(float *st, int64_t R, int64_t n, int64_t k0,
                                                                    int masked, const float *lim, float *m, float *l,
                                                                    float *alpha) {
    for (int64_t i = 0; i < R / 8; i++) {
        float *s = st + 8 * i;
        const __m256 lm = _mm256_loadu_ps(lim + 8 * i), m_old = _mm256_loadu_ps(m + 8 * i);
        __m256 m_new = m_old;
        for (int64_t j = 0; j < n; j++) {
            __m256 sj = _mm256_loadu_ps(s + j * R);
            if (masked) {
                sj = _mm256_blendv_ps(sj, _mm256_set1_ps(SKV_FLASH_NEG),
                                      _mm256_cmp_ps(_mm256_set1_ps((float)(k0 + j)), lm, _CMP_GT_OQ));
                _mm256_storeu_ps(s + j * R, sj);
            }
            m_new = _mm256_max_ps(m_new, sj);
        }
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 sj = _mm256_loadu_ps(s + j * R);
            __m256 p = skv_vexp(_mm256_sub_ps(sj, m_new));
            if (masked) p = _mm256_and_ps(p, _mm256_cmp_ps(sj, _mm256_set1_ps(SKV_FLASH_NEG), _CMP_GT_OQ)); /* exact 0 */
            _mm256_storeu_ps(s + j * R, p);
            sum = _mm256_add_ps(sum, p);
        }
        const __m256 a = skv_vexp(_mm256_sub_ps(m_old, m_new));
        _mm256_storeu_ps(l + 8 * i, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8 * i), a, sum));
        _mm256_storeu_ps(m + 8 * i, m_new);
        _mm256_storeu_ps(alpha + 8 * i, a);
    }
}
#endif
