"""Decode layers in one native call (``layers/fused_decode.py``) against eager decode and against the
full-sequence model run on PyTorch's ops alone: greedy tokens equal, log-probs close, for the
baseline and SwiftKV (AcrossKV G = 1, 2, 3), Llama and Qwen2 (q/k/v biases), gemv (<= 4 sequences)
and panel-GEMM batches, chunked prompts and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_kernels, quantize_q4_1, tiny_hf_model, to_distinct_swiftkv

from swiftkv.kernels import fused_decode as fused_kernels
from swiftkv.kernels.switches import KernelSwitches
from swiftkv.layers import fused_decode

needs_fused = needs_kernels("fused_decode", "no AVX2/FMA or no C compiler: the fused decode layers cannot run here")
KERNEL_SWITCHES = ("SWIFTKV_PAGED_ATTENTION", "SWIFTKV_CPU_OPS", "SWIFTKV_COMPACT_WEIGHTS", "SWIFTKV_FUSED_DECODE")


def _compact_model(arch: str, l: int, G: int):
    """A tiny model whose projections have compact forms, as the built-in model's do: GGUF-like Q4_1
    blocks for the original ones, bf16 values for the SwiftKV ones (as distillation ships them)."""
    from swiftkv.models.llama import LlamaForCausalLM

    hf = tiny_hf_model(arch, seed=2, hidden_size=64, intermediate_size=128, num_hidden_layers=6)  # varied greedy outputs
    model = LlamaForCausalLM(hf.config)
    model.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(quantize_q4_1(p))
    return to_distinct_swiftkv(model, l, G, bf16=True)


def _run_engine(model, prompts, max_tokens, monkeypatch, fused: bool, logprobs: int = 0):
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.sampling_params import SamplingParams

    monkeypatch.setenv("SWIFTKV_FUSED_DECODE", "1" if fused else "0")
    ran = []  # the rows of each fused step, and "store" for each native SingleInputKV store
    decoder = fused_decode.FusedDecoder

    def counted(method, tag=None):
        def call(self, h, *a, **kw):
            ran.append(tag or h.shape[0])
            return method(self, h, *a, **kw)
        return call

    monkeypatch.setattr(decoder, "run_layers", counted(decoder.run_layers))
    monkeypatch.setattr(decoder, "run_all_layers", counted(decoder.run_all_layers))
    monkeypatch.setattr(decoder, "store_swiftkv", counted(decoder.store_swiftkv, "store"))
    store_in_step = fused_kernels.run_swiftkv  # a SwiftKV step's layers and store in one native call

    def counted_step(*a):
        ran.append("store")
        return store_in_step(*a)

    monkeypatch.setattr(fused_kernels, "run_swiftkv", counted_step)
    model.prepare_for_inference()  # (the first call; the engine never changes the model)
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=24))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out.outputs[0]
    return [done[i] for i in ids], ran, engine


@needs_fused
@pytest.mark.parametrize("arch,l,G", [("llama", 6, 1), ("llama", 3, 1), ("llama", 2, 2), ("llama", 3, 3),
                                      ("qwen2", 6, 1), ("qwen2", 2, 2), ("qwen2", 3, 3)])  # (qwen2 3/1: one token)
def test_engine_greedy_with_fused_decode_matches_eager_and_full_sequence(monkeypatch, arch, l, G):
    from swiftkv.models.full_sequence import greedy_generate

    model = _compact_model(arch, l, G)
    shared = list(range(20, 33))  # 13 tokens: three full 4-token blocks cached and hit by the later prompts
    prompts = [[5, 9, 17, 3], shared + [7, 1], list(range(1, 30)), shared + [2], [100] * 11, shared + [8, 8, 8]]
    for var in KERNEL_SWITCHES:
        monkeypatch.setenv(var, "0")
    refs = [greedy_generate(model, p, 8) for p in prompts]
    assert len({t for r in refs for t in r}) >= 4, refs  # varied outputs, so equality means something
    for var in KERNEL_SWITCHES:
        monkeypatch.delenv(var)

    fused, ran, engine = _run_engine(model, prompts, 8, monkeypatch, fused=True)
    assert engine.runner.fused is not None
    assert [o.token_ids for o in fused] == refs
    rows = [m for m in ran if m != "store"]
    assert any(m > 4 for m in rows) and any(m <= 4 for m in rows), ran  # both the panel GEMM and the gemv ran
    assert ("store" in ran) == (l < 6)  # SingleInputKV's K/V stored in the same native way

    eager, ran, _ = _run_engine(model, prompts, 8, monkeypatch, fused=False)
    assert ran == [] and [o.token_ids for o in eager] == refs
    for f, e in zip(fused, eager):
        torch.testing.assert_close([lp.logprob for lp in f.logprobs], [lp.logprob for lp in e.logprobs],
                                   atol=1e-4, rtol=0)


@needs_fused
@pytest.mark.parametrize("arch,l,G", [("llama", 6, 1), ("llama", 2, 2), ("qwen2", 3, 3)])
def test_bf16_engine_fused_decode_agrees_with_eager(monkeypatch, arch, l, G):
    """Computing in bf16 (bf16 KV cache): the fused call computes each step in fp32 and rounds K/V and the
    residual stream to bf16, eager bf16 rounds after every op: the same tokens, log-probs close -- up to a near-tie
    (a random tiny model has exact ties in bf16), where each path's token is the other's runner-up within the
    tolerance and the comparison of that sequence ends (as vLLM's check_logprobs_close)."""
    model = _compact_model(arch, l, G).to(torch.bfloat16)
    prompts = [[5, 9, 17, 3], list(range(1, 30)), [100] * 11]
    fused, ran, engine = _run_engine(model, prompts, 8, monkeypatch, fused=True, logprobs=2)
    assert engine.runner.kv_cache.dtype == torch.bfloat16 and any(m != "store" for m in ran)
    eager, ran, _ = _run_engine(model, prompts, 8, monkeypatch, fused=False, logprobs=2)
    assert ran == []
    compared = 0
    for f, e in zip(fused, eager):
        for tf, te, lf, le in zip(f.token_ids, e.token_ids, f.logprobs, e.logprobs):
            if tf != te:  # a near-tie: both tokens in both top-2s, within the tolerance
                assert abs(lf.top[tf] - lf.top[te]) <= 0.05 and abs(le.top[tf] - le.top[te]) <= 0.05
                break
            assert abs(lf.logprob - le.logprob) <= 0.05
            compared += 1
    assert compared >= 20  # most of the 24 tokens agree


def _fused(model, dtype=torch.float32, switches=None):
    """The fused decoder the engine would build for ``model`` (prepared here, in place)."""
    model.prepare_for_inference(dtype)
    decoder = fused_decode.FusedDecoder.build(model.fused_decode_spec(), switches or KernelSwitches())
    return decoder if decoder is not None and decoder.runs(model.swiftkv_config, torch.empty(0, dtype=model.compute_dtype)) else None


@needs_fused
def test_fused_decoder_applies_only_where_it_can(monkeypatch):
    """Every held form (compact, bf16, fp32) and both compute dtypes take the fused path; SwiftKV adapters or a
    switched-off kernel do not (eager layers)."""
    from swiftkv.config import SwiftKVConfig
    from swiftkv.models.llama import LlamaForCausalLM
    from swiftkv.transform import to_swiftkv

    assert _fused(_compact_model("llama", 3, 1)) is not None
    assert _fused(LlamaForCausalLM(tiny_hf_model("llama").config)) is not None  # random fp32 weights, held as is
    assert _fused(_compact_model("llama", 3, 1), torch.bfloat16) is not None  # a bf16 cache, fp32 arithmetic
    adapted = to_swiftkv(_compact_model("llama", 6, 1), SwiftKVConfig(6, 3, 1), adapter_rank=2)
    assert _fused(adapted) is None

    assert _fused(_compact_model("llama", 3, 1), switches=KernelSwitches(fused_decode=False)) is None
    assert _fused(_compact_model("llama", 3, 1), switches=KernelSwitches(paged_attention=False)) is None
    monkeypatch.setenv("SWIFTKV_CPU_OPS", "0")  # one of the kernels it is made of
    assert fused_kernels.library() is None


@needs_fused
def test_a_fused_call_runs_in_one_parallel_region(monkeypatch):
    """Each fused call (a run of layers, SingleInputKV's store) opens one OpenMP region for all its kernels, its
    threads (explicit slots) meeting at spin barriers between dependent ops -- not a region per kernel call
    (~10 per layer), whose sleeping workers a second OpenMP pool used to make 1.4-1.9x slower. Counted by the
    library itself; the greedy output is checked against the full-sequence model by the tests above."""
    import torch

    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.sampling_params import SamplingParams

    regions = fused_kernels.parallel_regions
    model = _compact_model("llama", 3, 1)
    model.prepare_for_inference()
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4))
    assert engine.runner.fused is not None
    opened = []
    for name in ("run_layers", "store_swiftkv", "run_all_layers"):
        real = getattr(fused_decode.FusedDecoder, name)

        def counted(self, *a, _real=real, **kw):
            before = regions()
            out = _real(self, *a, **kw)
            opened.append(regions() - before)
            return out

        monkeypatch.setattr(fused_decode.FusedDecoder, name, counted)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # a team of at least two slots, even on a one-core runner
    try:
        for rows in (1, 6):  # gemv and the panel GEMM
            opened.clear()
            for i in range(rows):
                engine.add_request([5 + i, 9, 17, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
            assert opened and all(n == 1 for n in opened), opened  # (a step's layers and store: one call)
    finally:
        torch.set_num_threads(threads)
