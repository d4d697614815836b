"""The engine against the full-sequence model: token-for-token greedy equality and friends."""

from __future__ import annotations

import pytest
import torch
from conftest import run_to_end, tiny_hf_model

from swiftkv.config import SwiftKVConfig
from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
from swiftkv.kernels import fused_decode
from swiftkv.models.arch import kv_bytes_per_token
from swiftkv.models.full_sequence import full_logits, greedy_generate
from swiftkv.models.loader import load_model
from swiftkv.sampling_params import SamplingParams
from swiftkv.transform import to_swiftkv

L = 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The plain model (the tests' full-sequence reference); ``_fresh(base)`` loads it again for an engine."""
    path = tmp_path_factory.mktemp("base")
    hf = tiny_hf_model("llama", num_hidden_layers=L)
    _bf16_values(hf)
    hf.save_pretrained(path)
    model = load_model(path)[0]
    model.checkpoint_dir = path
    return model


def _fresh(base):
    """The base model loaded again from its checkpoint (an engine's model is prepared for inference)."""
    return load_model(base.checkpoint_dir)[0]


def _bf16_values(model) -> None:
    """Projections with bf16 values (as a bf16 checkpoint loads): they have a compact form, so on a CPU
    with the kernels every test here also runs decode through the fused layers (layers/fused_decode.py)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.copy_(p.bfloat16().float())


def _model(base, l, G):
    """A model of its own (the engine's, and its test's reference): the base's layout at l == L."""
    if l == L:
        return _fresh(base)
    model = to_swiftkv(base, SwiftKVConfig(L, l, G))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # distinct SwiftKV weights, so the engine must really use them
        for n, p in model.named_parameters():
            if "swiftkv" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    _bf16_values(model)
    return model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


_run = run_to_end


def _engine(model, blocks=512, block_size=4, swiftkv=None, **kw):
    """An engine on ``model``, prepared for inference here (weights in their held form); the engine never
    changes it, so the test's full-sequence reference may run the same model."""
    bytes_per_block = kv_bytes_per_token(model.config, model.layout(swiftkv), torch.float32) * block_size
    config = EngineConfig(kv_cache_memory=blocks * bytes_per_block, block_size=block_size, **kw)
    model.prepare_for_inference()
    engine = LLMEngine(model, None, config, swiftkv)
    # decode really runs fused here, unless switched off or not built
    assert engine.runner.fused is not None or not engine.runner.switches.fused_decode or fused_decode.library() is None
    return engine


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("l,G", [(L, 1), (3, 1), (2, 2), (3, 3)])
@pytest.mark.parametrize("budget", [512, 7])  # 7: prompts are chunked across steps
def test_greedy_matches_full_sequence(base, l, G, budget):
    model = _model(base, l, G)
    prompts = _prompts([5, 1, 23, 12, 40, 9])
    outs = _run(_engine(model, max_num_batched_tokens=budget, max_num_seqs=4), prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 8)
        assert o.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("l,G", [(L, 1), (2, 2)])
def test_greedy_matches_under_preemption(base, l, G):
    model = _model(base, l, G)
    prompts = _prompts([10, 14, 9, 12], seed=3)
    engine = _engine(model, blocks=12, block_size=4, max_num_seqs=4)
    preemptions = []
    orig = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq, out: (preemptions.append(seq.seq_id), orig(seq, out))
    outs = _run(engine, prompts, GREEDY)
    assert preemptions, "cache too large to force preemption"
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 8)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_teacher_mode_of_swiftkv_checkpoint_matches_base(base):
    model = _model(base, 3, 1)
    prompts = _prompts([6, 19])
    outs = _run(_engine(model, swiftkv=False), prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [greedy_generate(base, p, 8) for p in prompts]


def test_kv_bytes_per_token_with_acrosskv():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    base_bytes = kv_bytes_per_token(cfg, SwiftKVConfig.baseline(30), torch.bfloat16)
    skv_bytes = kv_bytes_per_token(cfg, SwiftKVConfig(30, 15, 3), torch.bfloat16)
    assert base_bytes == 30 * 2 * 3 * 64 * 2
    assert skv_bytes * 3 == base_bytes * 2  # exactly 2/3
    assert SwiftKVConfig(30, 15, 1).num_kv_owners == 30  # SingleInputKV alone saves no KV


def test_engine_cache_really_shrinks(base):
    e_base, e_skv = _engine(_fresh(base)), _engine(_model(base, 2, 2))
    assert e_skv.runner.kv_cache.shape[0] == 4 and e_base.runner.kv_cache.shape[0] == 6
    assert e_skv.kv_bytes_per_token * 6 == e_base.kv_bytes_per_token * 4


def test_later_layers_and_lm_head_only_see_logits_tokens(base, monkeypatch):
    monkeypatch.setenv("SWIFTKV_FUSED_DECODE", "0")  # eager layers, so the module hooks see every call
    engine = _engine(_model(base, 3, 1), max_num_batched_tokens=512)
    model = engine.model
    rows = {"layer3": [], "layer2": [], "lm_head": []}
    hooks = [
        model.model.layers[3].register_forward_pre_hook(lambda m, a: rows["layer3"].append(a[0].shape[0])),
        model.model.layers[2].register_forward_pre_hook(lambda m, a: rows["layer2"].append(a[0].shape[0])),
        model.lm_head.register_forward_pre_hook(lambda m, a: rows["lm_head"].append(a[0].shape[0])),
    ]
    try:
        _run(engine, _prompts([30, 20]), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finally:
        for h in hooks:
            h.remove()
    assert rows["layer2"][0] == 50  # prefill: every prompt token runs the first l layers
    assert rows["layer3"][0] == 2 and rows["lm_head"][0] == 2  # ...but only 2 run the rest
    assert rows["lm_head"] == rows["layer3"]


def test_baseline_lm_head_only_on_logits_tokens(base):
    seen = []
    engine = _engine(_fresh(base), max_num_batched_tokens=16)
    h = engine.model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        _run(engine, _prompts([30]), SamplingParams(temperature=0, max_tokens=1))
    finally:
        h.remove()
    assert seen == [1]  # two partial chunks produced no logits at all


def test_seeded_sampling_is_reproducible(base):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=12, ignore_eos=True)
    prompts = _prompts([7, 11])
    a = [o.outputs[0].token_ids for o in _run(_engine(_fresh(base)), prompts, params)]
    b = [o.outputs[0].token_ids for o in _run(_engine(_fresh(base)), prompts[::-1], params)][::-1]
    assert a == b
    c = _run(_engine(_fresh(base)), prompts, SamplingParams(temperature=1.0, seed=124, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in c] != a


def test_top_k_1_is_greedy(base):
    prompts = _prompts([9])
    out = _run(_engine(_fresh(base)), prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=6, ignore_eos=True))
    assert out[0].outputs[0].token_ids == greedy_generate(base, prompts[0], 6)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n must"),
    ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_invalid_requests(base):
    engine = _engine(_fresh(base))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        engine.add_request([1, 500], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(list(range(100)) * 3, GREEDY)


def test_abort_frees_blocks(base):
    engine = _engine(_fresh(base))
    rid = engine.add_request(_prompts([20])[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request(rid)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_logprobs_and_prompt_logprobs(base):
    model = _model(base, 3, 1)
    prompt = _prompts([10])[0]
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    (out,) = _run(_engine(model), [prompt], params)
    full = torch.log_softmax(full_logits(model, [prompt + out.outputs[0].token_ids])[0], -1)
    lps = out.outputs[0].logprobs
    assert len(lps) == 3
    for i, lp in enumerate(lps):
        ref = full[len(prompt) - 1 + i]
        assert lp.token_id == int(ref.argmax()) and abs(lp.logprob - float(ref.max())) < 1e-4
        assert len(lp.top) == 2 and lp.token_id in lp.top
    assert out.prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[t].logprob - float(full[t - 1, prompt[t]])) < 1e-4


def test_stop_token_ids(base):
    prompt = _prompts([8])[0]
    ref = greedy_generate(base, prompt, 8)
    (out,) = _run(_engine(_fresh(base)), [prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[2]], ignore_eos=True))
    assert out.outputs[0].token_ids == ref[: ref.index(ref[2]) + 1] and out.outputs[0].finish_reason == "stop"


def test_request_that_cannot_fit_the_cache_is_refused(base):
    engine = _engine(_fresh(base), blocks=4, block_size=4)  # 16 tokens of KV
    with pytest.raises(ValueError, match="needs 5 KV blocks but the cache has only 4"):
        engine.add_request(list(range(10)), SamplingParams(max_tokens=8))
    engine.add_request(list(range(10)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == 4


# -- prefix caching -------------------------------------------------------------------------------

@pytest.mark.parametrize("l,G", [(L, 1), (3, 1), (2, 2), (3, 3)])
def test_prefix_cache_hits_give_the_same_greedy_output(base, l, G):
    model = _model(base, l, G)
    shared = _prompts([13], seed=5)[0]
    # 13 shared tokens = 3 full blocks of 4 + 1 (a partial-block prefix), then own tails
    prompts = [shared + t for t in _prompts([1, 6, 9, 4], seed=6)] + [shared]
    engine = _engine(model, max_num_seqs=2)  # two at a time: later requests hit what earlier ones cached
    outs = _run(engine, prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 8)
    bm = engine.block_manager
    assert bm.num_hit_tokens >= 3 * 12  # later requests reused the 12 cached shared tokens
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked


def test_prefix_caching_off_computes_everything(base):
    engine = _engine(_model(base, 3, 1), enable_prefix_caching=False)
    prompts = [_prompts([16], seed=5)[0]] * 3
    _run(engine, prompts, GREEDY)
    assert engine.block_manager.num_hit_tokens == 0 and not engine.block_manager.cached


@pytest.mark.parametrize("l,G", [(L, 1), (2, 2)])
def test_prefix_caching_under_eviction_preemption_and_aborts(base, l, G):
    model = _model(base, l, G)
    shared = _prompts([12], seed=8)[0]
    prompts = [shared + t for t in _prompts([3, 10, 7, 14, 5, 9], seed=9)]
    engine = _engine(model, blocks=14, block_size=4, max_num_seqs=4)  # too small for all: evicts, preempts
    preemptions = []
    orig = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq, out: (preemptions.append(seq.seq_id), orig(seq, out))
    aborted = engine.add_request(prompts[0], GREEDY)
    engine.step()
    engine.abort_request(aborted)  # an abort mid-prefill returns its blocks (cached ones stay reusable)
    outs = _run(engine, prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == greedy_generate(model, p, 8)
    assert preemptions and engine.block_manager.num_hit_tokens > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -- requests: n samples, min_tokens, switching modes ---------------------------------------------

def test_n_samples_are_the_seeded_single_requests(base):
    engine = _engine(_model(base, 3, 1), blocks=512)
    prompt = _prompts([9])[0]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    done = _run_to_end(engine)[rid]
    assert [c.index for c in done.outputs] == [0, 1, 2] and done.finished
    for i, c in enumerate(done.outputs):  # sample i == a single request seeded seed + i
        single = engine.add_request(prompt, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=6, ignore_eos=True))
        assert _run_to_end(engine)[single].outputs[0].token_ids == c.token_ids
    assert len({tuple(c.token_ids) for c in done.outputs}) > 1
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def _run_to_end(engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_min_tokens_masks_stop_tokens_before_it(base):
    prompt = _prompts([7])[0]
    first = greedy_generate(base, prompt, 1)[0]
    engine = _engine(_fresh(base))
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[first]))
    assert _run_to_end(engine)[rid].outputs[0].token_ids == [first]  # stops at once without min_tokens
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, min_tokens=3, stop_token_ids=[first]))
    out = _run_to_end(engine)[rid].outputs[0].token_ids
    assert first not in out[:3] and len(out) >= 3
    model = _fresh(base)
    model.config.eos_token_id = first  # eos too, unless ignore_eos
    engine = _engine(model)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4))
    assert _run_to_end(engine)[rid].outputs[0].token_ids == [first]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, min_tokens=2))
    assert first not in _run_to_end(engine)[rid].outputs[0].token_ids[:2]


