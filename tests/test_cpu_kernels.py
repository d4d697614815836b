"""The CPU kernels against PyTorch's own ops: decode and prefill attention read in place from the paged cache,
the one-pass RMSNorm / SiLU-and-mul / rotary, the split bottom-right causal attention; and the
engine's greedy output with them against the full-sequence model run on PyTorch's ops alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_kernels, quantize_q4_1, tiny_hf_model, to_distinct_swiftkv

from swiftkv.kernels import elementwise as cpu_ops
from swiftkv.kernels import paged_attention
from swiftkv.layers.attention import sdpa as _sdpa
from swiftkv.layers.rotary import apply_rotary

needs_attention = needs_kernels("paged_attention", "no AVX2/FMA or no C compiler: the paged-attention kernel cannot run here")
needs_bf16_dot = pytest.mark.skipif(
    not __import__("swiftkv.kernels.linear", fromlist=["x"]).bf16_dot_available(),
    reason="the CPU has no AVX512-BF16 dot products (avx512_bf16): the fp32 panel GEMM runs for bf16 models here")
needs_ops = needs_kernels("elementwise", "no AVX2/FMA or no C compiler: the elementwise kernels cannot run here")


def _gathered_reference(q, kc, vc, tables, lens):
    """SDPA over each sequence's blocks gathered into contiguous K/V (what the engine did before)."""
    hkv, _, _, d = kc.shape
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        k = kc[:, tables[b]].reshape(hkv, -1, d)[:, :n]  # [Hkv, n, D]
        v = vc[:, tables[b]].reshape(hkv, -1, d)[:, :n]
        outs.append(F.scaled_dot_product_attention(q[b][None, :, None], k[None], v[None], enable_gqa=True)[0, :, 0])
    return torch.stack(outs)


@needs_attention
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 8, 128, 7), (4, 1, 72, 5),
                                                                (4, 2, 16, 16)])
def test_paged_decode_attention_matches_gathered_sdpa(heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(heads * head_dim)
    num_blocks, max_blocks = 64, 12
    kc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g)
    vc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g)
    lens = torch.tensor([1, 7, 8, 9, 33, max_blocks * block_size])  # one key, tails around 8, a full table
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in lens])
    tables[1] = tables[0]  # two sequences sharing blocks (a cached prefix)
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 3  # peaked softmax rows too
    out = paged_attention.decode_attention(q, kc, vc, tables, lens)
    torch.testing.assert_close(out, _gathered_reference(q, kc, vc, tables, lens), atol=2e-6, rtol=1e-5)
    # a bf16 cache (and bf16 queries): the same arithmetic on the widened values, the output rounded to bf16
    kb, vb, qb = kc.bfloat16(), vc.bfloat16(), q.bfloat16()
    out = paged_attention.decode_attention(qb, kb, vb, tables, lens)
    ref = _gathered_reference(qb.float(), kb.float(), vb.float(), tables, lens).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@needs_attention
@needs_bf16_dot
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (32, 8, 128, 8), (12, 2, 64, 4),
                                                                (4, 4, 32, 16)])
def test_paged_decode_attention_bf16_dots_round_only_queries_and_probabilities(heads, kv_heads, head_dim, block_size):
    """The AVX512-BF16 form over a bf16 cache: the queries rounded to bf16 (a bf16 model's queries are bf16), keys
    multiplied exactly (fp32 sums), the probabilities rounded to bf16 before they weight the values: within 2^-9
    max|V| of exact attention over the bf16-rounded queries. Groups of 3, 4 and 6 query heads (more than one pass
    over the values), 1 to 200 keys (sixteen-key runs and their tails, an odd last key); D = 32 runs the AVX2 form."""
    g = torch.Generator().manual_seed(heads * head_dim + 3)
    num_blocks, max_blocks = 80, -(-200 // block_size)
    kc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).bfloat16()
    vc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).bfloat16()
    lens = torch.tensor([1, 2, 15, 16, 17, 33, 200])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim, generator=g) * 3  # fp32, as the fused decoder hands them
    out = paged_attention.decode_attention(q, kc, vc, tables, lens, bf16_dot=True)
    exact = _gathered_reference(q.bfloat16().float(), kc.float(), vc.float(), tables, lens)
    avx2 = paged_attention.decode_attention(q, kc, vc, tables, lens)
    if head_dim % 64:
        assert torch.equal(out, avx2)
    else:
        torch.testing.assert_close(out, exact, atol=2**-9 * vc.float().abs().max().item() + 1e-5, rtol=0)
        assert not torch.equal(out, avx2)  # really the dot-product form


@needs_attention
def test_paged_decode_attention_refuses_impossible_lengths():
    kc = torch.zeros(2, 4, 4, 16)
    with pytest.raises(RuntimeError, match="bad shapes"):  # 17 keys cannot fit 4 blocks of 4
        paged_attention.decode_attention(torch.zeros(1, 2, 16), kc, kc, torch.arange(4)[None], torch.tensor([17]))
    with pytest.raises(RuntimeError, match="bad shapes"):
        paged_attention.decode_attention(torch.zeros(1, 2, 16), kc, kc, torch.arange(4)[None], torch.tensor([0]))


