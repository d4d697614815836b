"""Shared fixtures: tiny random Llama/Qwen2 models built with transformers, saved as HF dirs."""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import swiftkv  # noqa: F401  (registers the SwiftKV transformers classes)



def needs_kernels(binding: str, reason: str = "no AVX2/FMA/F16C or no C compiler: these kernels cannot run here"):
    """Mark a test that needs the C kernels of ``swiftkv.kernels.<binding>``: skipped where its ``library()`` is
    None, decided when the test is set up (the library is built on first use, never while collecting)."""
    return pytest.mark.kernel_library(binding, reason=reason)


def pytest_configure(config):
    # tests are not benchmarks: no waiting for quiet CPUs before each timed run (swiftkv.bench.interleave)
    os.environ.setdefault("SWIFTKV_BENCH_QUIET_WAIT_S", "0")
    config.addinivalue_line("markers", "kernel_library(binding, reason): needs swiftkv.kernels.<binding>.library()")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("kernel_library"):
        if importlib.import_module(f"swiftkv.kernels.{mark.args[0]}").library() is None:
            pytest.skip(mark.kwargs["reason"])


def assert_greedy_close(reference, prompt: list[int], out, tol: float, mode: bool | None = None) -> None:
    """Greedy output ``out`` (a ``CompletionOutput`` with ``logprobs``) checked along its own path against the
    full-sequence ``reference``, as vLLM's ``check_logprobs_close`` does rather than exact token equality: at every
    step the chosen token is the reference's argmax to within ``tol`` (a near-tie may break either way below
    the dtype's resolution: bf16 logits differ from fp32 by ~1 ulp, more than some of a tiny model's top-2
    margins) and its logprob is the reference's to within ``tol``. A real divergence -- a token the reference
    ranks clearly lower, or logits that are off -- still fails."""
    from swiftkv.models.full_sequence import full_logits

    got = list(out.token_ids)
    rows = full_logits(reference, [list(prompt) + got], mode)[0].float().log_softmax(-1)[len(prompt) - 1:-1]
    chosen = rows.gather(1, torch.tensor(got)[:, None])[:, 0]
    below_argmax = rows.max(-1).values - chosen
    assert float(below_argmax.max()) <= tol, (
        f"step {int(below_argmax.argmax())}: the chosen token is {float(below_argmax.max()):.4f} below the "
        f"reference's argmax (tolerance {tol}); tokens {got}")
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]), chosen, atol=tol, rtol=0)


TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def tiny_config(arch: str = "llama", **overrides):
    kw = {**TINY, **overrides}
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "llama3":
        kw.setdefault("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    return LlamaConfig(**kw)


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A transformers reference model with random weights (biases randomised too)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = (Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms and biases
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def to_distinct_swiftkv(model, l: int, G: int, bf16: bool = False):
    """``model`` (L layers) converted to SwiftKV ``(l, G)``, its new tensors moved off their initial copies
    so an engine that ignored them would differ; bf16 values when ``bf16`` (as distillation ships
    them). ``l == L``: the model itself."""
    from swiftkv.config import SwiftKVConfig
    from swiftkv.transform import to_swiftkv

    L = model.config.num_hidden_layers
    if l == L:
        return model
    model = to_swiftkv(model, SwiftKVConfig(L, l, G))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_swiftkv" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
                if bf16:
                    p.copy_(p.bfloat16().float())
    return model


def run_to_end(engine, prompts, params, check_blocks: bool = False):
    """Requests for ``prompts`` run to the end on ``engine``: their outputs in prompt order. ``check_blocks``: the
    block accounting is checked after every step, and every block is free at the end."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check_blocks:
            engine.block_manager.check(engine.scheduler.running)
    if check_blocks:
        assert engine.block_manager.num_used_blocks == 0
    return [done[i] for i in ids]


class OracleProposer:
    """Drafts the reference's true continuation with every third draft wrong: accepted and rejected drafts, every
    step, whatever the n-gram statistics of a random model."""

    def __init__(self, prompts, refs, k=3):
        self.cases, self.k, self.calls = list(zip(prompts, refs)), k, 0

    def propose(self, token_ids, max_drafts=None):
        self.calls += 1
        for prompt, ref in self.cases:
            if token_ids[: len(prompt)] == prompt and ref[: len(token_ids) - len(prompt)] == token_ids[len(prompt):]:
                drafts = ref[len(token_ids) - len(prompt):][: min(self.k, max_drafts)]
                return [(t + 1) % 128 if (self.calls + j) % 3 == 0 else t for j, t in enumerate(drafts)]
        return []


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


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: save a tiny transformers model to a directory and return (path, hf_model)."""

    def make(arch: str = "llama", **overrides):
        model = tiny_hf_model(arch, **overrides)
        path = tmp_path / f"{arch}-base"
        model.save_pretrained(path)
        return path, model

    return make


CHAT_WORDS = "alpha beta gamma delta river stone cloud paper light green small quick answer number".split()


def random_chats(n: int, seed: int = 0) -> list[dict]:
    """``n`` random 1-2 turn chats ({"id", "messages"}) of a 14-word vocabulary (distillation data)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"role": "user", "content": " ".join(rng.choices(CHAT_WORDS, k=rng.randint(3, 12)))})
            turns.append({"role": "assistant", "content": " ".join(rng.choices(CHAT_WORDS, k=rng.randint(3, 20)))})
        out.append({"id": f"c{i}", "messages": turns})
    return out


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer and chat template (vocab 49152)."""
    import shutil

    from swiftkv.builtin import default_model_dir

    src = default_model_dir()
    path = tmp_path_factory.mktemp("tiny-chat")
    tiny_hf_model("llama", vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True,
                  eos_token_id=2, bos_token_id=1).save_pretrained(path)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, path / f.name)
    return path


# -- the HTTP server on loopback (test_server*.py) -----------------------------------------------

SERVED_MODEL = "tiny"


class LoopbackServer:
    """``swiftkv serve``'s app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        import socket
        import threading
        import time

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


FAULTY_SEED = 666


@pytest.fixture
def row_fault(monkeypatch):
    """Sampling fails for rows whose request has ``seed=FAULTY_SEED`` (the others sample as usual)."""
    from swiftkv.layers import sampler

    real = sampler._sample_row

    def faulty(logits, p, gen, draft=None):
        if p.seed == FAULTY_SEED:
            raise RuntimeError("injected row fault")
        return real(logits, p, gen, draft)

    monkeypatch.setattr(sampler, "_sample_row", faulty)
    return FAULTY_SEED


def start_server(model_dir, **kw):
    from swiftkv.llm import LLM
    from swiftkv.server.app import build_app

    llm = LLM(model_dir, dtype="float32", max_num_seqs=kw.pop("max_num_seqs", 64), kv_cache_memory=64 << 20,
              speculative_config=kw.pop("speculative_config", None))
    app = build_app(llm, SERVED_MODEL, **kw)
    return LoopbackServer(app), app


@pytest.fixture(scope="session")
def server(tiny_chat_model_dir):
    """One shared server with default settings: ``(LoopbackServer, app)``."""
    srv, app = start_server(tiny_chat_model_dir)
    yield srv, app
    srv.stop()


@pytest.fixture
def serve(tiny_chat_model_dir):
    """Factory for a server with its own settings (``build_app`` keywords); stopped after the test."""
    started = []

    def make(**kw):
        srv, app = start_server(tiny_chat_model_dir, **kw)
        started.append(srv)
        return srv, app

    yield make
    for srv in started:
        srv.stop()
