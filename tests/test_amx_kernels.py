"""The kernels' AMX-BF16 tile GEMM (csrc/skv_gemm_amx.c): the bf16-rounded product on the tiles, in the fused
decoder's batched steps, and its fallback on CPUs without the tiles. The value tests run only where the tiles do
(a Sapphire Rapids-class Xeon whose Linux grants them); the choice tests run everywhere."""

import ctypes

import pytest
import torch
from conftest import needs_kernels, run_to_end, tiny_hf_model

from swiftkv.kernels import linear as kernels

needs_ops = needs_kernels("elementwise", "no AVX2/FMA or no C compiler: the kernels cannot run here")
needs_amx = pytest.mark.skipif(not kernels.amx_available(),
                               reason="no AMX-BF16 tiles here (or Linux refused them): the AMX GEMM cannot run")


@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q4_1"])
def test_amx_gemm_is_the_bf16_rounded_product(kind):
    """x and W rounded to bf16 (nearest even), every product summed in fp32 on the tiles: the fp32 matmul of the
    rounded operands to summation-order error, for every held kind, 5-128 rows (partial and several groups of 16),
    panels of 16 outputs and a last partial one, split between threads at any multiple of 8 outputs."""
    from conftest import gguf_like

    from swiftkv.layers.weights import hold

    lib = kernels.library()
    torch.manual_seed(0)
    for out in (72, 40):  # 72 = 4 panels + 8; 40: two threads' shares end mid-panel
        w = gguf_like(out, 96, kind) if kind.startswith("q") else torch.randn(out, 96).bfloat16()
        held = hold(w, torch.bfloat16)
        assert held.kind == {"bf16": "bf16", "q8_0": "q8", "q4_1": "q4"}[kind]
        c = held.c_weight()
        for m in (5, 16, 17, 33, 64, 65, 128):
            x = torch.randn(m, 96)
            ref = x.bfloat16().float() @ held.dense().bfloat16().float().T
            torch.testing.assert_close(kernels.linear(x, c, bf16_dot=True, amx=True), ref, atol=1e-4, rtol=1e-5)
            y = torch.full((m, out), float("nan"))  # one call per share of 8 outputs: every output written once
            for lo in range(0, out, 8):
                assert lib.skv_gemm_amx_part(ctypes.byref(c), ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(m),
                                             ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(out), ctypes.c_int64(lo),
                                             ctypes.c_int64(lo + 8)) == 0
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)
    f32 = kernels.c_weight("f32", torch.randn(16, 96))  # a kind it does not take: refused, skv_linear falls back
    assert lib.skv_gemm_amx_part(ctypes.byref(f32), ctypes.c_void_p(torch.zeros(8, 96).data_ptr()), ctypes.c_int64(8),
                                 ctypes.c_void_p(torch.zeros(8, 16).data_ptr()), ctypes.c_int64(16), ctypes.c_int64(0),
                                 ctypes.c_int64(16)) == -1


def test_amx_gemm_needs_the_cpu_feature_and_its_switch(monkeypatch):
    """The tiles are used only on a CPU with amx_bf16 (and AVX512-BF16's BW/VL, which the GEMM's packing uses) whose
    Linux grants them, and not with SWIFTKV_AMX_DECODE=0: anywhere else the other GEMMs run."""
    from swiftkv import platforms

    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16", "avx512bw",
                                                                   "avx512vl"}))
    assert not kernels.amx_available()
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "amx_bf16"}))
    assert not kernels.amx_available()  # no AVX512-BF16
    real = "amx_bf16" in __import__("pathlib").Path("/proc/cpuinfo").read_text()
    monkeypatch.setattr(platforms, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16", "avx512bw",
                                                                   "avx512vl", "amx_bf16"}))
    if kernels.library() is not None and not real:  # flags faked on a CPU without the tiles: Linux refuses them
        assert not kernels.amx_available()
    monkeypatch.setenv("SWIFTKV_AMX_DECODE", "0")
    assert not kernels.amx_available()