def _masked_reference(q, kc, vc, tables, q_lens, kv_lens):
    """Each sequence's blocks gathered, then SDPA under the bottom-right causal mask (its queries are the last
    q_len of its kv_len tokens)."""
    hkv, _, _, d = kc.shape
    outs, q0 = [], 0
    for s, (ql, kl) in enumerate(zip(q_lens.tolist(), kv_lens.tolist())):
        k = kc[:, tables[s]].reshape(hkv, -1, d)[:, :kl]  # [Hkv, kl, D]
        v = vc[:, tables[s]].reshape(hkv, -1, d)[:, :kl]
        mask = torch.ones(ql, kl, dtype=torch.bool).tril(kl - ql)
        qs = q[q0 : q0 + ql].transpose(0, 1)[None]  # [1, H, ql, D]
        outs.append(F.scaled_dot_product_attention(qs, k[None], v[None], attn_mask=mask, enable_gqa=True)[0].transpose(0, 1))
        q0 += ql
    return torch.cat(outs)


@needs_attention
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 8, 128, 8), (4, 1, 72, 4),
                                                                (32, 8, 64, 16), (6, 2, 16, 128)])
def test_paged_prefill_attention_matches_masked_sdpa(heads, kv_heads, head_dim, block_size):
    """Fresh prompts, prompts after cached keys, decode rows and a one-key sequence in one call: lengths
    around the kernel's tiles (query tiles of ~64 rows, key chunks of 64) and blocks shared by two tables."""
    g = torch.Generator().manual_seed(heads * head_dim + block_size)
    num_blocks, max_blocks = 160, -(-300 // block_size)
    kc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g)
    vc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g)
    kv_lens = torch.tensor([1, 7, 300, 65, 150, 129, 33])
    q_lens = torch.tensor([1, 7, 300, 1, 37, 64, 1])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in kv_lens])
    tables[4] = tables[2]  # a cached prefix shared with another sequence
    q = torch.randn(int(q_lens.sum()), heads, head_dim, generator=g) * 3  # peaked softmax rows too
    out = paged_attention.prefill_attention(q, kc, vc, tables, q_lens, kv_lens)
    torch.testing.assert_close(out, _masked_reference(q, kc, vc, tables, q_lens, kv_lens), atol=1e-5, rtol=1e-5)
    kb, vb, qb = kc.bfloat16(), vc.bfloat16(), q.bfloat16()  # bf16: the same arithmetic on widened values
    out = paged_attention.prefill_attention(qb, kb, vb, tables, q_lens, kv_lens)
    ref = _masked_reference(qb.float(), kb.float(), vb.float(), tables, q_lens, kv_lens).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@needs_attention
@needs_bf16_dot
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 8, 128, 8), (4, 1, 32, 4),
                                                                (6, 2, 64, 128)])
def test_paged_prefill_attention_bf16_dots_round_only_the_probabilities(heads, kv_heads, head_dim, block_size):
    """The AVX512-BF16 form over a bf16 cache: bf16 queries and keys multiply exactly (fp32 sums); only the
    probabilities are rounded to bf16 before they weight the values, so every output is within 2^-9 max|V| of the
    exact attention (relative rounding 2^-9 of weights summing to 1). Same lengths as above (tiles, chunks, shared
    blocks, one key, decode rows); a cache the form does not take (fp32, D % 32) runs the fp32 kernel."""
    g = torch.Generator().manual_seed(heads * head_dim + block_size + 1)
    num_blocks, max_blocks = 160, -(-300 // block_size)
    kc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).bfloat16()
    vc = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).bfloat16()
    kv_lens = torch.tensor([1, 7, 300, 65, 150, 129, 33])
    q_lens = torch.tensor([1, 7, 300, 1, 37, 64, 1])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in kv_lens])
    tables[4] = tables[2]
    q = (torch.randn(int(q_lens.sum()), heads, head_dim, generator=g) * 3).bfloat16().float()  # bf16 values, fp32 out
    exact = _masked_reference(q, kc.float(), vc.float(), tables, q_lens, kv_lens)
    out = paged_attention.prefill_attention(q, kc, vc, tables, q_lens, kv_lens, bf16_dot=True)
    torch.testing.assert_close(out, exact, atol=2**-9 * vc.float().abs().max().item() + 1e-5, rtol=0)
    fp32_kernel = paged_attention.prefill_attention(q, kc, vc, tables, q_lens, kv_lens)
    assert not torch.equal(out, fp32_kernel)  # really the rounded probabilities
    native = paged_attention.prefill_attention(q.bfloat16(), kc, vc, tables, q_lens, kv_lens, bf16_dot=True)
    assert native.dtype == torch.bfloat16 and torch.equal(native, out.bfloat16())  # bf16 rows in and out: same values
    kf, vf = kc.float(), vc.float()  # an fp32 cache: the fp32 kernel, bit for bit
    assert torch.equal(paged_attention.prefill_attention(q, kf, vf, tables, q_lens, kv_lens, bf16_dot=True),
                       paged_attention.prefill_attention(q, kf, vf, tables, q_lens, kv_lens))
    q16, k16, v16 = q[..., :16].contiguous(), kc[..., :16].contiguous(), vc[..., :16].contiguous()  # D % 32 != 0
    assert torch.equal(paged_attention.prefill_attention(q16, k16, v16, tables, q_lens, kv_lens, bf16_dot=True),
                       paged_attention.prefill_attention(q16, k16, v16, tables, q_lens, kv_lens))
    assert torch.equal(paged_attention.prefill_attention(q16.bfloat16(), k16, v16, tables, q_lens, kv_lens, bf16_dot=True),
                       paged_attention.prefill_attention(q16, k16, v16, tables, q_lens, kv_lens).bfloat16())


