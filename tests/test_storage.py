"""Weights held once, in the bytes they are stored in (issue: real-size models on a CPU): the engine's
parameter bytes against the checkpoint's stored bytes, memory-mapped tensors, a streamed and sharded
convert under a memory budget, greedy output in every storage form (fused and eager), the refusal of a
model that does not fit, and files written under the user's umask."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    OracleProposer,
    assert_greedy_close,
    needs_kernels,
    quantize_q4_1,
    run_to_end,
    tiny_hf_model,
)

from swiftkv.config import SwiftKVConfig
from swiftkv.kernels import linear as kernels
from swiftkv.memory import HUGE_PAGE, back_with_huge_pages, huge_pages_available
from swiftkv.models.footprint import held_bytes
from swiftkv.models.full_sequence import greedy_generate
from swiftkv.models.loader import load_model
from swiftkv.models.shards import read_tensors, tensor_index, weight_files
from swiftkv.sampling_params import SamplingParams
from swiftkv.transform import convert_checkpoint, to_swiftkv

needs_matmul = needs_kernels("linear", "no AVX2/FMA/F16C or no C compiler: weights are held in the compute dtype")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
PROMPTS = [[5, 9, 17, 3], list(range(1, 30)), [100] * 11]


def _save(model, path: Path, dtype: torch.dtype, q4_1: bool = False) -> Path:
    """A tiny transformers model saved in ``dtype`` (its 2-D weights Q4_1-rounded first: a GGUF-derived
    checkpoint, stored in fp32 as the built-in model's conversion stores it)."""
    if q4_1:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(quantize_q4_1(p))
    model.to(dtype).save_pretrained(path)
    return path


def _stored_bytes(path: Path, q4_1: bool) -> int:
    """The checkpoint's bytes as stored; for a GGUF-derived one, as the GGUF stores them: Q4_1's 20 bytes per
    32 weights for every 2-D tensor."""
    infos = tensor_index(weight_files(path)).values()
    return sum(i.nbytes * 20 // 128 if q4_1 and len(i.shape) == 2 else i.nbytes for i in infos)


@needs_matmul
@pytest.mark.parametrize("kind", ["bf16", "q4_1"])
def test_engine_holds_the_checkpoints_stored_bytes(tmp_path, kind):
    hf = tiny_hf_model("llama", hidden_size=128, intermediate_size=256, vocab_size=512)
    path = _save(hf, tmp_path / kind, torch.bfloat16 if kind == "bf16" else torch.float32, q4_1=kind == "q4_1")
    stored = _stored_bytes(path, kind == "q4_1")
    model = load_model(path, dtype="float32", for_inference=True)[0]  # fp32 compute, as on AVX2
    assert abs(held_bytes(model) - stored) <= 0.1 * stored, (held_bytes(model), stored)
    assert held_bytes(load_model(path, dtype="float32")[0]) >= 1.5 * stored  # what an fp32 copy would hold


@needs_matmul
def test_bf16_weights_are_the_file_mapping(tmp_path):
    path = _save(tiny_hf_model("llama"), tmp_path / "bf16", torch.bfloat16)
    model = load_model(path, dtype="float32", for_inference=True)[0]
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    mapped = [(int(a, 16), int(b, 16)) for f in maps if len(f) >= 6 and f[5] == str((path / "model.safetensors").resolve())
              for a, b in [f[0].split("-")]]
    held = model.model.layers[0].mlp.up_proj.held
    assert held.kind == "bf16" and mapped
    assert any(a <= held.data.data_ptr() < b for a, b in mapped)  # no copy: the weight is the file's bytes


def test_streamed_convert_stays_under_a_memory_budget(tmp_path):
    """A 160 MB checkpoint (no tensor over 8 MB) converted in 8 MB shards: the process grows by a few shards,
    not the model (the
    same conversion in one shard grows by more than the model: the measure can tell the two apart)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to restart the peak resident size")
    hf = tiny_hf_model("llama", hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, vocab_size=2048,
                       num_attention_heads=8, num_key_value_heads=4)
    path = _save(hf, tmp_path / "base", torch.float32)
    model_bytes = sum(f.stat().st_size for f in weight_files(path))
    assert model_bytes > 150e6

    def growth(out: Path, shard: str) -> int:
        """Peak resident bytes the conversion adds, in a fresh process (imports and config reading done first)."""
        code = f"""
import swiftkv.cli, swiftkv.transform
from swiftkv.models.loader import load_config
load_config({str(path)!r})
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak restarts here
before = status("VmRSS:")
swiftkv.cli.main(["convert", {str(path)!r}, "--out", {str(out)!r}, "-l", "2", "--max-shard-size", {shard!r}])
print(status("VmHWM:") - before)
"""
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])

    streamed, whole = growth(tmp_path / "skv", "8MB"), growth(tmp_path / "skv-whole", "1GB")
    assert streamed < 40e6 and whole > 0.8 * model_bytes, (streamed, whole, model_bytes)
    files = weight_files(tmp_path / "skv")
    assert len(files) > 5 and (tmp_path / "skv" / "model.safetensors.index.json").exists()
    streamed_model = load_model(tmp_path / "skv")[0]
    in_memory = to_swiftkv(load_model(path)[0], SwiftKVConfig(4, 2))
    for (n, a), (m, b) in zip(sorted(streamed_model.named_parameters()), sorted(in_memory.named_parameters())):
        assert n == m and torch.equal(a, b), n


@pytest.mark.parametrize("form", ["bf16-file", "fp32-random", "q4_1-derived", "bf16-compute"])
@pytest.mark.parametrize("fused", [True, False])
def test_greedy_output_in_every_storage_form(tmp_path, monkeypatch, form, fused):
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine

    hf = tiny_hf_model("llama", seed=2, num_hidden_layers=6, intermediate_size=128)
    dtype = torch.bfloat16 if form == "bf16-file" else torch.float32
    path = _save(hf, tmp_path / "base", dtype, q4_1=form == "q4_1-derived")
    skv = convert_checkpoint(path, tmp_path / "skv", SwiftKVConfig(6, 3))
    compute = "bfloat16" if form == "bf16-compute" else "float32"
    reference = load_model(skv, dtype=compute)[0]  # plain parameters, PyTorch's matmuls
    refs = [greedy_generate(reference, p, 10) for p in PROMPTS]
    assert len({t for r in refs for t in r}) >= 4, refs  # varied outputs, so agreement means something
    monkeypatch.setenv("SWIFTKV_FUSED_DECODE", "1" if fused else "0")
    model = load_model(skv, dtype=compute, for_inference=True)[0]  # memory-mapped, held forms
    engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16))
    assert (engine.runner.fused is not None) == (fused and kernels.library() is not None)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    # bf16: greedy is exact only above bf16's resolution (another GEMM order -- AMX's -- flips near-ties), so the
    # engine's path is checked against the reference's logits; fp32 keeps exact equality as well
    tol = 0.02 if compute == "bfloat16" else 1e-4
    for i, p, ref in zip(ids, PROMPTS, refs):
        assert_greedy_close(reference, p, done[i], tol)
        if compute == "float32":
            assert done[i].token_ids == ref
    # speculative decoding on the same held weights: drafts verified as rows of one query each (fused where decode is)
    spec = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=16,
                                                speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                                    "adaptive": False}))
    spec.proposer = OracleProposer(PROMPTS, refs)
    ids = [spec.add_request(p, GREEDY) for p in PROMPTS]
    while spec.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0] for o in spec.step() if o.finished})
    assert 0 < spec.spec_stats.num_accepted_tokens < spec.spec_stats.num_draft_tokens
    for i, p, ref in zip(ids, PROMPTS, refs):
        assert_greedy_close(reference, p, done[i], tol)
        if compute == "float32":
            assert done[i].token_ids == ref


def test_a_model_that_does_not_fit_is_refused_before_loading(tmp_path, monkeypatch):
    import swiftkv.llm
    import swiftkv.memory

    path = _save(tiny_hf_model("llama"), tmp_path / "base", torch.float32)
    monkeypatch.setattr(swiftkv.memory, "available_bytes", lambda: 1 << 30)
    loaded = []
    monkeypatch.setattr(swiftkv.llm, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match=r"needs about 2\.\d GiB .*KV cache 2\.0 GiB.* but 1\.0 GiB is available: "
                                         r"lower kv_cache_memory"):
        swiftkv.llm.LLM(str(path), kv_cache_memory=2 << 30)
    assert not loaded  # refused before reading a weight
    monkeypatch.setenv("SWIFTKV_SKIP_MEMORY_CHECK", "1")
    with pytest.raises(TypeError):  # got past the check, into the (stubbed) loader
        swiftkv.llm.LLM(str(path), kv_cache_memory=2 << 30)
    assert loaded


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_get_the_users_umask(tmp_path, mask):
    path = _save(tiny_hf_model("llama"), tmp_path / "base", torch.float32)
    old = os.umask(mask)
    try:
        out = convert_checkpoint(path, tmp_path / "skv", SwiftKVConfig(6, 3))
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~mask, f.name


needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here (not Linux, or "
                                                                  "THP set to never, or SWIFTKV_HUGE_PAGES=0)")


def _mapping_of(t: torch.Tensor) -> tuple[str, str]:
    """``(perms, path)`` of the mapping that holds the middle of ``t``'s bytes ("" for anonymous memory)."""
    at = t.data_ptr() + t.numel() * t.element_size() // 2
    for line in Path("/proc/self/maps").read_text().splitlines():
        f = line.split(maxsplit=5)
        a, b = (int(x, 16) for x in f[0].split("-"))
        if a <= at < b:
            return f[1], f[5].strip() if len(f) > 5 else ""
    raise AssertionError("not mapped")


@needs_thp
def test_huge_pages_move_a_mapped_file_in_place(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(3 << 20).to(torch.bfloat16)  # 6 MB: at least two whole 2 MB pages inside
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    on_disk = (tmp_path / "model.safetensors").read_bytes()
    mapped = read_tensors(tmp_path)["w"]
    at, path = mapped.data_ptr(), str((tmp_path / "model.safetensors").resolve())
    assert _mapping_of(mapped)[1] == path  # the loader's view: the file's own pages
    moved = back_with_huge_pages([mapped])
    assert moved >= 2 * HUGE_PAGE and moved % HUGE_PAGE == 0
    assert mapped.data_ptr() == at and torch.equal(mapped, w)  # same address, same bytes
    perms, now = _mapping_of(mapped)
    assert now == "" and perms.startswith("r") and perms[3] == "p"  # anonymous now, as private as before
    assert (tmp_path / "model.safetensors").read_bytes() == on_disk  # the user's file untouched


@needs_thp
def test_huge_pages_leave_shared_mappings_and_obey_the_switch(tmp_path, monkeypatch):
    import mmap

    f = tmp_path / "shared.bin"
    f.write_bytes(bytes(range(256)) * (24 << 12))  # 6 MB
    with open(f, "r+b") as fh:
        shared = torch.frombuffer(mmap.mmap(fh.fileno(), 0), dtype=torch.uint8)  # MAP_SHARED: writes reach the file
    assert back_with_huge_pages([shared]) == 0 and _mapping_of(shared)[1] == str(f.resolve())
    anon = torch.randn(3 << 20)  # 12 MB of anonymous memory: advised, bytes unchanged
    copy = anon.clone()
    monkeypatch.setenv("SWIFTKV_HUGE_PAGES", "0")
    assert back_with_huge_pages([anon]) == 0
    monkeypatch.delenv("SWIFTKV_HUGE_PAGES")
    assert back_with_huge_pages([anon]) >= 4 * HUGE_PAGE and torch.equal(anon, copy)


@needs_matmul
@needs_thp
def test_a_model_on_huge_pages_decodes_as_on_the_files_pages(tmp_path, monkeypatch):
    """A bf16 checkpoint with weights over whole 2 MB pages: loaded for inference they leave the file mapping for
    huge pages, and greedy output and logprobs stay those of the model read in place (SWIFTKV_HUGE_PAGES=0)."""
    import swiftkv.models.loader as loader
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine

    hf = tiny_hf_model("llama", seed=3, hidden_size=256, intermediate_size=4096, vocab_size=4096)  # 2 MB a weight
    path = _save(hf, tmp_path / "bf16", torch.bfloat16)
    monkeypatch.setattr(loader, "HUGE_PAGES_MIN_BYTES", 1 << 20)  # this model counts as large (1 GB by default)
    outs = {}
    for huge in ("0", "1"):
        monkeypatch.setenv("SWIFTKV_HUGE_PAGES", huge)
        model = load_model(path, dtype="bfloat16", for_inference=True)[0]
        up = model.model.layers[0].mlp.up_proj.held.data
        assert (_mapping_of(up)[1] == "") == (huge == "1")  # moved off the file, or still its pages
        engine = LLMEngine(model, config=EngineConfig(kv_cache_memory=4 << 20, block_size=4, max_num_batched_tokens=32))
        outs[huge] = [o.outputs[0] for o in run_to_end(engine, PROMPTS, GREEDY)]
    for a, b in zip(outs["0"], outs["1"]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs  # the same bytes: the same numbers
