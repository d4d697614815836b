"""Exact compact weights (8-bit blocks, bf16): found only where they reproduce the fp32 weights bit
for bit, the kernels against F.linear, and the engine's greedy output with them against the
full-sequence model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftkv.layers import compact_weights
from swiftkv.layers.compact_weights import (
    GEMM_MAX_ROWS,
    GEMV_ROWS,
    MAX_ROWS,
    compact_gemm,
    compact_matmul,
    to_compact,
)

needs_kernel = pytest.mark.skipif(compact_weights.kernel() is None,
                                  reason="no AVX2/FMA or no C compiler: the compact-weight kernel cannot run here")


def gguf_like(out_features: int, in_features: int, kind: str, seed: int = 0) -> torch.Tensor:
    """fp32 weights as GGUF dequantizes them: Q4_1 (fp16 scale * q + fp16 min, q in 0..15) or
    Q8_0 (fp16 scale * q, q in -127..127), blocks of 32 inputs."""
    g = torch.Generator().manual_seed(seed)
    blocks = (out_features, in_features // 32)
    d = (torch.rand(*blocks, 1, generator=g) * 0.02 + 1e-3).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (*blocks, 32), generator=g).float()
        q[..., 0], q[..., 1] = 0, 15  # the block's min and max, as quantization makes them
        m = (-d * (7 + torch.rand(*blocks, 1, generator=g))).half().float()  # roughly zero-mean blocks
        w = d * q + m
    else:
        q = torch.randint(-127, 128, (*blocks, 32), generator=g).float()
        q[..., 0] = 127
        w = d * q
    return w.reshape(out_features, in_features)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to GGUF Q4_1 and dequantized back to fp32, as llama.cpp's quantizer does."""
    b = w.reshape(w.shape[0], -1, 32)
    m = b.amin(-1, keepdim=True).half().float()
    d = ((b.amax(-1, keepdim=True) - m) / 15).half().float()
    q = torch.round((b - m) / d).clamp(0, 15)
    return (d * q + m).reshape(w.shape)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_blocked_form_is_exact_where_it_exists(kind):
    w = gguf_like(96, 128, kind)
    cw = to_compact(w)
    assert cw.kind == "blocked8" and cw.data.dtype == torch.uint8 and cw.scale.shape == (96, 4)
    recon = cw.data.float().view(96, 4, 32) * cw.scale[..., None] + cw.offset[..., None]
    assert torch.equal(recon.reshape(96, 128), w)  # bit for bit


def test_bf16_form_and_none_for_ordinary_weights():
    w = torch.randn(64, 128).bfloat16().float()
    cw = to_compact(w)
    assert cw.kind == "bf16" and torch.equal(cw.data.float(), w)
    assert to_compact(torch.randn(64, 128)) is None  # random fp32
    assert to_compact(torch.randn(64, 84)) is None  # inputs not a multiple of 8
    assert to_compact(gguf_like(64, 96, "q4_1")[:, :80]) is None  # 80 inputs: not blocks of 32, not bf16 values
    w = gguf_like(64, 128, "q4_1")
    w[3, 7] += 1e-7  # one value off the grid (and off bf16) disqualifies the tensor
    assert to_compact(w) is None


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "bf16"])
@pytest.mark.parametrize("rows", list(range(1, MAX_ROWS + 1)))
def test_kernel_matches_f_linear(rows, kind):
    w = gguf_like(200, 576, "q4_1", seed=rows) if kind == "q4_1" else torch.randn(200, 576).bfloat16().float()
    b, x = torch.randn(200), torch.randn(rows, 576)
    cw = to_compact(w)
    assert cw.kind == ("blocked8" if kind == "q4_1" else "bf16")
    torch.testing.assert_close(compact_matmul(x, cw, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)  # outputs ~24
    with pytest.raises(ValueError, match="1..8 rows"):
        compact_matmul(torch.randn(MAX_ROWS + 1, 576), cw)


@needs_kernel
@pytest.mark.parametrize("kind", ["q4_1", "q8_0", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 32, 130])  # every micro-tile remainder, one above the limit
def test_gemm_kernel_matches_f_linear(rows, kind):
    out = 203  # not a multiple of the 8-row panel or the 4-row tile
    w = gguf_like(out, 576, kind, seed=rows) if kind != "bf16" else torch.randn(out, 576).bfloat16().float()
    b, x = torch.randn(out), torch.randn(rows, 576)
    torch.testing.assert_close(compact_gemm(x, to_compact(w), b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_inference_linear_picks_gemv_gemm_or_onednn_by_rows(monkeypatch):
    from swiftkv.layers.linear import InferenceLinear

    w = gguf_like(64, 96, "q8_0")
    lin = InferenceLinear(w, None)
    assert lin.compact is not None
    calls = []
    for name in ("compact_matmul", "compact_gemm"):
        monkeypatch.setattr(compact_weights, name,
                            lambda *a, _n=name: calls.append((_n, a[0].shape[0])) or torch.zeros(a[0].shape[0], 64))
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 1, GEMM_MAX_ROWS, GEMM_MAX_ROWS + 1):
        lin(torch.randn(rows, 96))
    assert calls == [("compact_matmul", 1), ("compact_matmul", GEMV_ROWS), ("compact_gemm", GEMV_ROWS + 1),
                     ("compact_gemm", GEMM_MAX_ROWS)]  # above the limit: oneDNN's fp32 path
    monkeypatch.setenv("SWIFTKV_COMPACT_WEIGHTS", "0")
    assert InferenceLinear(w, None).compact is None


@needs_kernel
@pytest.mark.parametrize("l,G", [(6, 1), (3, 1), (2, 2)])
def test_engine_greedy_with_compact_weights_matches_full_sequence(l, G):
    from conftest import tiny_hf_model

    from swiftkv.config import SwiftKVConfig
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.full_sequence import greedy_generate
    from swiftkv.models.llama import LlamaForCausalLM
    from swiftkv.transform import to_swiftkv

    hf = tiny_hf_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6)
    base = LlamaForCausalLM(hf.config)
    base.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():  # every projection GGUF-like (8-bit blocks), the SwiftKV ones bf16 below
        for name, p in base.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(quantize_q4_1(p))
    model = base if l == 6 else to_swiftkv(base, SwiftKVConfig(6, l, G))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_swiftkv" in name and p.dim() == 2:  # as distillation ships them: bf16 values
                p.add_(torch.randn_like(p) * 0.02).copy_(p.bfloat16().float())
    refs = [greedy_generate(model, p, 12) for p in ([5, 9, 17, 3], list(range(1, 13)))]
    assert sum(len(set(r)) for r in refs) >= 5  # varied outputs, so equality means something
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20))
    assert model.model.layers[0].mlp.gate_up.compact.kind == "blocked8"
    from swiftkv.sampling_params import SamplingParams

    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
           for p in ([5, 9, 17, 3], list(range(1, 13)))]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[i] for i in ids] == refs