@needs_attention
def test_paged_prefill_attention_refuses_impossible_lengths():
    kc, tables = torch.zeros(2, 4, 4, 16), torch.arange(4)[None]
    with pytest.raises(RuntimeError, match="bad shapes"):  # more queries than keys
        paged_attention.prefill_attention(torch.zeros(5, 2, 16), kc, kc, tables, torch.tensor([5]), torch.tensor([4]))
    with pytest.raises(RuntimeError, match="bad shapes"):  # 17 keys cannot fit 4 blocks of 4
        paged_attention.prefill_attention(torch.zeros(2, 2, 16), kc, kc, tables, torch.tensor([2]), torch.tensor([17]))
    with pytest.raises(ValueError, match="3 query tokens"):
        paged_attention.prefill_attention(torch.zeros(3, 2, 16), kc, kc, tables, torch.tensor([2]), torch.tensor([4]))
    assert not paged_attention.can_run(torch.zeros(2, 4, 5, 16), prefill=True)  # block 5


@needs_ops
def test_rms_norm_matches_torch_on_strided_rows():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 1000, generator=g)[:, :576] * 3, torch.randn(576, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, eps=1e-5))


@needs_ops
def test_silu_and_mul_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 2 * 112, generator=g) * 6
    x[0, :8] = torch.tensor([-200.0, -90.0, -30.0, 0.0, 1e-4, 30.0, 90.0, 200.0])  # exp's clamped range
    gate, up = x.chunk(2, -1)  # rows 224 floats apart: the kernel reads them in place
    with torch.inference_mode():
        torch.testing.assert_close(cpu_ops.silu_and_mul(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(cpu_ops.silu_and_mul(gate.contiguous(), up.contiguous()), F.silu(gate) * up,
                                   atol=1e-6, rtol=1e-5)


@needs_ops
def test_rotary_in_place_touches_only_the_given_heads():
    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(21, 7, 32, generator=g), torch.randn(21, 32, generator=g), torch.randn(21, 32, generator=g)
    expected = torch.cat([apply_rotary(x[:, :5], cos, sin), x[:, 5:]], 1)
    y = x.clone()
    with torch.inference_mode():
        assert cpu_ops.rotary_inplace(y[:, :5], cos, sin) is not None
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[:, 5:], x[:, 5:])


@needs_ops
def test_bf16_elementwise_ops_are_the_fp32_ops_rounded_once():
    """bf16 rows: widened exactly, the fp32 kernel's arithmetic, one round-to-nearest-even on the way out (as
    PyTorch's .bfloat16()): bit-equal to the fp32 kernel's output rounded; within a bf16 ulp of PyTorch's own ops
    (which round after each op); NaN stays NaN."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 1000, generator=g) * 3).bfloat16()[:, :576]
    w = torch.randn(576, generator=g).bfloat16()
    gu = (torch.randn(37, 224, generator=g) * 6).bfloat16()
    gu[0, 0] = float("nan")
    gate, up = gu.chunk(2, -1)
    r = torch.randn(21, 7, 32, generator=g).bfloat16()
    cos, sin = torch.randn(21, 32, generator=g), torch.randn(21, 32, generator=g)
    with torch.inference_mode():
        norm = cpu_ops.rms_norm(x, w, 1e-5)
        assert norm.dtype == torch.bfloat16
        assert torch.equal(norm, cpu_ops.rms_norm(x.float(), w.float(), 1e-5).bfloat16())
        torch.testing.assert_close(norm.float(), (w * F.rms_norm(x.float(), (576,), eps=1e-5).bfloat16()).float(),
                                   rtol=2**-7, atol=1e-3)
        act = cpu_ops.silu_and_mul(gate, up)
        torch.testing.assert_close(act, cpu_ops.silu_and_mul(gate.float(), up.float()).bfloat16(), atol=0, rtol=0,
                                   equal_nan=True)
        assert act[0, 0].isnan() and not act[1:].isnan().any()
        rot = r.clone()
        assert cpu_ops.rotary_inplace(rot[:, :5], cos, sin) is not None
        wide = r.float()
        assert cpu_ops.rotary_inplace(wide[:, :5], cos, sin) is not None
        assert torch.equal(rot, wide.bfloat16()) and torch.equal(rot[:, 5:], r[:, 5:])


@needs_ops
@needs_bf16_dot
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_avx512_form_is_the_avx2_form(monkeypatch, dtype):
    """On a CPU with AVX512-BF16 the elementwise ops run sixteen lanes at a time: the same steps as the AVX2 form, so
    SiLU-and-mul and rotary give the same bits; RMSNorm adds its squares in another order (its fp32 statistic within
    an ulp, its bf16 output within one bf16 ulp). Widths leave a partial last vector (% 16 == 8) and rows are strided."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(19, 700, generator=g) * 3).to(dtype)[:, :584]  # 584 = 36 x 16 + 8
    w = torch.randn(584, generator=g)
    gu = (torch.randn(19, 2 * 120, generator=g) * 6).to(dtype)  # 120 = 7 x 16 + 8
    gate, up = gu.chunk(2, -1)
    r = (torch.randn(13, 5, 48, generator=g) * 2).to(dtype)  # half a head: 24 = 16 + 8
    cos, sin = torch.randn(13, 48, generator=g), torch.randn(13, 48, generator=g)
    outs = {}
    with torch.inference_mode():
        for form in ("0", "1"):
            monkeypatch.setenv("SWIFTKV_AVX512_OPS", form)
            assert cpu_ops.avx512_available() == (form == "1")
            rot = r.clone()
            assert cpu_ops.rotary_inplace(rot[:, :3], cos, sin) is not None
            outs[form] = cpu_ops.rms_norm(x, w, 1e-5), cpu_ops.silu_and_mul(gate, up), rot
    (norm2, act2, rot2), (norm16, act16, rot16) = outs["0"], outs["1"]
    assert torch.equal(act16, act2) and torch.equal(rot16, rot2) and torch.equal(rot16[:, 3:], r[:, 3:])
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-21
    torch.testing.assert_close(norm16.float(), norm2.float(), rtol=ulp, atol=0)


def test_elementwise_avx512_form_needs_the_cpu_feature(monkeypatch):
    """The AVX-512 form is chosen from the CPU's flags: without avx512_bf16 (or its BW / VL), or switched off, the
    AVX2 form runs."""
    from swiftkv import platforms

    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw",
                                                                    "avx512vl"}))
    assert not cpu_ops.avx512_available()
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16", "avx512bw",
                                                                    "avx512vl"}))
    assert cpu_ops.avx512_available()
    monkeypatch.setenv("SWIFTKV_AVX512_OPS", "0")
    assert not cpu_ops.avx512_available()


