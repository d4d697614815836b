"""Benchmark arithmetic and rendering (benchmarks themselves live apart from tests)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from swiftkv.bench.env import KV_CACHE_GIB
from swiftkv.bench.flops import decode_flops, layer_flops, prefill_flops
from swiftkv.bench.offline import summarise, workload_flops
from swiftkv.bench.report import format_table, ratio_lines
from swiftkv.bench.workloads import Workload
from swiftkv.config import SwiftKVConfig

CFG = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4,
                  intermediate_size=16, vocab_size=10)  # head_dim 4


def test_layer_and_decode_flops_by_hand():
    # projections: q 8*8 + k,v 2*8*4 + o 8*8 + mlp 3*8*16 = 64 + 64 + 64 + 384 = 576 MACs
    assert layer_flops(CFG, 0) == 2 * 576
    assert layer_flops(CFG, 5) == 2 * 576 + 4 * 2 * 4 * 5  # QK^T and PV over 5 keys, 2 heads of dim 4
    assert decode_flops(CFG, 5) == 4 * layer_flops(CFG, 5) + 2 * 8 * 10


def test_prefill_flops_baseline_and_swiftkv():
    n = 6
    base = sum(4 * layer_flops(CFG, p + 1) for p in range(n)) + 2 * 8 * 10
    assert prefill_flops(CFG, SwiftKVConfig(4, 4), n, swiftkv=False) == base
    skv = SwiftKVConfig(4, 2, 2)  # l=2, one AcrossKV group of 2 later layers -> one leader
    kv = 2 * 2 * 8 * 4  # one token's K+V projections for one leader
    expected = (sum(2 * layer_flops(CFG, p + 1) for p in range(n)) + n * kv
                + 2 * (layer_flops(CFG, n) - kv) + 2 * 8 * 10)
    assert prefill_flops(CFG, skv, n, swiftkv=True) == expected
    assert prefill_flops(CFG, skv, n, swiftkv=True) < base


def test_prefill_flops_skip_cached_tokens_and_shared_prefixes_count_once():
    n, c = 40, 16
    base = SwiftKVConfig(4, 4)
    by_hand = sum(4 * layer_flops(CFG, p + 1) for p in range(c, n)) + 2 * 8 * 10  # positions c..n-1 computed
    assert prefill_flops(CFG, base, n, swiftkv=False, cached=c) == by_hand
    shared = [1] * 40
    w = Workload("shared-prefix", [[*shared, 7, 8], [*shared, 9, 9, 9], [5] * 20], 2)
    plain = Workload("custom", w.prompts, 2)  # the same prompts, no prefix caching
    saved = workload_flops(CFG, base, plain, False) - workload_flops(CFG, base, w, False)
    # the second prompt finds 32 of its tokens (2 full blocks of 16) cached; nothing else is shared
    assert saved == prefill_flops(CFG, base, 43, False) - prefill_flops(CFG, base, 43, False, cached=32) > 0


def test_summarise_mfu_and_rates():
    w = Workload("custom", [[1] * 10, [1] * 30], 5)
    raw = [{"wall_s": 2.0, "ttft": [0.5, 1.0], "tpot": [0.1, 0.2]}, {"wall_s": 4.0, "ttft": [1, 2], "tpot": [1, 1]}]
    s = summarise(raw, w, flops=6e9, peak=1e10)
    assert s["wall_s"] == 3.0  # median of reps
    assert s["total_tokens_per_s"] == (40 + 10) / 3.0
    assert s["gflops_per_s"] == 2.0 and abs(s["mfu"] - 0.2) < 1e-12


def test_table_rendering():
    systems = {"swiftkv": {"total_tokens_per_s": 1500.4, "mfu": 0.123, "ttft_p50_s": 0.25},
               "transformers": {"total_tokens_per_s": 500.0}}
    table = format_table(systems).splitlines()
    assert table[0].split()[:3] == ["system", "tok/s", "req/s"]
    assert table[1].split()[0:2] == ["swiftkv", "1500"] and "12.3%" in table[1] and "0.25s" in table[1]
    assert table[2].split()[1] == "500" and table[2].count("-") >= 8
    assert ratio_lines(systems) == ["swiftkv/transformers total_tokens_per_s: 3.00x"]


# -- peers (vLLM / llama.cpp) -------------------------------------------------------------------
# The real peers are optional and never installed in CI: these fakes stand in for the libraries so
# the real worker script, the process protocol and the error paths are exercised.

FAKE_VLLM = '''
__version__ = "0.0-fake"
print("vllm banner on stdout")  # real vLLM logs to stdout: the parent must skip such lines
class SamplingParams:
    def __init__(self, **kw): self.kw = kw
class _Out:
    def __init__(self, n): self.token_ids = list(range(n))
class _Req:
    def __init__(self, n): self.outputs = [_Out(n)]
class LLM:
    def __init__(self, model, **kw):
        import os
        if "missing" in model: raise FileNotFoundError(model)
        assert kw["enable_prefix_caching"] is False
        assert kw["dtype"] == os.environ["FAKE_EXPECT_DTYPE"], kw["dtype"]  # the parent's dtype, passed through
        k = int(os.environ.get("FAKE_EXPECT_DRAFTS", "0"))  # its own speculative decoding, when the bench asks
        assert (kw["speculative_config"] or {}).get("num_speculative_tokens", 0) == k, kw["speculative_config"]
    def generate(self, prompts, params, use_tqdm=True):
        import os, signal, time
        print("progress noise")
        global CALLS
        CALLS = globals().get("CALLS", 0) + 1
        if CALLS == int(os.environ.get("FAKE_CRASH_AT", "0")):  # as llama.cpp's AMX build on a Q4_1 GGUF
            print("fake peer: about to crash", flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if CALLS == int(os.environ.get("FAKE_HANG_AT", "0")):
            time.sleep(600)
        return [_Req(params.kw["max_tokens"]) for _ in prompts]
'''
FAKE_LLAMA_CPP = '''
import os, sys, types
__version__ = "0.0-fake"
class LlamaPromptLookupDecoding:
    def __init__(self, num_pred_tokens, max_ngram_size): self.k = num_pred_tokens
sys.modules["llama_cpp.llama_speculative"] = types.SimpleNamespace(LlamaPromptLookupDecoding=LlamaPromptLookupDecoding)
class Llama:
    def __init__(self, model_path, **kw):
        self.n = 0
        k = int(os.environ.get("FAKE_EXPECT_DRAFTS", "0"))
        assert (kw["draft_model"].k if kw["draft_model"] else 0) == k, kw["draft_model"]
    def reset(self): self.n = 0
    def generate(self, tokens, **kw):
        while True:
            yield 7
'''
FAKE_OPENVINO_GENAI = '''
__version__ = "0.0-fake-123"
class GenerationConfig:
    pass
class SchedulerConfig:
    enable_prefix_caching = True
class TokenizedInputs:
    def __init__(self, input_ids, attention_mask): self.input_ids = input_ids
class _Results:
    def __init__(self, tokens): self.tokens = tokens
class LLMPipeline:
    def __init__(self, model, device, scheduler_config, **props):
        import os
        assert device == "CPU" and props["INFERENCE_PRECISION_HINT"] == os.environ["FAKE_EXPECT_HINT"], props
        assert scheduler_config.enable_prefix_caching is False  # no KV reused between runs
        self.batches = []
    def generate(self, inputs, config):
        assert config.min_new_tokens == config.max_new_tokens and config.ignore_eos and not config.do_sample
        rows = inputs.input_ids.data
        assert len({len(r) for r in rows}) == 1  # one prompt length per batch
        return _Results([list(range(config.max_new_tokens)) for _ in rows])
'''
FAKE_OPENVINO = '''
class Tensor:
    def __init__(self, data): self.data = data
'''


def _fake_site(tmp_path):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (tmp_path / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids): return prompt_token_ids\n")
    (tmp_path / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    (tmp_path / "openvino_genai.py").write_text(FAKE_OPENVINO_GENAI)
    (tmp_path / "openvino.py").write_text(FAKE_OPENVINO)
    return tmp_path


def test_peer_process_protocol_with_fake_backends(tmp_path, monkeypatch):
    import sys

    import pytest

    from swiftkv.bench.peers import Peer, find_peer_python

    monkeypatch.setenv("PYTHONPATH", str(_fake_site(tmp_path)))
    monkeypatch.setenv("FAKE_EXPECT_DTYPE", "float32")
    monkeypatch.setenv("FAKE_EXPECT_HINT", "f32")  # OpenVINO computes in the dtype it is given
    for backend in ("vllm", "vllm-swiftkv", "llama.cpp", "openvino"):
        peer = Peer(backend, sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="float32")
        try:
            assert peer.version == ("0.0" if backend == "openvino" else "0.0-fake")  # (OpenVINO: no build suffix)
            assert peer.dtype == ("gguf" if backend == "llama.cpp" else "float32")
            out = peer.run([[1, 2, 3], [4, 5]], 4)  # (OpenVINO: one batch per prompt length)
            assert out["output_tokens"] == [4, 4] and len(out["ttft"]) == len(out["tpot"]) == 2
            assert out["wall_s"] >= 0 and all(t >= 0 for t in out["ttft"])
            assert peer.run([[1, 2, 3]], 1)["output_tokens"] == [1]
        finally:
            peer.close()
    with pytest.raises(RuntimeError, match="vllm failed to start: FileNotFoundError"):
        Peer("vllm", sys.executable, "missing-model", threads=1, log_dir=str(tmp_path), dtype="float32")
    with pytest.raises(RuntimeError, match="vllm failed to start: AssertionError: bfloat16"):  # dtype mismatch
        Peer("vllm", sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="bfloat16")
    with pytest.raises(ValueError, match="does not exist"):
        find_peer_python("vllm", str(tmp_path / "no-such-python"))


def test_peers_run_their_own_ngram_speculation_when_asked(tmp_path, monkeypatch):
    """--speculative-config reaches vLLM (its speculative_config) and llama.cpp (its prompt-lookup draft model)."""
    import sys

    from swiftkv.bench.peers import Peer

    monkeypatch.setenv("PYTHONPATH", str(_fake_site(tmp_path)))
    monkeypatch.setenv("FAKE_EXPECT_DTYPE", "float32")
    monkeypatch.setenv("FAKE_EXPECT_DRAFTS", "3")
    for backend in ("vllm", "llama.cpp"):
        peer = Peer(backend, sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="float32",
                    name=f"{backend}+ngram", extra_args=("--speculative-config",
                                                          '{"method": "ngram", "num_speculative_tokens": 3}'))
        try:
            assert peer.run([[1, 2, 3]], 2)["output_tokens"] == [2]
        finally:
            peer.close()
    with pytest.raises(RuntimeError, match="AssertionError"):  # (and the fakes do check it)
        Peer("vllm", sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="float32")


def test_a_peer_that_crashes_or_hangs_fails_alone(tmp_path, monkeypatch):
    import sys

    import pytest

    from swiftkv.bench.interleave import SystemFailed, interleave
    from swiftkv.bench.peers import Peer

    monkeypatch.setenv("PYTHONPATH", str(_fake_site(tmp_path)))
    monkeypatch.setenv("FAKE_EXPECT_DTYPE", "float32")
    monkeypatch.setenv("SWIFTKV_BENCH_QUIET_WAIT_S", "0")
    monkeypatch.setenv("FAKE_CRASH_AT", "2")
    peer = Peer("vllm", sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="float32")
    assert peer.run([[1, 2]], 1)["output_tokens"] == [1]
    with pytest.raises(SystemFailed, match=r"(?s)vllm exited \(signal SIGSEGV\).*about to crash"):
        peer.run([[1, 2]], 1)
    peer.close()
    monkeypatch.setenv("FAKE_CRASH_AT", "0")
    monkeypatch.setenv("FAKE_HANG_AT", "1")
    peer = Peer("vllm", sys.executable, "model-dir", threads=1, log_dir=str(tmp_path), dtype="float32", timeout_s=2)
    with pytest.raises(SystemFailed, match="did not answer within 2 s and was killed"):
        peer.run([[1, 2]], 1)
    assert peer.proc.poll() is not None
    peer.close()

    calls = []

    def broken():
        calls.append("broken")
        raise SystemFailed("gone")

    failed = {}
    out = interleave({"a": lambda: 1, "broken": broken, "c": lambda: 3}, reps=3, desc="t", failed=failed)
    assert out == {"a": [1, 1, 1], "c": [3, 3, 3]} and failed == {"broken": "gone"} and calls == ["broken"]


def test_the_prefill_bench_completes_when_a_peer_dies_mid_run(tiny_chat_model_dir, tmp_path, monkeypatch):
    """The fake vLLM segfaults in its third generate call (the batch-1 decode's warm-up): the figures measured
    before stay, the run goes on with our systems, and the report names the failure with the log's tail."""
    import json
    import sys

    from swiftkv.bench.peers import PeerSpec
    from swiftkv.bench.prefill import run_prefill_bench
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    monkeypatch.setenv("PYTHONPATH", str(_fake_site(tmp_path)))
    monkeypatch.setenv("FAKE_EXPECT_DTYPE", "float32")
    monkeypatch.setenv("FAKE_CRASH_AT", "3")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = save_checkpoint(to_swiftkv(load_model(tiny_chat_model_dir)[0], SwiftKVConfig(6, 3, 1)), tmp_path / "skv",
                           source_dir=tiny_chat_model_dir)
    out = tmp_path / "prefill.json"
    r = run_prefill_bench(str(ckpt), lengths=(32,), reps=1, decode_tokens=3, dtype="float32", out=str(out),
                          with_transformers=False, peers=PeerSpec(vllm_python=sys.executable, enabled=("vllm",)),
                          batch=2)
    assert set(r["prefill"][32]) == {"swiftkv", "baseline", "vllm"}  # measured before the crash: kept
    assert set(r["decode"]) == set(r["decode_b2"]) == {"swiftkv", "baseline"}
    assert "signal SIGSEGV" in r["failed"]["vllm"] and "about to crash" in r["failed"]["vllm"]
    assert all(lo <= hi for v in r["spread"].values() for lo, hi in v.values())
    saved = json.loads(out.read_text())
    assert set(saved["failed"]) == {"vllm"} and set(saved["decode_b2"]) == {"swiftkv", "baseline"}


def test_vllm_peers_get_the_venvs_libiomp5(tmp_path, monkeypatch):
    """vLLM's documented CPU setup preloads the libiomp5 that intel-openmp puts in the venv's lib/; a venv's
    bin/python is a symlink to the base interpreter, so the venv must be found without resolving it."""
    import sys

    from swiftkv.bench.peers import _peer_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    py = str(tmp_path / "bin" / "python")
    assert "LD_PRELOAD" not in _peer_env("vllm", py, 2)
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    env = _peer_env("vllm", py, 2)
    assert env["LD_PRELOAD"] == str(tmp_path / "lib" / "libiomp5.so") and env["KMP_BLOCKTIME"] == "1"
    assert "LD_PRELOAD" not in _peer_env("llama.cpp", py, 2)
    monkeypatch.setenv("LD_PRELOAD", "/custom.so")
    assert _peer_env("vllm-swiftkv", py, 2)["LD_PRELOAD"] == "/custom.so"  # the user's own choice stands


def test_offline_benchmarks_need_no_httpx():
    """``pip install -e .`` has no httpx (the bench extra): the offline bench imports without it, and the online
    modes say which extra to install."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["httpx"] = None  # not installed
import swiftkv.bench.cli, swiftkv.bench.offline, swiftkv.bench.prefill, swiftkv.bench.workloads, swiftkv.bench.serving
from swiftkv.cli import main
rc = main(["bench", "--mode", "online", "--workload", "chat"])
print("rc", rc)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rc 2" in run.stdout and "pip install 'swiftkv[bench]'" in run.stderr


def test_every_engine_gets_the_same_kv_cache_space(tiny_chat_model_dir, tmp_path):
    """With less KV cache one system admits fewer requests at once (prompt-heavy: 14 of 16 with 1 GiB
    against vLLM's 4), and the comparison measures memory instead of speed."""
    import sys

    from swiftkv.bench.peers import _peer_env
    from swiftkv.bench.systems import swiftkv_systems
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    assert _peer_env("vllm", sys.executable, 2)["VLLM_CPU_KVCACHE_SPACE"] == str(KV_CACHE_GIB)
    ckpt = save_checkpoint(to_swiftkv(load_model(tiny_chat_model_dir)[0], SwiftKVConfig(6, 3, 1)), tmp_path / "skv",
                           source_dir=tiny_chat_model_dir)
    systems = swiftkv_systems(str(ckpt), "float32")
    try:
        assert {s.llm.engine.config.kv_cache_memory for s in systems.values()} == {KV_CACHE_GIB << 30}
    finally:
        for s in systems.values():
            s.close()


def test_plain_checkpoint_is_the_teacher_for_other_engines(tiny_chat_model_dir, tmp_path, monkeypatch):
    """What vLLM is given: the SwiftKV checkpoint's original model, loadable by plain transformers,
    with the same logits as swiftkv's teacher path."""
    import torch
    from transformers import LlamaForCausalLM as HFLlama

    from swiftkv.bench.peers import plain_checkpoint
    from swiftkv.models.full_sequence import full_logits
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = load_model(tiny_chat_model_dir)[0]
    ckpt = save_checkpoint(to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, 3, 1), adapter_rank=2),
                           tmp_path / "skv", source_dir=tiny_chat_model_dir)
    plain = plain_checkpoint(ckpt)
    assert plain != ckpt and plain_checkpoint(plain) == plain and plain_checkpoint(ckpt) == plain  # cached
    hf = HFLlama.from_pretrained(plain).eval()
    ids = [5, 9, 2, 7, 11, 3]
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0]
    teacher = load_model(ckpt)[0]
    torch.testing.assert_close(got, full_logits(teacher, [ids], swiftkv=False)[0], atol=1e-4, rtol=1e-4)


