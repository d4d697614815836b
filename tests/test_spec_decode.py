"""Prompt-lookup speculative decoding: the proposer and its config, greedy output identical with and without
drafts (baseline, SwiftKV, AcrossKV; chunked, preempted, prefix-cached, stopped), the block accounting checked
after every step, and the sampler's rejection rule keeping the sampled distribution exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import OracleProposer, run_to_end, tiny_hf_model, to_distinct_swiftkv

from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
from swiftkv.engine.spec_decode import NgramProposer, SpeculativeConfig
from swiftkv.layers.sampler import Sampler, SamplingMetadata
from swiftkv.models.arch import kv_bytes_per_token
from swiftkv.models.full_sequence import full_logits, greedy_generate
from swiftkv.models.loader import load_model
from swiftkv.sampling_params import SamplingParams

L = 6
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
FIXED = {**NGRAM, "adaptive": False}  # every proposed draft verified: the oracle's rejections all reach the sampler


# -- the proposer and its config ------------------------------------------------------------------------------

def test_ngram_proposer_takes_the_longest_suffix_and_its_latest_occurrence():
    p = NgramProposer(SpeculativeConfig("ngram", 3, prompt_lookup_max=3, prompt_lookup_min=1))
    #         0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert p.propose(tokens) == [7, 8, 5]  # "1 2 3" last seen at 5..7: what followed it there
    assert p.propose(tokens, max_drafts=2) == [7, 8]
    assert p.propose(tokens, max_drafts=0) == []
    assert p.propose([4, 5, 6, 7]) == []  # no earlier occurrence of any suffix
    assert p.propose([5, 6, 5]) == [6, 5]  # a 1-gram: what followed it, up to the end
    assert NgramProposer(SpeculativeConfig("ngram", 3, 3, 2)).propose([5, 6, 5]) == []  # min 2: no 2-gram repeats


@pytest.mark.parametrize("spec,needle", [
    ("{not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "not supported"),
    ({"method": "ngram"}, "needs 'method' and 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "must be <="),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}, "unknown key"),
])
def test_invalid_speculative_configs_are_refused_saying_why(spec, needle):
    with pytest.raises(ValueError, match=needle):
        SpeculativeConfig.parse(spec)
    with pytest.raises(ValueError, match=needle):
        EngineConfig(speculative_config=spec)


def test_speculative_config_defaults_follow_vllm():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (5, 2, 4)
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)  # one given: the other takes its value
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(c) is c


# -- the engine: greedy identical, blocks consistent -------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec-base")
    tiny_hf_model("llama", num_hidden_layers=L).save_pretrained(path)
    return path


def _model(base_dir, l, G):
    return to_distinct_swiftkv(load_model(base_dir)[0], l, G)


def _prompts(seed=0):
    """Prompts that repeat themselves (drafts hit) and one that does not."""
    g = torch.Generator().manual_seed(seed)
    r = (lambda n: torch.randint(0, 128, (n,), generator=g).tolist())
    a, b = r(6), r(5)
    return [a * 3, b + a + b + a[:3], r(17), r(3) * 4 + r(2)]


def _run_checked(engine, prompts, params):
    """Run to the end, checking the block accounting after every step; outputs in prompt order."""
    return run_to_end(engine, prompts, params, check_blocks=True)


def _engine(model, spec=NGRAM, blocks=256, **kw):
    model.prepare_for_inference()
    block_bytes = kv_bytes_per_token(model.config, model.layout(), model.compute_dtype) * 4
    return LLMEngine(model, None, EngineConfig(kv_cache_memory=blocks * block_bytes, block_size=4,
                                               speculative_config=spec, **kw))


@pytest.mark.parametrize("l,G", [(L, 1), (3, 1), (2, 2)])  # baseline, SwiftKV, SwiftKV + AcrossKV
@pytest.mark.parametrize("budget", [512, 5])  # 5: prompts chunked, drafts cut by the token budget
@pytest.mark.parametrize("oracle", [False, True])
def test_greedy_output_is_identical_with_speculation(base_dir, l, G, budget, oracle):
    model = _model(base_dir, l, G)
    prompts = _prompts()
    refs = [greedy_generate(model, p, 12) for p in prompts]
    engine = _engine(model, FIXED if oracle else NGRAM, max_num_batched_tokens=budget, max_num_seqs=3)
    if oracle:
        engine.proposer = OracleProposer(prompts, refs)
    outs = _run_checked(engine, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    s = engine.spec_stats
    assert s.num_draft_tokens > 0 and 0 < s.num_accepted_tokens, s
    if oracle:
        assert s.num_accepted_tokens < s.num_draft_tokens  # rejections were rolled back
    assert s.mean_acceptance_length == 1 + s.num_accepted_tokens / s.num_drafts


def test_greedy_identical_under_preemption_with_speculation(base_dir):
    model = _model(base_dir, 3, 1)
    prompts = _prompts(seed=1)
    refs = [greedy_generate(model, p, 12) for p in prompts]
    engine = _engine(model, FIXED, blocks=14, max_num_seqs=4)
    engine.proposer = OracleProposer(prompts, refs)
    preempted = []
    orig = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq, out: (preempted.append(seq.seq_id), orig(seq, out))
    outs = _run_checked(engine, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert preempted, "cache too large to force preemption"
    assert [o.outputs[0].token_ids for o in outs] == refs


def test_prefix_cache_never_holds_rejected_drafts(base_dir):
    """A second turn (prompt + the first turn's output) reuses the first turn's cached blocks, rejected drafts'
    slots included had they been cached: its output must equal the reference's, which recomputes everything."""
    model = _model(base_dir, 3, 1)
    prompts = _prompts(seed=2)
    refs = [greedy_generate(model, p, 14) for p in prompts]
    engine = _engine(model, FIXED, enable_prefix_caching=True)
    engine.proposer = OracleProposer(prompts, refs, k=4)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    first = _run_checked(engine, prompts, params)
    turns = [p + o.outputs[0].token_ids + [7] for p, o in zip(prompts, first)]
    hits = engine.block_manager.num_hit_tokens
    second = _run_checked(engine, turns, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert engine.block_manager.num_hit_tokens - hits >= sum(len(t) // 4 - 1 for t in turns) * 4  # really reused
    assert [o.outputs[0].token_ids for o in second] == [greedy_generate(model, t, 6) for t in turns]


def test_stops_and_logprobs_with_speculation(base_dir):
    """A stop token inside an accepted run of drafts ends the output there; max_tokens is exact; logprobs are the
    full-sequence model's at every emitted token; n > 1 samples each verify their own drafts."""
    model = _model(base_dir, 3, 1)
    prompts = _prompts(seed=3)
    refs = [greedy_generate(model, p, 12) for p in prompts]
    engine = _engine(model, FIXED)
    engine.proposer = OracleProposer(prompts, refs, k=4)
    stop = refs[0][5]
    (out,) = _run_checked(engine, prompts[:1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))
    assert out.outputs[0].token_ids == refs[0][: refs[0].index(stop) + 1] and out.outputs[0].finish_reason == "stop"
    outs = _run_checked(engine, prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2, n=2))
    for p, ref, o in zip(prompts, refs, outs):
        for c in o.outputs:
            assert c.token_ids == ref[:7] and c.finish_reason == "length"
            lp = torch.log_softmax(full_logits(model, [p + c.token_ids])[0], -1)[len(p) - 1 : -1]
            torch.testing.assert_close(torch.tensor([x.logprob for x in c.logprobs]),
                                       lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4, rtol=0)


def test_sampled_requests_with_speculation_finish_and_stay_seeded(base_dir):
    model = _model(base_dir, 3, 1)
    prompts = _prompts(seed=4)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=10, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in _run_checked(_engine(model), prompts, params)]
    b = [o.outputs[0].token_ids for o in _run_checked(_engine(_model(base_dir, 3, 1)), prompts, params)]
    assert a == b and all(len(t) == 10 for t in a)


def test_adaptive_length_stops_verifying_drafts_that_miss_and_resumes_when_they_hit(base_dir):
    """Drafts that keep missing stop being verified (their rows cost more than they bring); the proposals are still
    checked against the sampled tokens for free, and verification resumes once they hit. Output stays exact."""
    model = _model(base_dir, 3, 1)
    prompts = _prompts(seed=6)[:1]
    ref = greedy_generate(model, prompts[0], 24)

    class WrongThenRight:  # 8 proposals of wrong tokens, then the reference's continuation
        calls = 0

        def propose(self, token_ids, max_drafts=None):
            self.calls += 1
            right = ref[len(token_ids) - len(prompts[0]):][: min(3, max_drafts)]
            return [(t + 1) % 128 for t in right] if self.calls <= 8 else right

    engine = _engine(model)
    engine.proposer = proposer = WrongThenRight()
    (out,) = _run_checked(engine, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert out.outputs[0].token_ids == ref
    s = engine.spec_stats
    assert s.num_drafts < proposer.calls  # some proposals were only checked, not verified
    assert s.num_accepted_tokens >= 6  # ... and verification came back once they hit


def test_draft_length_follows_the_acceptance():
    from swiftkv.engine.spec_decode import DraftStats

    lengths = [DraftStats(10 * a, 10 * (1 - a)).length(6) for a in (0.1, 0.5, 0.8, 0.95, 1.0)]
    assert lengths[0] == 0 and lengths == sorted(lengths) and lengths[-1] >= 3
    s = DraftStats()
    for _ in range(10):
        s.observe(3, 0)
    assert s.length(4) == 0  # drafts that never hit are not worth a row
    for _ in range(10):
        s.observe(3, 3)
    assert s.length(4) >= 3
    assert s.length(4, row_cost=5.0) == 0 and DraftStats(0.5, 0.5).length(4, row_cost=0.01) == 4  # cost decides too


def test_step_cost_fits_the_decode_steps_time_per_row():
    from swiftkv.engine.spec_decode import DRAFT_ROW_COST, StepCost

    cost = StepCost()
    for _ in range(10):
        cost.add(1, 0.070)
    assert cost.row_cost(1) == DRAFT_ROW_COST  # one size of step only: no slope to fit yet
    for rows in [1, 2, 5, 3, 1, 4] * 3:
        cost.add(rows, 0.066 + 0.004 * rows)  # a memory-bound model: 4 ms per row over 66 ms
    assert cost.row_cost(1) == pytest.approx(0.004 / 0.070) and cost.row_cost(4) == pytest.approx(0.004 / 0.082)


def test_penalties_and_stop_strings_with_speculation(tiny_chat_model_dir):
    """Penalties see each draft as an output before the next (one row each), and stop strings end the text where
    they do without drafts: output equal to the engine's without speculation."""
    from swiftkv.llm import LLM

    plain = LLM(tiny_chat_model_dir, dtype="float32", kv_cache_memory=16 << 20)
    spec = LLM.from_model(plain.model, plain.tokenizer, tiny_chat_model_dir,
                          EngineConfig(kv_cache_memory=16 << 20, speculative_config=FIXED))
    prompts = ["one two three one two three one two", "the cat sat on the mat and the cat sat on the"]
    for params in (SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, presence_penalty=0.4,
                                  frequency_penalty=0.3, repetition_penalty=1.3),
                   SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=5)):
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
        assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    text = plain.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    a, b = plain.generate(prompts[:1], params)[0].outputs[0], spec.generate(prompts[:1], params)[0].outputs[0]
    assert (b.text, b.finish_reason) == (a.text, a.finish_reason) and a.finish_reason == "stop"
    assert spec.engine.spec_stats.num_accepted_tokens > 0


