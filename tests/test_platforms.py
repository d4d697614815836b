"""dtype "auto": bf16 only where the CPU multiplies bf16 natively (flags injected)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from swiftkv.platforms import (
    _loaded_libgomp,
    auto_dtype,
    cpu_has_native_bf16,
    release_openmp_threads,
    resolve_dtype,
)

AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c"})
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}
SAPPHIRE_RAPIDS = AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("flags,expected", [
    (AVX2_ONLY, torch.float32),
    (AVX512_NO_BF16, torch.float32),  # AVX-512 without the bf16 extension: still emulated
    (AVX2_ONLY | {"avx512_bf16"}, torch.bfloat16),
    (SAPPHIRE_RAPIDS, torch.bfloat16),
    (frozenset(), torch.float32),
])
def test_auto_picks_bf16_only_with_native_bf16(flags, expected):
    assert auto_dtype("cpu", flags) == expected
    assert cpu_has_native_bf16(flags) == (expected == torch.bfloat16)


def test_resolve_says_the_choice_once_and_explicit_wins(capsys):
    assert resolve_dtype("auto", "cpu", AVX2_ONLY) == torch.float32
    assert resolve_dtype(None, "cpu", AVX2_ONLY) == torch.float32
    err = capsys.readouterr().err
    assert err.count("dtype auto -> float32") <= 1  # said at most once per process (maybe earlier)
    assert resolve_dtype("bfloat16", "cpu", AVX2_ONLY) == torch.bfloat16  # explicit beats the flags
    assert resolve_dtype("fp32", "cpu", SAPPHIRE_RAPIDS) == torch.float32
    with pytest.raises(ValueError, match="Unknown dtype 'float99'"):
        resolve_dtype("float99")


def test_llm_defaults_to_auto(tiny_chat_model_dir, monkeypatch):
    import swiftkv.platforms as platforms
    from swiftkv.llm import LLM

    monkeypatch.setattr(platforms, "cpu_flags", lambda: AVX2_ONLY)
    assert LLM(tiny_chat_model_dir).model.compute_dtype == torch.float32
    monkeypatch.setattr(platforms, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    assert LLM(tiny_chat_model_dir).model.compute_dtype == torch.bfloat16


@pytest.mark.skipif(not _loaded_libgomp(), reason="PyTorch's OpenMP here is not libgomp")
def test_release_openmp_threads_frees_this_threads_workers(monkeypatch):
    """The server frees its main thread's OpenMP workers before the engine thread runs the model (libgomp
    throttles every pool once workers outnumber CPUs): the workers really exit, and parallel work still runs
    and is right, in this thread and in another."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc/self/task to count threads")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        expected = a.double() @ a.double()
        torch.testing.assert_close((a @ a).double(), expected, rtol=1e-4, atol=1e-3)  # this thread's pool exists
        before = len(os.listdir("/proc/self/task"))
        assert release_openmp_threads()
        for _ in range(100):  # the worker exits right after the pause's barrier
            if len(os.listdir("/proc/self/task")) < before:
                break
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/task")) < before
        results = []
        worker = threading.Thread(target=lambda: results.append(a @ a))
        worker.start()
        worker.join()
        torch.testing.assert_close(results[0].double(), expected, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close((a @ a).double(), expected, rtol=1e-4, atol=1e-3)
    finally:
        torch.set_num_threads(old)