def test_prefill_report_with_peers():
    from swiftkv.bench.prefill import _ratios, format_report

    r = {"env": {"dtype": "bfloat16", "threads": 2, "torch": "x", "loadavg_1m": 0.1}, "model": "m",
         "swiftkv": {"L": 30, "l": 15, "G": 1}, "versions": {"vllm": "0.32.0"},
         "kv_bytes_per_token": {"swiftkv": 100, "baseline": 200},
         "prefill": {2048: {"swiftkv": 3000.0, "baseline": 1500.0, "vllm": 1000.0, "llama.cpp": 500.0}},
         "decode": {"swiftkv": 40.0, "baseline": 40.0, "vllm": 20.0}, "decode_b32": {"swiftkv": 400.0, "vllm": 500.0}}
    r["ratios"] = _ratios(r)
    assert r["ratios"]["prefill_2048_swiftkv_over_vllm"] == 3.0
    assert r["ratios"]["prefill_2048_swiftkv_over_llama.cpp"] == 6.0
    assert r["ratios"]["decode_batch_1_swiftkv_over_vllm"] == 2.0
    assert r["ratios"]["decode_batch_32_swiftkv_over_vllm"] == 0.8
    lines = format_report(r).splitlines()
    assert lines[1].split() == ["metric", "swiftkv", "baseline", "vllm", "llama.cpp"]
    assert lines[2].split()[-4:] == ["3000.0", "1500.0", "1000.0", "500.0"]
    assert lines[4].split()[-4:] == ["400.0", "nan", "500.0", "nan"]
    r["prefill_gflops"] = {2048: {"swiftkv": 300.0, "vllm": 600.0}}
    for peak, amx, said in ((None, None, "swiftkv 300, vllm 600"), (400.0, None, "swiftkv 300 (75%), vllm 600 (150%)"),
                            (400.0, 6000.0, "swiftkv 300 (75%, 5% of AMX), vllm 600 (150%, 10% of AMX)")):
        r["matmul_peak_gflops"], r["amx_peak_gflops"] = peak, amx
        line = next(x for x in format_report(r).splitlines() if x.startswith("prefill @ 2048 GFLOP/s"))
        assert line.startswith(f"prefill @ 2048 GFLOP/s: {said}"), line
        assert ("nominal AMX-BF16 peak, 6,000 GFLOP/s" in line) == bool(amx)