def test_sampled_output_distribution_is_unchanged_in_the_engine(base_dir):
    """The joint distribution of a request's second and third sampled tokens (top-k 3, temperature 1; the second is
    verified against a draft, the greedy continuation, kept with probability p(draft); the third is the bonus
    token or a draw after a rejection) equals the one without drafts: a two-sample chi-square test over 500 seeded
    requests each, at 0.1% significance."""
    model = _model(base_dir, 3, 1)
    prompt = _prompts(seed=7)[0]
    ref = greedy_generate(model, prompt, 3)
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, seed=s) for s in range(500)]

    def joint(engine):
        ids = [engine.add_request(prompt, p) for p in params]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: tuple(o.outputs[0].token_ids[1:]) for o in engine.step() if o.finished})
        return [done[i] for i in ids]

    without = joint(_engine(model, None, blocks=2048, max_num_seqs=128))
    engine = _engine(_model(base_dir, 3, 1), FIXED, blocks=2048, max_num_seqs=128)

    class Greedy:  # drafts the greedy continuation after the prompt: the most likely tokens, often accepted
        def propose(self, token_ids, max_drafts=None):
            return ref[len(token_ids) - len(prompt):][:max_drafts]

    engine.proposer = Greedy()
    with_drafts = joint(engine)
    assert engine.spec_stats.num_accepted_tokens > 50  # drafts were verified, many accepted
    cats = sorted(set(without) | set(with_drafts))
    a = torch.tensor([without.count(c) for c in cats], dtype=torch.double)
    b = torch.tensor([with_drafts.count(c) for c in cats], dtype=torch.double)
    keep = (a + b) >= 10  # pool the rare pairs into one cell
    a = torch.cat([a[keep], a[~keep].sum()[None]])
    b = torch.cat([b[keep], b[~keep].sum()[None]])
    a, b = a[(a + b) > 0], b[(a + b) > 0]
    chi2 = float((((a - b) ** 2) / (a + b)).sum())  # equal sample sizes
    dof = len(a) - 1
    critical = {k: v for k, v in zip(range(1, 31), [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88,
                                                     29.59, 31.26, 32.91, 34.53, 36.12, 37.70, 39.25, 40.79, 42.31,
                                                     43.82, 45.31, 46.80, 48.27, 49.73, 51.18, 52.62, 54.05, 55.48,
                                                     56.89, 58.30, 59.70])}[dof]
    assert chi2 < critical, (chi2, dof, cats)


