/* The layout of every struct the Python side mirrors (ctypes), so a mismatch is caught when the library
 * is loaded instead of corrupting memory: skv_abi_layout(i, out, cap) writes sizeof and the offset of each
 * field of struct i, in declaration order, and returns how many numbers it wrote (-1: no such struct). */
#include <stddef.h>
#include <stdint.h>

#include "skv_elementwise.h"
#include "skv_fused_decode.h"
#include "skv_paged_attention.h"
#include "skv_team.h"
#include "skv_weight.h"

atomic_llong skv_regions_opened = 0;

int64_t skv_parallel_regions(void) { return atomic_load(&skv_regions_opened); }

#define PUT(x) if (n < cap) out[n++] = (int64_t)(x)

int64_t skv_abi_layout(int64_t which, int64_t *out, int64_t cap) {
    int64_t n = 0;
    switch (which) {
        case 0:
            PUT(sizeof(skv_weight)); PUT(offsetof(skv_weight, kind)); PUT(offsetof(skv_weight, q));
            PUT(offsetof(skv_weight, scale)); PUT(offsetof(skv_weight, offset)); PUT(offsetof(skv_weight, bias));
            PUT(offsetof(skv_weight, out_features)); PUT(offsetof(skv_weight, in_features));
            break;
        case 1:
            PUT(sizeof(skv_layer)); PUT(offsetof(skv_layer, input_norm)); PUT(offsetof(skv_layer, post_norm));
            PUT(offsetof(skv_layer, q)); PUT(offsetof(skv_layer, k)); PUT(offsetof(skv_layer, v));
            PUT(offsetof(skv_layer, o)); PUT(offsetof(skv_layer, gate)); PUT(offsetof(skv_layer, up));
            PUT(offsetof(skv_layer, down)); PUT(offsetof(skv_layer, owner)); PUT(offsetof(skv_layer, swiftkv));
            break;
        case 2:
            PUT(sizeof(skv_step)); PUT(offsetof(skv_step, M)); PUT(offsetof(skv_step, hidden));
            PUT(offsetof(skv_step, H)); PUT(offsetof(skv_step, Hkv)); PUT(offsetof(skv_step, D));
            PUT(offsetof(skv_step, intermediate)); PUT(offsetof(skv_step, eps)); PUT(offsetof(skv_step, h));
            PUT(offsetof(skv_step, cos)); PUT(offsetof(skv_step, sin)); PUT(offsetof(skv_step, kv_cache));
            PUT(offsetof(skv_step, num_blocks)); PUT(offsetof(skv_step, block_size));
            PUT(offsetof(skv_step, max_blocks)); PUT(offsetof(skv_step, kv_bf16)); PUT(offsetof(skv_step, slots));
            PUT(offsetof(skv_step, block_tables));
            PUT(offsetof(skv_step, kv_lens)); PUT(offsetof(skv_step, scratch)); PUT(offsetof(skv_step, gemv_rows));
            PUT(offsetof(skv_step, dots)); PUT(offsetof(skv_step, nthreads));
            break;
        case 3:
            PUT(sizeof(skv_store_kv)); PUT(offsetof(skv_store_kv, norm)); PUT(offsetof(skv_store_kv, kv));
            PUT(offsetof(skv_store_kv, owners)); PUT(offsetof(skv_store_kv, n));
            break;
        case 4:
            PUT(sizeof(skv_paged_attn)); PUT(offsetof(skv_paged_attn, q)); PUT(offsetof(skv_paged_attn, out));
            PUT(offsetof(skv_paged_attn, k_cache)); PUT(offsetof(skv_paged_attn, v_cache));
            PUT(offsetof(skv_paged_attn, block_tables)); PUT(offsetof(skv_paged_attn, q_lens));
            PUT(offsetof(skv_paged_attn, kv_lens)); PUT(offsetof(skv_paged_attn, S)); PUT(offsetof(skv_paged_attn, H));
            PUT(offsetof(skv_paged_attn, Hkv)); PUT(offsetof(skv_paged_attn, D));
            PUT(offsetof(skv_paged_attn, num_blocks)); PUT(offsetof(skv_paged_attn, block_size));
            PUT(offsetof(skv_paged_attn, max_blocks)); PUT(offsetof(skv_paged_attn, scale));
            PUT(offsetof(skv_paged_attn, kv_bf16)); PUT(offsetof(skv_paged_attn, bf16_dot));
            PUT(offsetof(skv_paged_attn, q_bf16)); PUT(offsetof(skv_paged_attn, nthreads));
            break;
        case 5:
            PUT(sizeof(skv_rows)); PUT(offsetof(skv_rows, data)); PUT(offsetof(skv_rows, rows));
            PUT(offsetof(skv_rows, width)); PUT(offsetof(skv_rows, stride)); PUT(offsetof(skv_rows, form));
            break;
        default:
            return -1;
    }
    return n;
}