def test_amx_peak_from_the_flags_and_the_clock():
    from swiftkv.bench.flops import amx_peak_gflops, cpu_mhz

    assert cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2596.134\nflags\t: avx2\n") == 2596.134
    assert cpu_mhz("processor\t: 0\n") is None
    assert amx_peak_gflops(frozenset({"amx_bf16", "amx_tile"}), 2, 2000.0) == 1024 * 2 * 2.0  # 4,096 GFLOP/s
    assert amx_peak_gflops(frozenset({"avx512_bf16"}), 2, 2000.0) is None
    assert amx_peak_gflops(frozenset({"amx_bf16"}), 2, None) is None


# -- the bench entry points, end to end on a tiny SwiftKV checkpoint (no peers) ------------------

def test_bench_entry_points_on_a_tiny_model(tiny_chat_model_dir, tmp_path, capsys):
    import json

    from swiftkv.bench.offline import run_offline_bench
    from swiftkv.bench.prefill import run_prefill_bench
    from swiftkv.bench.workloads import Workload
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    ckpt = save_checkpoint(to_swiftkv(load_model(tiny_chat_model_dir)[0], SwiftKVConfig(6, 3, 3)), tmp_path / "skv",
                           source_dir=tiny_chat_model_dir)
    r = run_prefill_bench(str(ckpt), lengths=(48,), reps=1, decode_tokens=3, dtype="float32",
                          out=str(tmp_path / "prefill.json"), batch=2)
    for metric in (r["prefill"][48], r["decode"], r["decode_b2"]):
        assert set(metric) == {"swiftkv", "baseline", "transformers"} and all(v > 0 for v in metric.values())
    assert r["dtypes"] == {"swiftkv": "float32", "baseline": "float32", "transformers": "float32"}
    assert r["env"]["kv_cache_gib"] == KV_CACHE_GIB
    assert r["kv_bytes_per_token"]["swiftkv"] * 6 == r["kv_bytes_per_token"]["baseline"] * 4  # AcrossKV G = 3
    assert json.loads((tmp_path / "prefill.json").read_text())["ratios"] == r["ratios"]
    import pytest

    from swiftkv.bench.flops import prefill_flops

    model = load_model(ckpt)[0]
    skv, gf = model.swiftkv_config, r["prefill_gflops"][48]
    for name, swift in (("swiftkv", True), ("baseline", False)):  # each system's model, at its measured rate
        assert gf[name] == pytest.approx(prefill_flops(model.config, skv, 48, swift) * r["prefill"][48][name] / 48 / 1e9)
    assert gf["swiftkv"] / gf["baseline"] < r["prefill"][48]["swiftkv"] / r["prefill"][48]["baseline"]  # fewer FLOPs
    assert r["matmul_peak_gflops"] > 0 and "matmul peak measured here" in capsys.readouterr().out
    # the roofline's bandwidth: sampled in a child process right before and after the batch-1 runs, the best taken
    assert len(r["bandwidth_samples_bytes_s"]) == 2 and all(b > 1e8 for b in r["bandwidth_samples_bytes_s"])
    assert r["bandwidth_bytes_s"] == max(r["bandwidth_samples_bytes_s"])
    w = Workload.make("shared-prefix", 49152, num_requests=3, prompt_len=(5, 9), max_tokens=3)
    assert len({tuple(p[:1500]) for p in w.prompts}) == 1 and len(w.prompts[0]) >= 1505
    w = Workload("custom", [p[-40:] for p in w.prompts], 3)
    res = run_offline_bench(str(ckpt), w, reps=1, dtype="float32", out_dir=str(tmp_path / "out"), max_num_seqs=2)
    assert set(res["systems"]) == {"swiftkv", "baseline", "transformers"}
    assert all(s["output_tokens_per_s"] > 0 and len(s) > 5 for s in res["systems"].values())
    assert (tmp_path / "out" / "bench_custom.json").exists() and (tmp_path / "out" / "bench_custom.png").exists()
    assert "swiftkv/baseline" in capsys.readouterr().out