def _penalised_greedy(model, prompt, n, rep, freq, pres, swiftkv=None):
    """Greedy decoding with the full-sequence model and the penalties applied the plain way: transformers'
    repetition processor over prompt + output, then frequency and presence counted token by token."""
    from transformers import RepetitionPenaltyLogitsProcessor

    seq, out = list(prompt), []
    for _ in range(n):
        logits = full_logits(model, [seq], swiftkv=swiftkv)[0][-1:]  # [1, vocab]
        logits = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([seq]), logits)[0]
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


@pytest.mark.parametrize("rep,freq,pres", [(1.8, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 2.0), (1.3, -0.5, 0.7)])
def test_penalties_in_the_engine_match_a_plain_reference(base, rep, freq, pres):
    model = _model(base, 3, 1)
    prompts = _prompts([5, 13])
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=rep,
                            frequency_penalty=freq, presence_penalty=pres)
    outs = _run(_engine(model, max_num_batched_tokens=8), prompts, params)  # chunked prefill, batched decode
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _penalised_greedy(model, p, 10, rep, freq, pres)
    plain = [o.outputs[0].token_ids for o in _run(_engine(model), prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    assert plain != [o.outputs[0].token_ids for o in outs]  # the penalties changed something


def test_set_swiftkv_with_a_live_engine(base):
    from swiftkv.llm import LLM

    config = EngineConfig(kv_cache_memory=8 << 20)
    model = _model(base, 2, 2)
    model.prepare_for_inference()
    llm = LLM.from_model(model, None, config=config)
    prompt, params = _prompts([10])[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    swiftkv_out = llm.generate([prompt], params)[0].outputs[0].token_ids
    assert llm.swiftkv and not hasattr(llm.model, "set_swiftkv")  # the mode is the engine's, not the model's
    llm.engine.add_request(prompt, params)
    with pytest.raises(ValueError, match="in flight"):
        llm.set_swiftkv(False)
    llm.engine.abort_request(next(iter(llm.engine.requests)))
    weights = {id(m.held) for m in llm.model.modules() if getattr(m, "held", None) is not None}
    llm.set_swiftkv(False)  # rebuilds the engine for the original layout, on the same held weights
    assert {id(m.held) for m in llm.model.modules() if getattr(m, "held", None) is not None} == weights
    teacher = _fresh(base)  # the converted model's teacher: the base
    teacher.prepare_for_inference()
    teacher = LLM.from_model(teacher, None, config=config)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == teacher.generate([prompt], params)[0].outputs[0].token_ids
    assert llm.engine.runner.kv_cache.shape[0] == L  # one KV owner per layer again
    llm.set_swiftkv(True)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == swiftkv_out


def test_kv_cache_takes_memory_as_its_blocks_fill(base):
    """A large KV cache (2 GiB here) is reserved, not written: the process grows by what the requests
    use, so a generous ``kv_cache_memory`` (the benchmarks give every engine 4 GiB) costs nothing idle."""
    import os

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs Linux's /proc to read the resident set size")
    model = _fresh(base)
    model.prepare_for_inference()
    before = rss()
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory=2 << 30, block_size=4))
    assert engine.runner.kv_cache.numel() * 4 > (2 << 30) - (1 << 20)
    assert rss() - before < 256 << 20
    prompts = _prompts([5, 23])
    outs = _run(engine, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [greedy_generate(base, p, 8) for p in prompts]
    assert float(engine.runner.kv_cache[:, :, :, -1].abs().sum()) == 0.0  # unused blocks read as zeros


def test_stop_strings_are_found_across_steps_searching_only_the_new_tail(tiny_chat_model_dir):
    """A stop string that straddles the text of several steps is still found (the search starts far enough back),
    and the text is cut before it, as a full-text search would."""
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    llm = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=16 << 20)
    free = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    assert len(free) > 12, free
    stop = free[7:12]  # most likely spread over several tokens
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == free[:free.find(stop)]


def test_cache_salt_isolates_prefix_caching(tiny_chat_model_dir):
    """vLLM's cache_salt: a prompt cached under one salt is not found under another (or none), and is under the
    same salt; so a tenant cannot tell, from hit counters or timing, whether another's prompt is cached."""
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    llm = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=16 << 20)
    eng, params = llm.engine, SamplingParams(temperature=0, max_tokens=1)
    prompt = list(range(100, 164))  # four 16-token blocks

    def hits(salt):
        before = eng.block_manager.num_hit_tokens
        eng.add_request(prompt, params, cache_salt=salt)
        while eng.has_unfinished_requests():
            eng.step()
        return eng.block_manager.num_hit_tokens - before

    assert hits("tenant-a") == 0
    assert hits("tenant-b") == 0 and hits(None) == 0
    assert hits("tenant-a") == 48 and hits(None) == 48  # the same salt (or none, twice) shares: 3 full blocks


