/* The decode attention of skv_paged_attention.c with AVX512-BF16 dot products, for a bf16 cache (D % 64 == 0) on a
 * CPU with avx512_bf16, one (sequence, KV head) item at a time:
 *   scores: the group's queries rounded to bf16, each cached key row multiplied in place (32 products per
 *           vdpbf16ps, fp32 sums), sixteen keys' sums reduced together; scaled in fp32, in log2 units;
 *   softmax: sixteen keys per instruction, 2^x (skv_vexp2_16);
 *   values: the probabilities rounded to bf16 as pairs of keys (as the prefill kernel and flash attention do for
 *           bf16 models), the two keys' value rows interleaved into pairs per dim, up to four heads x 64 dims of
 *           accumulators in registers; every sum fp32.
 * Within 2^-9 max|V| of exact attention (the probabilities' rounding). Compiled for these instructions through
 * function attributes only: call it only where the CPU has them. */
#include "skv_paged_attention.h"
#include "skv_vec.h"
#include "skv_vec512.h"

#ifdef SKV_BF16_TARGET
#define BF16_TARGET SKV_BF16_TARGET
#define LOG2E 1.44269504088896341f
#define HC 4 /* query heads per pass over the values (HC x 4 accumulators + 4 value vectors in registers) */

/* element offset of token t's row in one head's region */
#define ROW(t) ((table[(t) / block_size] * block_size + (t) % block_size) * D)

/* the sums of a[0..15] in one vector (lane j: sum of a[j]): pairs of vectors added across halves, four times */
BF16_TARGET static inline __m512 hsum16(__m512 *a) {
    for (int w = 8; w >= 1; w /= 2) /* a[j] += a[j + w], each half of the lanes from one side */
        for (int j = 0; j < w; j++) {
            const __m512i lo = w == 8 ? _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0)
                             : w == 4 ? _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0)
                             : w == 2 ? _mm512_set_epi32(29, 28, 13, 12, 25, 24, 9, 8, 21, 20, 5, 4, 17, 16, 1, 0)
                                      : _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
            const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(w == 8 ? 8 : w == 4 ? 4 : w == 2 ? 2 : 1));
            a[j] = _mm512_add_ps(_mm512_permutex2var_ps(a[j], lo, a[j + w]), _mm512_permutex2var_ps(a[j], hi, a[j + w]));
        }
    return a[0];
}

/* s[t] = sc * qb . K[t] for t < n (qb: D bf16; K rows read in place), sixteen keys at a time */
BF16_TARGET static void scores16(const uint16_t *qb, const uint16_t *kh, const int64_t *table, int64_t block_size,
                                 int64_t D, int64_t n, float sc, float *s) {
    const __m512 vsc = _mm512_set1_ps(sc);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            const uint16_t *k = kh + ROW(t + j);
            acc[j] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 32)
                acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(qb + d), (__m512bh)_mm512_loadu_si512(k + d));
        }
        _mm512_storeu_ps(s + t, _mm512_mul_ps(hsum16(acc), vsc));
    }
    for (; t < n; t++) {
        const uint16_t *k = kh + ROW(t);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 32)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + d), (__m512bh)_mm512_loadu_si512(k + d));
        s[t] = _mm512_reduce_add_ps(acc) * sc;
    }
}

/* s[t] = 2^(s[t] - max s) for t < n, then rounded to bf16 pairs of keys in place (uint32 j2 = keys 2 j2, 2 j2 + 1; a
 * missing last key: 0); returns the sum of the fp32 values */
BF16_TARGET static float softmax_pairs(float *s, int64_t n) {
    __m512 vmx = _mm512_set1_ps(s[0]);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + t));
    float mx = _mm512_reduce_max_ps(vmx);
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;
    vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t < n; t += 16) {
        const __mmask16 k = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(k, skv_vexp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), vmx)));
        _mm512_mask_storeu_ps(s + t, k, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    uint32_t *p = (uint32_t *)s; /* pair j2 overwrites score j2 <= 2 j2, already read */
    for (int64_t j2 = 0; j2 < (n + 1) / 2; j2++)
        p[j2] = skv_to_bf16(s[2 * j2]) | (uint32_t)(2 * j2 + 1 < n ? skv_to_bf16(s[2 * j2 + 1]) : 0) << 16;
    return _mm512_reduce_add_ps(vsum);
}