def test_managed_process_logs_measures_and_stops(tmp_path):
    """The one helper under the peers and servers: output in its log (restarts append), a live process measured,
    a graceful stop for one that takes SIGINT, a forced one after the grace for one that ignores it."""
    import os
    import signal
    import sys
    import time

    from swiftkv.bench.process import ManagedProcess

    code = "import signal, sys, time; {}; print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "server.log"
    polite = ManagedProcess("polite", [sys.executable, "-c", code.format("pass")], dict(os.environ), log,
                            append_log=True)
    polite.start()
    deadline = time.monotonic() + 30
    while "ready" not in polite.log_tail().splitlines() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert polite.running and polite.how_it_ended() is None and polite.memory()["rss"] > 0
    polite.stop(grace_s=30)
    assert not polite.running and polite.how_it_ended() is not None and polite.memory() == {"rss": 0, "peak": 0}
    stubborn = ManagedProcess("stubborn", [sys.executable, "-c", code.format(
        "signal.signal(signal.SIGINT, signal.SIG_IGN)")], dict(os.environ), log, append_log=True)
    stubborn.start()
    while log.read_text().splitlines().count("ready") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    stubborn.stop(grace_s=0.5)
    assert stubborn.how_it_ended() == f"signal {signal.SIGKILL.name}" and time.monotonic() - started < 20
    assert log.read_text().count("==== ") == 2  # each start marked, the first run's output kept