@pytest.mark.parametrize("q_len,kv_len", [(1, 9), (5, 9), (33, 34), (100, 300)])
def test_split_bottom_right_causal_attention_matches_masked_sdpa(q_len, kv_len):
    g = torch.Generator().manual_seed(q_len)
    q, k, v = (torch.randn(h, n, 16, generator=g) for h, n in ((4, q_len), (2, kv_len), (2, kv_len)))
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    torch.testing.assert_close(_sdpa(q, k, v), ref, atol=1e-6, rtol=1e-5)


@needs_attention
@needs_ops
@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("l,G", [(6, 1), (3, 1), (2, 2), (3, 3)])
def test_engine_greedy_matches_full_sequence_on_torch_ops(monkeypatch, l, G, kernels):
    """Reference: the full-sequence model with every kernel off (PyTorch only). The engine runs its eager
    layers with the kernels on, or off (its PyTorch fallback), with prompts chunked across steps (the fused
    decode, which would take the decode steps, is tested in test_fused_decode.py)."""
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.full_sequence import greedy_generate
    from swiftkv.models.llama import LlamaForCausalLM
    from swiftkv.sampling_params import SamplingParams

    hf = tiny_hf_model("llama", num_hidden_layers=6)
    model = LlamaForCausalLM(hf.config)
    model.load_state_dict(hf.state_dict(), strict=False)
    model = to_distinct_swiftkv(model, l, G)
    prompts = [[5, 9, 17, 3], list(range(1, 40)), [100] * 23]
    for var in ("SWIFTKV_PAGED_ATTENTION", "SWIFTKV_CPU_OPS", "SWIFTKV_COMPACT_WEIGHTS"):
        monkeypatch.setenv(var, "0")
    refs = [greedy_generate(model, p, 10) for p in prompts]
    assert sum(len(set(r)) for r in refs) >= 5  # varied outputs, so equality means something
    if kernels == "on":
        for var in ("SWIFTKV_PAGED_ATTENTION", "SWIFTKV_CPU_OPS", "SWIFTKV_COMPACT_WEIGHTS"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SWIFTKV_FUSED_DECODE", "0")
    calls = {}
    for module, name in ((paged_attention, "decode_attention"), (paged_attention, "prefill_attention"),
                         (cpu_ops, "rms_norm"), (cpu_ops, "silu_and_mul"), (cpu_ops, "rotary_inplace")):
        def counted(*a, _f=getattr(module, name), _n=name, **kw):
            out = _f(*a, **kw)
            if out is not None:  # the kernel ran (the ops say None when it does not)
                calls[_n] = calls.get(_n, 0) + 1
            return out
        monkeypatch.setattr(module, name, counted)
    model.prepare_for_inference()  # the kernel switches as set above (held forms chosen now)
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert [done[i].outputs[0].token_ids for i in ids] == refs
    assert len(calls) == (5 if kernels == "on" else 0), calls  # the engine really ran on the kernels (or not)


@needs_ops
@needs_bf16_dot
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_1"])
def test_bf16_dot_gemm_is_the_bf16_rounded_product(kind):
    """The AVX512-BF16 panel GEMM: x and W rounded to bf16 (nearest even), every product summed in fp32 -- the
    fp32 matmul of the rounded operands to fp32 summation-order error, for every held kind and row count."""
    from conftest import gguf_like

    from swiftkv.kernels import linear as kernels
    from swiftkv.layers.weights import hold

    for out in (72, 70):  # 70: a last panel of 6 rows, a tile of 2 (the single-sum path)
        w = gguf_like(out, 96, kind) if kind.startswith("q") else torch.randn(out, 96) * 0.05
        held = hold(w.bfloat16() if kind == "bf16" else w, torch.bfloat16)
        assert held.kind == {"f32": "bf16", "bf16": "bf16", "q8_0": "q8", "q4_1": "q4"}[kind] or kind == "f32"
        c = held.c_weight()
        # tiles of 1-6 input rows, shared out evenly (a blocked kind's gemv keeps batches up to GEMV_ROWS)
        for m in (2, 5, 8, 13, 31, 32, 64) if held.kind == "bf16" else (5, 8, 13, 31, 32, 64):
            x = torch.randn(m, 96)
            ref = x.bfloat16().float() @ held.dense().bfloat16().float().T
            got = kernels.linear(x, c, bf16_dot=True)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
            assert not torch.allclose(got, kernels.linear(x, c), atol=1e-6, rtol=0)  # really the rounded operands


def test_bf16_dot_falls_back_without_the_cpu_feature(monkeypatch):
    """The choice is made from the CPU's flags: without avx512_bf16 (or switched off) the fp32 panel GEMM runs,
    and a shape the dot-product kernel does not take (in_features % 32) falls back inside the library."""
    from swiftkv import platforms
    from swiftkv.kernels import linear as kernels

    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16"}))
    assert not kernels.bf16_dot_available()  # no avx512bw / avx512vl
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512bw", "avx512vl"}))
    assert kernels.bf16_dot_available()
    monkeypatch.setenv("SWIFTKV_BF16_DOT", "0")
    assert not kernels.bf16_dot_available()
    if kernels.library() is not None and "avx512_bf16" in __import__("pathlib").Path("/proc/cpuinfo").read_text():
        w = torch.randn(16, 40)  # 40 % 32 != 0: the dot-product kernel refuses, skv_gemm answers
        x = torch.randn(8, 40)
        torch.testing.assert_close(kernels.linear(x, kernels.c_weight("f32", w), bf16_dot=True), x @ w.T,
                                   atol=1e-5, rtol=1e-5)


@needs_ops
@needs_bf16_dot
def test_bf16_engine_batched_decode_with_dot_products_matches_the_bf16_model(monkeypatch, tmp_path):
    """Eight sequences decoding together in bf16 (the fused decoder's matmuls above 4 rows take the dot-product
    GEMM): greedy output checked along its own path against the full-sequence bf16 model, as vLLM does."""
    from conftest import assert_greedy_close

    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    tiny_hf_model("llama", seed=3, hidden_size=128, intermediate_size=256, num_hidden_layers=4).save_pretrained(
        tmp_path / "base")
    path = save_checkpoint(to_swiftkv(load_model(tmp_path / "base")[0], SwiftKVConfig(4, 2)), tmp_path / "skv",
                           source_dir=tmp_path / "base")
    reference = load_model(path, dtype="bfloat16")[0]
    prompts = [[5 + i, 9, 17 + 2 * i, 3] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = {}
    monkeypatch.setenv("SWIFTKV_AMX_DECODE", "0")  # on an AMX CPU these 8-row steps would go to oneDNN's tiles
    for dot in ("1", "0"):
        monkeypatch.setenv("SWIFTKV_BF16_DOT", dot)
        engine = LLMEngine(load_model(path, dtype="bfloat16", for_inference=True)[0],
                           config=EngineConfig(kv_cache_memory=4 << 20, block_size=4))
        assert engine.runner.fused is not None
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        outs[dot] = [done[i] for i in ids]
    for p, o in zip(prompts, outs["1"]):
        assert_greedy_close(reference, p, o, 0.02)
    lp = [[x.logprob for x in o.logprobs] for o in outs["1"]]
    assert lp != [[x.logprob for x in o.logprobs] for o in outs["0"]]  # the dot-product path really ran


@needs_ops
def test_bf16_batches_route_by_cpu(monkeypatch):
    """Which path a bf16 batch on bf16 weights takes, from the CPU's flags alone: the AVX512-BF16 panel GEMM up to
    32 rows without AMX, oneDNN above (and with AMX: its tiles, where the kernels' own AMX GEMM cannot run -- an old
    compiler, Linux refusing the tiles); blocked weights always take the kernels, and with the kernels' AMX GEMM every
    batch does."""
    from swiftkv import platforms
    from swiftkv.kernels import linear as kernels
    from swiftkv.layers.linear import DOT_OVER_ONEDNN_MAX_ROWS, HeldLinearMethod
    from swiftkv.layers.weights import hold

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch build")
    dense = HeldLinearMethod(hold(torch.randn(64, 64).bfloat16(), torch.bfloat16), None)
    blocked = HeldLinearMethod(hold(quantize_q4_1(torch.randn(64, 64)), torch.bfloat16), None)
    assert dense.held.kind == "bf16" and blocked.held.kind == "q4"
    rows = {m: torch.zeros(m, 64, dtype=torch.bfloat16) for m in (2, 8, DOT_OVER_ONEDNN_MAX_ROWS, 64)}
    no_amx, all_rows = {2, 8, DOT_OVER_ONEDNN_MAX_ROWS}, set(rows)
    for flags, amx_decode, dense_kernel_rows, blocked_kernel_rows in (
            (("avx512_bf16", "avx512bw", "avx512vl"), "1", no_amx, all_rows),
            (("avx512_bf16", "avx512bw", "avx512vl", "amx_bf16"), "1", {2}, all_rows),  # bf16 weights: the tiles
            (("avx512_bf16", "avx512bw", "avx512vl", "amx_bf16"), "0", no_amx, all_rows),  # SWIFTKV_AMX_DECODE=0
            (("avx512_bf16",), "1", {2}, all_rows)):  # native bf16 without the dot products' VL/BW
        monkeypatch.setattr(platforms, "cpu_flags", lambda f=flags: frozenset({"avx2", "fma", "f16c", *f}))
        monkeypatch.setenv("SWIFTKV_AMX_DECODE", amx_decode)
        monkeypatch.setattr(kernels, "amx_available", lambda: False)
        assert {m for m, x in rows.items() if dense._kernels_take(x)} == dense_kernel_rows, flags
        assert {m for m, x in rows.items() if blocked._kernels_take(x)} == blocked_kernel_rows, flags
        assert all(dense._kernels_take(x.float()) for x in rows.values())  # fp32 batches: the kernels
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16", "avx512bw",
                                                                   "avx512vl", "amx_bf16"}))
    monkeypatch.setattr(kernels, "amx_available", lambda: True)  # the kernels' own tiles: every batch theirs
    assert all(dense._kernels_take(x) and blocked._kernels_take(x) for x in rows.values())