# -- the rejection rule: the sampled distribution is exact ----------------------------------------------------------

P0 = [0.5, 0.3, 0.15, 0.05]  # the model's distribution at the draft's position
P1 = [0.1, 0.2, 0.3, 0.4]  # ... and after an accepted draft


@pytest.mark.parametrize("draft", [0, 3])  # a likely draft and an unlikely one
def test_rejection_sampling_keeps_the_distribution(draft):
    """Each emitted token is distributed as the model's own p, whatever the draft: the first token is p0's draw
    (the draft kept with probability p0(draft)), the second, when the draft was kept, p1's. A chi-square test
    at 0.1% significance per distribution, on 6,000 draws."""
    n = 6000
    logits = torch.tensor([[math.log(p) for p in P0], [math.log(p) for p in P1]] * n)  # [2n, 4]
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    meta = SamplingMetadata([params] * 2 * n, [gen] * 2 * n, [[]] * 2 * n, [[]] * 2 * n, [frozenset()] * 2 * n,
                            draft_ids=[[draft]] * n)
    out = Sampler()(logits, meta)
    assert not out.errors
    first = [t[0] for t in out.tokens]
    second = [t[1] for t in out.tokens if t[0] == draft]
    assert all(len(t) == 2 if t[0] == draft else len(t) == 1 for t in out.tokens)
    for tokens, probs in ((first, P0), (second, P1)):
        counts = torch.bincount(torch.tensor(tokens), minlength=4).double()
        expected = torch.tensor(probs, dtype=torch.double) * len(tokens)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.27, (counts.tolist(), expected.tolist())  # chi-square, 3 dof, p = 0.001