def test_openvino_model_is_exported_once_with_fp16_weights(tmp_path, monkeypatch):
    """The OpenVINO peer's model: the original checkpoint exported by the optimum-cli beside the peer's python,
    with --weight-format fp16 (without it optimum silently compresses to int8), cached; a failed export is a
    ValueError naming the exporter's last lines (the peer is then skipped)."""
    import stat

    import pytest

    from swiftkv.bench import peers

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    monkeypatch.setattr(peers, "plain_checkpoint", lambda d: plain)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    log = tmp_path / "calls.txt"
    cli = venv / "optimum-cli"
    cli.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nfor a; do out=$a; done\n"
                   "[ -n \"$FAIL\" ] && { echo 'conversion failed: unsupported op' >&2; exit 3; }\n"
                   "echo '<xml/>' > $out/openvino_model.xml; echo '{}' > $out/config.json\n")
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    model_dir = tmp_path / "model"
    out = peers.openvino_model(model_dir, str(venv / "python"))
    assert (out / "openvino_model.xml").is_file()
    assert peers.openvino_model(model_dir, str(venv / "python")) == out  # cached: exported once
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and "--weight-format fp16" in calls[0] and f"--model {plain}" in calls[0]
    (plain / "config.json").write_text('{"changed": 1}')  # a newer checkpoint: exported again, and this one fails
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(ValueError, match="(?s)could not export.*unsupported op"):
        peers.openvino_model(model_dir, str(venv / "python"))