@needs_ops
@needs_bf16_dot
def test_amx_decode_batches_run_eagerly_on_onednn(monkeypatch, tmp_path):
    """On a CPU with AMX where the kernels' own AMX GEMM cannot run (an old compiler, Linux refusing the tiles; its
    flags faked here: oneDNN's bf16 matmul runs on this CPU's AVX512-BF16 instead of the tiles), a bf16 model's decode steps of more than GEMV_ROWS sequences on bf16 weights leave the fused decoder for
    the eager layers, every matmul in oneDNN, where its layers are big enough (AMX_EAGER_MIN_WORK, lifted here);
    smaller steps stay fused, and so do all steps with SWIFTKV_AMX_DECODE=0, on Q4 weights or with this tiny model's
    layers under the real threshold. The greedy output stays the bf16 model's every time."""
    from conftest import assert_greedy_close

    from swiftkv import platforms
    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.kernels import linear as kernels
    from swiftkv.kernels.linear import GEMV_ROWS
    from swiftkv.layers import fused_decode, linear
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    tiny_hf_model("llama", seed=3, hidden_size=128, intermediate_size=256, num_hidden_layers=4).save_pretrained(
        tmp_path / "base")
    paths = {}
    for kind in ("bf16", "q4"):
        model = to_swiftkv(load_model(tmp_path / "base")[0], SwiftKVConfig(4, 2))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                    p.copy_(quantize_q4_1(p) if kind == "q4" else p.bfloat16())
        paths[kind] = save_checkpoint(model.to(torch.bfloat16) if kind == "bf16" else model, tmp_path / kind,
                                      source_dir=tmp_path / "base")
    prompts = [[5 + i, 9, 17 + 2 * i, 3] for i in range(8)]
    flags = frozenset(platforms.cpu_flags()) | {"amx_bf16", "amx_tile"}
    monkeypatch.setattr(platforms, "cpu_flags", lambda: flags)
    monkeypatch.setattr(kernels, "amx_available", lambda: False)
    fused_rows, onednn_rows = [], []
    dense = linear.dense_matmul
    for name in ("run_layers", "run_all_layers"):  # (a SwiftKV step: run_all_layers)
        run = getattr(fused_decode.FusedDecoder, name)
        monkeypatch.setattr(fused_decode.FusedDecoder, name, lambda self, h, *a, _run=run, **kw:
                            fused_rows.append(h.shape[0]) or _run(self, h, *a, **kw))
    monkeypatch.setattr(linear, "dense_matmul", lambda x, *a: onednn_rows.append(x.shape[0]) or dense(x, *a))
    big = set(range(GEMV_ROWS + 1, len(prompts) + 1))  # decode steps of 5-8 sequences (they finish one by one)
    real_min_work = fused_decode.AMX_EAGER_MIN_WORK  # too much for this tiny model's layers: it stays fused
    for kind, amx_decode, min_work, eager in (("bf16", "1", 0, True), ("bf16", "0", 0, False), ("q4", "1", 0, False),
                                              ("bf16", "1", real_min_work, False)):
        monkeypatch.setenv("SWIFTKV_AMX_DECODE", amx_decode)
        monkeypatch.setattr(fused_decode, "AMX_EAGER_MIN_WORK", min_work)
        fused_rows.clear(), onednn_rows.clear()
        engine = LLMEngine(load_model(paths[kind], dtype="bfloat16", for_inference=True)[0],
                           config=EngineConfig(kv_cache_memory=4 << 20, block_size=4))
        assert engine.runner.fused is not None
        assert engine.model.model.layers[0].mlp.gate_proj.held.kind == kind
        assert min_work == 0 or engine.runner.fused._amx_rows > len(prompts)  # (4 x 98,304 weights a layer)
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=2 + i, ignore_eos=True, logprobs=1))
               for i, p in enumerate(prompts)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        if eager:
            assert fused_rows and max(fused_rows) <= GEMV_ROWS and big <= set(onednn_rows), (fused_rows, onednn_rows)
        else:  # (the LM head, outside the fused call, still goes to the tiles with AMX: its weight is bf16 here)
            assert big <= set(fused_rows), (kind, fused_rows)
            assert amx_decode == "1" or not big & set(onednn_rows), onednn_rows
        reference = load_model(paths[kind], dtype="bfloat16")[0]
        for p, i in zip(prompts, ids):
            assert_greedy_close(reference, p, done[i], 0.02)


