"""Weights held in their stored form (``layers/weights.py``): compact forms found only where they reproduce
the fp32 weights bit for bit (4-bit codes for Q4_1 values, 8-bit for Q8_0, bf16), the kernels on every form
against F.linear, prefill-sized batches through the widened GEMM, and the engine's greedy output with them
against the full-sequence model."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import gguf_like, needs_kernels, quantize_q4_1

from swiftkv.kernels import linear as kernels
from swiftkv.layers import linear as linear_layers
from swiftkv.layers.linear import Linear
from swiftkv.layers.weights import find_compact_form, hold

needs_kernel = needs_kernels("linear", "no AVX2/FMA/F16C or no C compiler: the matmul kernels cannot run here")


def _weight(kind: str, out: int = 200, inp: int = 576, seed: int = 0) -> torch.Tensor:
    """An fp32 weight whose narrowest exact form is ``kind``."""
    if kind in ("q4_1", "q8_0"):
        return gguf_like(out, inp, kind, seed)
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return w.bfloat16().float() if kind == "bf16" else w


@pytest.mark.parametrize("kind,form,bytes_per_weight", [("q4_1", "q4", 0.625), ("q8_0", "q8", 1.25),
                                                         ("bf16", "bf16", 2)])
def test_compact_form_is_exact_where_it_exists(kind, form, bytes_per_weight):
    w = _weight(kind, 96, 128)
    held = find_compact_form(w)
    assert held.kind == form and held.nbytes == 96 * 128 * bytes_per_weight
    assert torch.equal(held.dense().float(), w)  # bit for bit
    ids = torch.tensor([5, 0, 95, 5])
    assert torch.equal(held.rows(ids), w[ids])  # embedding lookups read the same values


def test_no_compact_form_for_ordinary_weights():
    assert find_compact_form(torch.randn(64, 128)) is None  # random fp32
    assert find_compact_form(torch.randn(64, 84)) is None  # inputs not a multiple of 8
    assert find_compact_form(gguf_like(64, 96, "q4_1")[:, :80]) is None  # not blocks of 32, not bf16 values
    w = gguf_like(64, 128, "q4_1")
    w[3, 7] += 1e-7  # one value off the grid (and off bf16) disqualifies the tensor
    assert find_compact_form(w) is None
    w = gguf_like(9000, 64, "q4_1")  # past the row-chunk size: found chunk by chunk, then whole
    assert find_compact_form(w).kind == "q4" and torch.equal(find_compact_form(w).dense(), w)


@needs_kernel
def test_hold_keeps_the_stored_bytes():
    bf16 = torch.randn(64, 128).bfloat16()
    for dtype in (torch.float32, torch.bfloat16):  # a bf16 checkpoint stays bf16: the same tensor, not a copy
        assert hold(bf16, dtype).data.data_ptr() == bf16.data_ptr()
    f32 = torch.randn(64, 128)
    assert hold(f32, torch.float32).data.data_ptr() == f32.data_ptr()
    assert hold(f32, torch.bfloat16).kind == "bf16"  # computed in bf16: converted once, not kept in fp32
    assert hold(gguf_like(64, 128, "q4_1"), torch.bfloat16).kind == "q4"


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16", "f32"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 32, 130])  # gemv sizes, every GEMM tile remainder
def test_kernels_match_f_linear(rows, kind):
    out = 203  # not a multiple of the 8-row panel or the 4-row tile
    w = _weight(kind, out, 576, seed=rows)
    held = hold(w, torch.float32)
    assert held.kind == {"q4_1": "q4", "q8_0": "q8"}.get(kind, kind)
    b, x = torch.randn(out), torch.randn(rows, 576)
    torch.testing.assert_close(kernels.linear(x, held.c_weight(b)), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    y = torch.full((rows, out + 5), 7.0)  # rows written `out + 5` apart: the columns past `out` untouched
    kernels.linear(x, held.c_weight(), out=y[:, :out])
    torch.testing.assert_close(y[:, :out], F.linear(x, w), atol=1e-4, rtol=1e-5)
    assert bool((y[:, out:] == 7.0).all())


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16", "f32"])
@pytest.mark.parametrize("bf16_dot", ["1", "0"])  # bf16 from the codes with AVX-512 (where the CPU has it), or not
def test_widen_is_exact(kind, bf16_dot, monkeypatch):
    monkeypatch.setenv("SWIFTKV_BF16_DOT", bf16_dot)
    w = _weight(kind, 50, 96)
    held = hold(w, torch.float32)
    out = torch.empty(20, 96)
    assert torch.equal(kernels.widen(held.c_weight(), 10, 20, out), w[10:30])
    out16 = torch.empty(20, 96, dtype=torch.bfloat16)
    assert torch.equal(kernels.widen(held.c_weight(), 10, 20, out16), w[10:30].bfloat16())  # rounded as PyTorch


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "bf16", "f32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_linear_matches_f_linear_at_every_batch_size(kind, dtype, monkeypatch):
    w, b = _weight(kind, 96, 64), torch.randn(96)
    lin = Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(w), lin.bias.copy_(b)
    lin.prepare(dtype)
    assert lin.weight is None and lin.held is not None  # one copy: the held form
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.15, "rtol": 0.02}
    for shape in ((1, 64), (7, 64), (2, 5, 64), (300, 64)):  # gemv, GEMM, 3-D, widened for oneDNN
        x = torch.randn(*shape)
        with torch.no_grad():
            y = lin(x.to(dtype))
        assert y.dtype == dtype and y.shape == (*shape[:-1], 96)
        torch.testing.assert_close(y.float(), F.linear(x, w, b), **tol)
    monkeypatch.setattr(linear_layers, "WIDEN_CHUNK_BYTES", 20 * 64 * 4)  # widened 20 rows at a time
    x = torch.randn(300, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x.to(dtype)).float(), F.linear(x, w, b), **tol)


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "bf16", "f32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_silu_in_the_matmul_epilogues_matches_pytorch(kind, dtype, monkeypatch):
    """``silu(gate(x)) * up(x)`` with the SiLU and the product in oneDNN's epilogues (bf16 prefill-sized batches,
    widened whole or in chunks, with biases) against PyTorch's ops on the weights' held values; decode-sized batches
    the kernels take, fp32 and a CPU without native bf16 are left to the activation (None)."""
    lins = []
    for seed in (1, 2):
        w, b = _weight(kind, 96, 64, seed), torch.randn(96)
        lin = Linear(64, 96)
        with torch.no_grad():
            lin.weight.copy_(w), lin.bias.copy_(b)
        lins.append((lin, w, b))
    for lin, _, _ in lins:
        lin.prepare(dtype)
    (gate, wg, bg), (up, wu, bu) = lins
    x = torch.randn(2, 150, 64).to(dtype)
    r = (lambda t: t.to(dtype).float())  # the values the model holds: rounded to bf16 in a bf16 model
    expected = F.silu(F.linear(r(x), r(wg), r(bg))) * F.linear(r(x), r(wu), r(bu))
    tol = {"atol": 2e-2, "rtol": 2**-7}  # the SiLU's and the product's outputs rounded to bf16, sums in another order
    with torch.no_grad():
        small = linear_layers.gated_silu(gate, up, x[:, :3])  # 6 rows: the kernels' batch (on AMX, bf16: oneDNN's)
        y = linear_layers.gated_silu(gate, up, x)
        if dtype != torch.bfloat16 or not linear_layers._onednn_available(dtype):  # fp32, or no native bf16: PyTorch
            assert y is None and small is None
            return
        assert (small is None) == gate.method._kernels_take(x[:, :3].reshape(-1, 64))
        if small is not None:
            torch.testing.assert_close(small.float(), expected[:, :3], **tol)
        assert y is not None and y.dtype == dtype and y.shape == (2, 150, 96)
        torch.testing.assert_close(y.float(), expected, **tol)
        monkeypatch.setattr(linear_layers, "WIDEN_CHUNK_BYTES", 20 * 64 * 4)  # widened 20 rows at a time
        torch.testing.assert_close(linear_layers.gated_silu(gate, up, x).float(), expected, **tol)
    with torch.enable_grad():
        assert linear_layers.gated_silu(gate, up, x) is None  # training keeps PyTorch's ops


@needs_kernel
@pytest.mark.parametrize("l,G", [(6, 1), (3, 1), (2, 2)])
def test_engine_greedy_with_compact_weights_matches_full_sequence(l, G):
    from conftest import tiny_hf_model

    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.full_sequence import greedy_generate
    from swiftkv.models.llama import LlamaForCausalLM
    from swiftkv.sampling_params import SamplingParams
    from swiftkv.transform import to_swiftkv

    hf = tiny_hf_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6)
    base = LlamaForCausalLM(hf.config)
    base.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():  # every projection GGUF-like (4-bit blocks), the SwiftKV ones bf16 below
        for name, p in base.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(quantize_q4_1(p))
    model = base if l == 6 else to_swiftkv(base, SwiftKVConfig(6, l, G))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_swiftkv" in name and p.dim() == 2:  # as distillation ships them: bf16 values
                p.add_(torch.randn_like(p) * 0.02).copy_(p.bfloat16().float())
    prompts = ([5, 9, 17, 3], list(range(1, 13)))
    refs = [greedy_generate(model, p, 12) for p in prompts]
    assert sum(len(set(r)) for r in refs) >= 5  # varied outputs, so equality means something
    model.prepare_for_inference()
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20))
    assert engine.model.model.layers[0].mlp.gate_proj.held.kind == "q4"
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[i] for i in ids] == refs