def test_text_workloads_and_the_speculative_system(tiny_chat_model_dir, tmp_path, capsys):
    """quote-heavy: real documents and an ask on the middle one, seeded; chat-text: real questions; with
    --speculative-config the offline bench runs swiftkv+ngram beside swiftkv and reports its acceptance."""
    from swiftkv.bench.offline import run_offline_bench
    from swiftkv.bench.workloads import QUOTE_TASKS, Workload
    from swiftkv.models.loader import load_tokenizer

    tok = load_tokenizer(tiny_chat_model_dir)
    w = Workload.make("quote-heavy", tok.vocab_size, seed=1, num_requests=4, tokenizer=tok)
    assert w == Workload.make("quote-heavy", tok.vocab_size, seed=1, num_requests=4, tokenizer=tok)
    texts = [tok.decode(p) for p in w.prompts]
    assert all("Document 5:" in t and "Document 3" in t.split("Document 5:")[1] for t in texts)
    assert [any(task.split("{")[0][:20] in t for task in QUOTE_TASKS) for t in texts] == [True] * 4
    assert all(len(p) > 300 for p in w.prompts) and w.max_tokens == 96
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        Workload.make("chat-text", tok.vocab_size)
    chat = Workload.make("chat-text", tok.vocab_size, num_requests=3, max_tokens=4, tokenizer=tok)
    from swiftkv.data.datasets import truthfulqa

    questions = [ex["Question"] for ex in truthfulqa()["examples"]]
    assert all(sum(q in tok.decode(p) for q in questions) == 1 for p in chat.prompts)
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    ckpt = save_checkpoint(to_swiftkv(load_model(tiny_chat_model_dir)[0], SwiftKVConfig(6, 3)), tmp_path / "skv",
                           source_dir=tiny_chat_model_dir)
    res = run_offline_bench(str(ckpt), Workload("custom", [p[-60:] for p in w.prompts], 6), reps=1,
                            dtype="float32", with_transformers=False, max_num_seqs=2,
                            speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    assert set(res["systems"]) == {"swiftkv", "baseline", "swiftkv+ngram"}
    assert res["spec_decode"]["mean_acceptance_length"] >= 0
    assert "swiftkv+ngram/swiftkv output_tokens_per_s" in capsys.readouterr().out


def test_bandwidth_apart_is_none_when_the_child_cannot_run(monkeypatch):
    from swiftkv.bench import env

    monkeypatch.setattr(env.sys, "executable", "/nonexistent/python")
    assert env.measure_bandwidth_apart(2) is None