def test_greedy_verification_keeps_drafts_up_to_the_first_other_choice():
    logits = torch.eye(5)[[1, 2, 3, 4]] * 5  # argmax of row j: j + 1
    g = SamplingParams(temperature=0, logprobs=0)
    meta = SamplingMetadata([g] * 4, [None] * 4, [[]] * 4, [[]] * 4, [frozenset()] * 4, draft_ids=[[1, 2, 0]])
    out = Sampler()(logits, meta)
    assert out.tokens == [[1, 2, 3]] and len(out.logprobs[0]) == 3  # drafts 1, 2 kept; 0 replaced by 3
    meta = SamplingMetadata([g] * 4, [None] * 4, [[]] * 4, [[]] * 4, [frozenset()] * 4, draft_ids=[[1, 2, 3]])
    assert Sampler()(logits, meta).tokens == [[1, 2, 3, 4]]  # all kept: the bonus token from the last row
    with pytest.raises(ValueError, match="rows of logits"):
        Sampler()(logits, SamplingMetadata([g] * 4, [None] * 4, [[]] * 4, [[]] * 4, [frozenset()] * 4, [[1]]))


# -- the server ------------------------------------------------------------------------------------------------

def test_server_with_speculation_streams_the_same_greedy_text_and_reports_acceptance(server, tiny_chat_model_dir):
    import httpx
    from conftest import SERVED_MODEL, start_server

    srv, _ = start_server(tiny_chat_model_dir, speculative_config=json.dumps(NGRAM))
    try:
        body = {"model": SERVED_MODEL, "prompt": "one two three four one two three four one two", "max_tokens": 24,
                "temperature": 0, "ignore_eos": True}
        plain = httpx.post(server[0].url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        spec = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert spec == plain
        streamed = ""
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    streamed += json.loads(line[6:])["choices"][0]["text"]
        assert streamed == plain
        off = httpx.post(srv.url + "/v1/completions", json={**body, "num_speculative_tokens": 0}, timeout=60)
        assert off.json()["choices"][0]["text"] == plain  # this request asked for no drafts
        metrics = httpx.get(srv.url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("swiftkv_spec_decode")}
        assert values["swiftkv_spec_decode_num_draft_tokens"] > 0, values
        assert values["swiftkv_spec_decode_mean_acceptance_length"] >= 1, values
        too_many = httpx.post(srv.url + "/v1/completions", json={**body, "num_speculative_tokens": 9}, timeout=60)
        assert too_many.status_code == 400 and "exceeds the engine's" in too_many.json()["error"]["message"]
        for bad in (-1, 1.5, "2"):
            r = httpx.post(srv.url + "/v1/completions", json={**body, "num_speculative_tokens": bad}, timeout=60)
            assert r.status_code == 400 and "num_speculative_tokens" in r.json()["error"]["message"], r.text
    finally:
        srv.stop()
    bad = httpx.post(server[0].url + "/v1/completions", json={**body, "num_speculative_tokens": 2}, timeout=60)
    assert bad.status_code == 400 and "--speculative-config" in bad.json()["error"]["message"]


def test_serve_refuses_a_bad_speculative_config_before_loading(capsys):
    import swiftkv.cli

    rc = swiftkv.cli.main(["serve", "/nonexistent-model", "--speculative-config", '{"method": "ngram"}'])
    assert rc == 2 and "needs 'method' and 'num_speculative_tokens'" in capsys.readouterr().err