@needs_attention
def test_prefill_attention_choice_per_cpu(monkeypatch, tmp_path):
    """bf16 prompts on a CPU with AMX leave the paged kernel (for the AMX flash attention or SDPA), elsewhere the
    paged prefill kernel; SWIFTKV_PREFILL_ATTENTION overrides; either way the greedy output is the bf16 model's."""
    from conftest import assert_greedy_close

    from swiftkv import platforms
    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.kernels.switches import KernelSwitches
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    assert KernelSwitches.from_env().prefill_kernel_preferred(torch.float32)
    monkeypatch.setenv("SWIFTKV_PREFILL_ATTENTION", "fast")
    with pytest.raises(ValueError, match="use one of auto, kernel, sdpa"):
        KernelSwitches.from_env()
    monkeypatch.delenv("SWIFTKV_PREFILL_ATTENTION")
    tiny_hf_model("llama", seed=4, num_hidden_layers=4).save_pretrained(tmp_path / "base")
    path = save_checkpoint(to_swiftkv(load_model(tmp_path / "base")[0], SwiftKVConfig(4, 2)), tmp_path / "skv",
                           source_dir=tmp_path / "base")
    reference = load_model(path, dtype="bfloat16")[0]
    prompts = [[5, 9, 17, 3, 8, 1, 2], list(range(1, 30))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    real, calls = paged_attention.prefill_attention, []
    monkeypatch.setattr(paged_attention, "prefill_attention",
                        lambda *a, bf16_dot=False: calls.append(bf16_dot) or real(*a, bf16_dot=bf16_dot))
    base = frozenset(platforms.cpu_flags())
    for flags, override, kernel in ((base - {"amx_bf16"}, None, True), (base | {"amx_bf16"}, None, False),
                                    (base | {"amx_bf16"}, "kernel", True), (base - {"amx_bf16"}, "sdpa", False),
                                    (base - {"amx_bf16", "avx512_bf16"}, None, True), (base - {"amx_bf16"}, "no-dots", True)):
        monkeypatch.setattr(platforms, "cpu_flags", lambda f=flags: f)
        if override == "no-dots":
            monkeypatch.setenv("SWIFTKV_BF16_DOT", "0")
        elif override:
            monkeypatch.setenv("SWIFTKV_PREFILL_ATTENTION", override)
        # the kernel's dot-product form wherever the CPU has AVX512-BF16 and it is not switched off
        dots = {"avx512_bf16", "avx512bw", "avx512vl"} <= flags and override != "no-dots"
        assert KernelSwitches.from_env().prefill_kernel_preferred(torch.bfloat16) == kernel
        calls.clear()
        engine = LLMEngine(load_model(path, dtype="bfloat16", for_inference=True)[0],
                           config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16))
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        assert bool(calls) == kernel, (flags, override)
        assert all(c == dots for c in calls), (flags, override, calls)
        for p, i in zip(prompts, ids):
            assert_greedy_close(reference, p, done[i], 0.02)
        monkeypatch.delenv("SWIFTKV_PREFILL_ATTENTION", raising=False)
        monkeypatch.delenv("SWIFTKV_BF16_DOT", raising=False)