/* acc[g][0:64] (g < hc, 64 dims from c) = sum_t p[g][t] V[t][c:c+64] over pairs of keys (p: bf16 pairs, n2 of them
 * per head, heads pstride uint32 apart) */
BF16_TARGET static inline __attribute__((always_inline)) void values_pass(const uint32_t *p, int64_t pstride, int hc,
                                                                          const uint16_t *vh, const int64_t *table,
                                                                          int64_t block_size, int64_t D, int64_t c,
                                                                          int64_t n, __m512 acc[HC][4]) {
    for (int64_t t = 0; t < n; t += 2) {
        const uint16_t *v0 = vh + ROW(t) + c, *v1 = t + 1 < n ? vh + ROW(t + 1) + c : NULL;
        __m512bh vp[4];
        for (int i = 0; i < 4; i++)
            vp[i] = (__m512bh)skv_pairs16(_mm256_loadu_si256((const __m256i *)(v0 + 16 * i)),
                                      v1 ? _mm256_loadu_si256((const __m256i *)(v1 + 16 * i)) : _mm256_setzero_si256());
        for (int g = 0; g < hc; g++) {
            const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)p[g * pstride + t / 2]);
            for (int i = 0; i < 4; i++) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], pp, vp[i]);
        }
    }
}

BF16_TARGET int skv_decode_item_bf16(const float *q, const uint16_t *kh, const uint16_t *vh, const int64_t *table,
                                     int64_t n, float *out, int64_t group, int64_t D, int64_t block_size, float scale,
                                     float *scores, float *work) {
    if (D % 64) return -1; /* 64 dims per pass over the values */
    uint16_t *qb = (uint16_t *)work;
    for (int64_t i = 0; i < group * D; i++) qb[i] = skv_to_bf16(q[i]);
    float total[group];
    for (int64_t g = 0; g < group; g++) {
        scores16(qb + g * D, kh, table, block_size, D, n, scale * LOG2E, scores + g * n);
        total[g] = softmax_pairs(scores + g * n, n);
    }
    const uint32_t *p = (const uint32_t *)scores;
    for (int64_t g0 = 0; g0 < group; g0 += HC)
        for (int64_t c = 0; c < D; c += 64) {
            const int hc = group - g0 < HC ? (int)(group - g0) : HC;
            __m512 acc[HC][4];
            for (int g = 0; g < HC; g++)
                for (int i = 0; i < 4; i++) acc[g][i] = _mm512_setzero_ps();
            switch (hc) { /* a constant head count per call: the loops unroll */
                case 1: values_pass(p + g0 * n, n, 1, vh, table, block_size, D, c, n, acc); break;
                case 2: values_pass(p + g0 * n, n, 2, vh, table, block_size, D, c, n, acc); break;
                case 3: values_pass(p + g0 * n, n, 3, vh, table, block_size, D, c, n, acc); break;
                default: values_pass(p + g0 * n, n, 4, vh, table, block_size, D, c, n, acc); break;
            }
            for (int g = 0; g < hc; g++) {
                const __m512 inv = _mm512_set1_ps(1.f / total[g0 + g]);
                for (int i = 0; i < 4; i++)
                    _mm512_storeu_ps(out + (g0 + g) * D + c + 16 * i, _mm512_mul_ps(acc[g][i], inv));
            }
        }
    return 0;
}
#else
int skv_decode_item_bf16(const float *q, const uint16_t *kh, const uint16_t *vh, const int64_t *table, int64_t n,
                         float *out, int64_t group, int64_t D, int64_t block_size, float scale, float *scores,
                         float *work) {
    return -1; /* this compiler cannot emit the instructions: the caller runs the AVX2 form */
}
#endif