@needs_ops
@needs_amx
@pytest.mark.parametrize("kind", ["bf16", "q4"])
def test_bf16_engine_batched_decode_on_the_tiles_matches_the_bf16_model(monkeypatch, tmp_path, kind):
    """Eight sequences decoding together in bf16: the fused decoder's matmuls above 4 rows run on the tiles (bf16 and
    Q4-held weights alike); greedy output checked along its own path against the full-sequence bf16 model, and the
    logprobs against the AVX512-BF16 panel's (the same values, summed in another order)."""
    from conftest import assert_greedy_close, quantize_q4_1

    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    tiny_hf_model("llama", seed=3, hidden_size=128, intermediate_size=256, num_hidden_layers=4).save_pretrained(
        tmp_path / "base")
    model = to_swiftkv(load_model(tmp_path / "base")[0], SwiftKVConfig(4, 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(quantize_q4_1(p) if kind == "q4" else p.bfloat16())
    path = save_checkpoint(model.to(torch.bfloat16) if kind == "bf16" else model, tmp_path / "skv",
                           source_dir=tmp_path / "base")
    reference = load_model(path, dtype="bfloat16")[0]
    prompts = [[5 + i, 9, 17 + 2 * i, 3] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    outs = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("SWIFTKV_AMX_DECODE", amx)
        engine = LLMEngine(load_model(path, dtype="bfloat16", for_inference=True)[0],
                           config=EngineConfig(kv_cache_memory=4 << 20, block_size=4))
        assert engine.model.model.layers[0].mlp.gate_proj.held.kind == kind
        assert engine.runner.fused is not None
        assert bool(engine.runner.fused.bf16_dots & kernels.DOT_AMX) == (amx == "1")
        outs[amx] = [o.outputs[0] for o in run_to_end(engine, prompts, params)]
    for p, o in zip(prompts, outs["1"]):
        assert_greedy_close(reference, p, o, 0.02)
    for tiles, panel in zip(outs["1"], outs["0"]):
        assert [t.logprob for t in tiles.logprobs] == pytest.approx([t.logprob for t in panel.logprobs], abs=0.02)


@needs_amx
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (4, 2, 128), (2, 1, 96)])
def test_amx_flash_attention_is_causal_attention(heads, kv_heads, head_dim):
    """The AMX flash attention against causal attention in fp64 of the same bf16 inputs: within what PyTorch's own bf16
    flash attention (SDPA) errs by, for prompts of 1-300 tokens (partial query and key blocks), grouped-query heads, q /
    k / v strided views of one fused QKV row (as the layers pass them), and sharp softmaxes (large scores, where the
    reference max is raised and the accumulated outputs rescaled)."""
    import torch.nn.functional as F

    from swiftkv.kernels import flash_amx

    torch.manual_seed(0)
    heads_first = (lambda t: t.transpose(0, 1)[None])  # [T, H, D] -> [1, H, T, D]
    for T in (1, 15, 16, 33, 300):
        for sharp in (1.0, 12.0):
            qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).bfloat16()
            q = (qkv[:, : heads * head_dim] * sharp).view(T, heads, head_dim)
            k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
            v = qkv[:, (heads + kv_heads) * head_dim :].view(T, kv_heads, head_dim)
            out = flash_amx.causal_attention(q, k, v)
            assert out.shape == (T, heads, head_dim) and out.dtype == torch.bfloat16
            exact = F.scaled_dot_product_attention(*(heads_first(t.double()) for t in (q, k, v)), is_causal=True,
                                                   enable_gqa=True)[0].transpose(0, 1)
            sdpa = F.scaled_dot_product_attention(*(heads_first(t) for t in (q, k, v)), is_causal=True,
                                                  enable_gqa=True)[0].transpose(0, 1).double()
            err, sdpa_err = (out.double() - exact).abs(), (sdpa - exact).abs()
            assert err.max() <= 2 * sdpa_err.max() + 4e-3, (T, sharp, err.max(), sdpa_err.max())
            assert err.mean() <= 1.5 * sdpa_err.mean() + 1e-4, (T, sharp, err.mean(), sdpa_err.mean())
    with pytest.raises(ValueError, match="contiguous heads"):
        flash_amx.causal_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)


@needs_ops
@needs_amx
def test_engine_prompts_on_amx_flash_attention_match_the_bf16_model(monkeypatch, tmp_path):
    """A bf16 engine's fresh prompts (one alone, and four of different lengths in one step) run the AMX flash attention
    (auto's choice here), their greedy output checked along its own path against the full-sequence bf16 model (whose
    attention is PyTorch's SDPA); with SWIFTKV_PREFILL_ATTENTION=sdpa the kernel is not called."""
    from conftest import assert_greedy_close

    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.kernels import flash_amx
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    tiny_hf_model("llama", seed=5, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2).save_pretrained(tmp_path / "base")
    path = save_checkpoint(to_swiftkv(load_model(tmp_path / "base")[0], SwiftKVConfig(4, 2)), tmp_path / "skv",
                           source_dir=tmp_path / "base")
    reference = load_model(path, dtype="bfloat16")[0]
    calls = []
    real = flash_amx.causal_attention
    monkeypatch.setattr(flash_amx, "causal_attention", lambda q, k, v: calls.append(q.shape[0]) or real(q, k, v))
    prompts = [[(7 * i + 3 * j) % 90 + 5 for j in range(n)] for i, n in enumerate((40, 17, 70, 5))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    for choice in ("auto", "sdpa"):
        monkeypatch.setenv("SWIFTKV_PREFILL_ATTENTION", choice)
        calls.clear()
        for batch in (prompts[:1], prompts):
            engine = LLMEngine(load_model(path, dtype="bfloat16", for_inference=True)[0],
                               config=EngineConfig(kv_cache_memory=8 << 20, block_size=16))
            for p, out in zip(batch, run_to_end(engine, batch, params)):
                assert_greedy_close(reference, p, out.outputs[0], 0.03)
        assert (40 in calls and {17, 70, 5} <= set(calls)) == (choice == "auto"), (choice, calls)