needs_int8_dot = pytest.mark.skipif(
    not {"avx512_vnni", "avx512bw", "avx512vl"} <= __import__("swiftkv.platforms", fromlist=["x"]).cpu_flags(),
    reason="the CPU has no AVX512-VNNI (avx512_vnni): the int8-activation gemv cannot run here")


def _int8_activation_reference(held, x: torch.Tensor) -> torch.Tensor:
    """x [M, I] through a Q4/Q8-held weight as the int8 kernels compute it, in fp64: each block of 32 activations
    quantized to int8 (d = max|x| / 127 and x * (1 / d) in fp32, as the kernels, then nearest even), the codes' sums
    exact, scaled by the weight and activation scales, plus the offsets times the exact block sums."""
    out_features, in_features = held.out_features, held.in_features
    nb = in_features // 32
    codes = held.data.long()
    if held.kind == "q4":  # byte j of a block: code j (low nibble), code 16 + j (high nibble)
        b = codes.view(out_features, nb, 16)
        codes = torch.cat([b & 15, b >> 4], -1).view(out_features, in_features)
    xf = x.float().view(x.shape[0], nb, 32)
    d = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xf * (1 / d)).double()  # (round: nearest even, as the kernel)
    weight = codes * held.scale.double().repeat_interleave(32, 1)  # [O, I]
    return (xq * d.double()).view(x.shape[0], in_features) @ weight.T + xf.double().sum(-1) @ held.offset.double().T