def test_generate_keeps_every_other_output_when_one_request_fails(tiny_chat_model_dir, row_fault, monkeypatch):
    """One request whose sampling fails (injected for one seed) fails alone: generate runs the others to their end
    and raises GenerateError carrying their outputs (equal to a run without the bad one) and the cause; nothing of
    the call stays in the engine. An interrupted generate leaves no request behind either."""
    from swiftkv.llm import LLM, GenerateError
    from swiftkv.sampling_params import SamplingParams

    llm = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    bad = SamplingParams(temperature=1.0, seed=row_fault, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(["hello there", "a b c"], greedy)]
    with pytest.raises(GenerateError, match=r"1 of 3 requests failed \(prompt 1: .*injected row fault") as info:
        llm.generate(["hello there", "oops", "a b c"], [greedy, bad, greedy])
    outs = info.value.outputs
    assert outs[1] is None and list(info.value.errors) == [1]
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == expected
    assert all(o.finished for o in (outs[0], outs[2])) and not llm.engine.has_unfinished_requests()

    steps, real_step = [0], llm.engine.step

    def interrupted():
        steps[0] += 1
        if steps[0] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["hello there", "a b c"], greedy)
    assert not llm.engine.has_unfinished_requests()  # aborted, their KV freed
    monkeypatch.setattr(llm.engine, "step", real_step)
    assert [o.outputs[0].token_ids for o in llm.generate(["hello there", "a b c"], greedy)] == expected


def test_cli_generate_says_why_its_request_failed(tiny_chat_model_dir, row_fault, capsys):
    """`swiftkv generate` whose one request fails (injected sampling failure): exit status 1 and one line naming
    the cause, not a traceback."""
    from swiftkv.cli import main

    argv = ["generate", str(tiny_chat_model_dir), "--prompt", "hi", "--raw", "--max-tokens", "4", "--dtype", "float32",
            "--temperature", "1"]
    assert main(argv) == 0
    assert main([*argv, "--seed", str(row_fault)]) == 1
    err = capsys.readouterr().err
    assert "swiftkv generate: error: the request failed:" in err and "injected row fault" in err