@needs_ops
@needs_int8_dot
@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
@pytest.mark.parametrize("in_features", [96, 576])  # 3 blocks (an odd last pair), 18
def test_int8_dot_is_the_int8_activation_product(kind, in_features):
    """The AVX512-VNNI gemv (up to 4 rows) and panel GEMM (above; 40 outputs: a partial panel of 16; 200 rows: past
    a chunk of 192): equal to :func:`_int8_activation_reference` to fp32 rounding, for every row count; the whole-call
    entry (:func:`linear_int8`) the same from fp32 or bf16 activations, its bf16 output that product within an ulp."""
    from conftest import gguf_like

    from swiftkv.kernels import linear as kernels
    from swiftkv.layers.weights import hold

    held = hold(gguf_like(40, in_features, kind), torch.bfloat16)
    assert held.kind == {"q8_0": "q8", "q4_1": "q4"}[kind]
    c = held.c_weight()
    g = torch.Generator().manual_seed(0)
    for m in (1, 2, 3, 4, 5, 8, 9, 32, 200):
        x = torch.randn(m, in_features, generator=g) * torch.linspace(0.1, 3, in_features)  # blocks of unlike ranges
        ref = _int8_activation_reference(held, x)
        tol = dict(atol=1e-6 * float(ref.abs().max()), rtol=1e-5)
        got = kernels.linear(x, c, int8_dot=True)
        torch.testing.assert_close(got.double(), ref, **tol)
        exact = kernels.linear(x, c)  # the widened-fp32 kernels: the activations unrounded
        assert not torch.allclose(got, exact, atol=1e-6, rtol=0)  # really the int8 activations
        # ... and close to the exact product: int8 activations cost ~0.5% of the output's size (relative RMS)
        assert float((got - exact).norm() / exact.norm()) < 0.02
        torch.testing.assert_close(kernels.linear_int8(x, c).double(), ref, **tol)
        bias = torch.randn(40, generator=g)  # a bias held with the weight is added in the kernel's store
        torch.testing.assert_close(kernels.linear_int8(x, held.c_weight(bias)).double(), ref + bias.double(), **tol)
        xb = x.bfloat16()
        got_bf16 = kernels.linear_int8(xb, c)
        assert got_bf16.dtype == torch.bfloat16
        ref_bf16 = _int8_activation_reference(held, xb)  # the kernel's fp32 sums rounded once: within a bf16 ulp
        torch.testing.assert_close(got_bf16.double(), ref_bf16, atol=tol["atol"], rtol=2 ** -7)


@needs_ops
@needs_int8_dot
def test_int8_dot_is_opt_in_and_reaches_the_fused_decode(monkeypatch, tmp_path):
    """Off by default (it costs accuracy); with SWIFTKV_INT8_DOT=1 a bf16 engine's decode runs it (the fused decoder's
    matmul forms say so) and so do its prompts (the panel GEMM, :func:`linear_int8`), and its log-probs stay near the
    int8-free engine's; prompts stay on oneDNN on a CPU with AMX; a CPU without avx512_vnni never takes it."""
    from swiftkv import platforms
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.kernels import linear as kernels
    from swiftkv.models.loader import load_model
    from swiftkv.sampling_params import SamplingParams

    no_amx = frozenset(f for f in platforms.cpu_flags() if not f.startswith("amx"))
    hf = tiny_hf_model("llama", seed=5, hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(quantize_q4_1(p))  # Q4_1 values: held as q4
    hf.save_pretrained(tmp_path / "q4")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    outs, gemm_rows = {}, {}
    real = kernels.linear_int8
    for opt_in in ("0", "1"):
        monkeypatch.setenv("SWIFTKV_INT8_DOT", opt_in)
        gemm_rows[opt_in] = []
        monkeypatch.setattr(kernels, "linear_int8", lambda x, w, _r=gemm_rows[opt_in]: _r.append(x.shape[0]) or real(x, w))
        engine = LLMEngine(load_model(tmp_path / "q4", dtype="bfloat16", for_inference=True)[0],
                           config=EngineConfig(kv_cache_memory=4 << 20, block_size=4))
        assert engine.runner.fused is not None and engine.model.model.layers[0].mlp.gate_proj.held.kind == "q4"
        assert bool(engine.runner.fused.bf16_dots & kernels.DOT_I8) == (opt_in == "1")
        engine.add_request([5, 9, 17, 3, 8, 11, 2, 30, 7], params)  # a 9-token prompt: the int8 panel GEMM
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[opt_in] = o.outputs[0]
    assert not gemm_rows["0"] and 9 in gemm_rows["1"]
    int8, plain = [lp.logprob for lp in outs["1"].logprobs], [lp.logprob for lp in outs["0"].logprobs]
    assert int8 != plain  # really the int8 activations
    # near (prompt and decode both int8: the default model's chosen-token logprobs sit 0.077 mean / 0.27 p95 from
    # fp32's with them, docs/benchmarks.md); a wrong product would be nats away
    torch.testing.assert_close(int8, plain, atol=0.25, rtol=0)
    # with AMX, prompts stay on oneDNN's tiles (widened weights); decode-sized batches keep the int8 kernels
    gate = engine.model.model.layers[0].mlp.gate_proj.method
    monkeypatch.setenv("SWIFTKV_INT8_DOT", "1")
    for flags, prompt_taken in (({"amx_bf16", "amx_tile"}, False), (set(), True)):
        monkeypatch.setattr(platforms, "cpu_flags", lambda f=flags: no_amx | f)
        assert gate._kernels_take(torch.zeros(200, 128, dtype=torch.bfloat16)) == prompt_taken
        assert gate._kernels_take(torch.zeros(32, 128, dtype=torch.bfloat16))
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512bw", "avx512vl"}))
    assert not kernels.int8_dot_available()
