"""The sampler against hand-computed distributions (top-k, top-p, temperature)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from swiftkv.layers.sampler import Sampler, SamplingMetadata
from swiftkv.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]


def sample(logits, params, gens, blocked=None, prompts=None, outputs=None):
    """The sampler on rows with no prompt or output yet (no penalties' history), nothing blocked unless given:
    ``(tokens, logprobs, errors)``."""
    n = len(params)
    out = Sampler()(logits, SamplingMetadata(params, gens, prompts or [[]] * n, outputs or [[]] * n,
                                             blocked or [set()] * n))
    assert all(len(t) == (0 if r in out.errors else 1) for r, t in enumerate(out.tokens))  # no drafts: one token
    return ([t[0] if t else None for t in out.tokens], [lp and lp[0] for lp in out.logprobs], out.errors)


@pytest.mark.parametrize("kw,expected", [
    ({}, PROBS),
    ({"top_k": 2}, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    ({"top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # 0.5 < 0.7 before token 1: kept; 0.8 >= 0.7 before token 2
    ({"top_p": 0.9}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    ({"top_k": 3, "top_p": 0.6}, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
    ({"temperature": 0.5}, [p * p / sum(q * q for q in PROBS) for p in PROBS]),
])
def test_sampled_frequencies_match_the_hand_computed_distribution(kw, expected):
    logits = torch.tensor([[math.log(p) for p in PROBS]] * 4000)
    params = SamplingParams(temperature=kw.pop("temperature", 1.0), **kw)
    gen = torch.Generator().manual_seed(0)
    counts = [0] * len(PROBS)
    for _ in range(5):
        tokens, _, _ = sample(logits, [params] * len(logits), [gen] * len(logits))
        for t in tokens:
            counts[t] += 1
    freq = [c / sum(counts) for c in counts]
    for f, e in zip(freq, expected):
        assert f == pytest.approx(e, abs=0.015), (freq, expected)  # 5 sigma at 20,000 draws
        if e == 0:
            assert f == 0


# -- penalties (vLLM's) ----------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_processor():
    """vLLM's repetition penalty is transformers' ``RepetitionPenaltyLogitsProcessor`` over prompt + output."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from swiftkv.layers.sampler import apply_penalties

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    prompts, outputs = [[1, 2, 3, 2], [7], [40, 41]], [[3, 9, 9], [], [0, 49, 49, 5]]
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 0.7, 2.0)]
    got = logits.clone()
    apply_penalties(got, params, prompts, outputs)
    for r, p in enumerate(params):
        ids = torch.tensor([prompts[r] + outputs[r]])
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[r : r + 1].clone())[0]
        torch.testing.assert_close(got[r], ref)


def test_frequency_and_presence_penalties_hand_computed():
    from swiftkv.layers.sampler import apply_penalties

    logits = torch.zeros(2, 5)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    apply_penalties(logits, params, [[2, 2], [1]], [[1, 1, 3], [1]])  # prompt tokens: never counted by these two
    assert logits[0].tolist() == [0.0, -1.25, 0.0, -0.75, 0.0]
    assert logits[1].tolist() == [0.0] * 5  # no penalty set: row untouched


@pytest.mark.parametrize("kw,needle", [
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens must be less than or equal to max_tokens=3, got 5"),
    ({"min_tokens": -1}, "min_tokens must be a non-negative integer"),
    ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2]"),
])
def test_bad_penalties_and_min_tokens_are_refused_as_vllm_does(kw, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        SamplingParams(**kw)


def test_a_row_that_cannot_be_sampled_fails_alone():
    """Extreme but valid parameters are clamped (a tiny temperature is greedy, top_p keeps the top token); a row
    with nothing to sample (every logit masked) fails alone, its neighbours sampled as usual."""
    logits = torch.tensor([[math.log(p) for p in PROBS]] * 5)
    logits[1] = float("-inf")
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=1e-300), SamplingParams(temperature=5e-324),
              SamplingParams(temperature=1e-38, top_k=2)]
    gen = torch.Generator().manual_seed(0)
    tokens, _, errors = sample(logits, params, [gen] * 5)
    assert set(errors) == {1} and "nothing can be sampled" in errors[1]
    nan = logits.clone()
    nan[3, 2] = float("nan")
    assert set(sample(nan, params, [gen] * 5)[2]) == {1, 3}
    assert tokens == [0, None, 0, 0, 0]
    assert all(p.greedy for p in (params[0], params[3], params[4])) and not params[2].greedy
    huge = torch.tensor([[3e38, 3e38, -3e38, 0.0]])  # a temperature below 1 overflows these to inf
    for _ in range(20):
        t, _, e = sample(huge, [SamplingParams(temperature=0.5)], [gen])
        assert not e and t[0] in (0, 1)


def test_fp32_unrepresentable_penalties_are_refused():
    with pytest.raises(ValueError, match="repetition_penalty must be greater than zero"):
        SamplingParams(repetition_penalty=1e-300)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("inf"))
    assert SamplingParams(repetition_penalty=1e-30).repetition_penalty == 1e-30


def test_the_pipeline_blocks_stops_then_penalises_then_reports_logprobs():
    """vLLM v1's order in one sampler: a stop id is blocked before min_tokens, penalties apply to what is left,
    and the logprobs (top-k through ``top_logprobs``, as prompt logprobs use) are those of the processed logits."""
    from swiftkv.layers.sampler import top_logprobs

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0, logprobs=2, presence_penalty=1.5)
    tokens, lps, errors = sample(logits, [params], [None], blocked=[{0}], outputs=[[1]])
    processed = torch.log_softmax(torch.tensor([float("-inf"), 0.5, 1.0, 0.0]), -1)  # 0 blocked, 1 penalised
    assert tokens == [2] and not errors
    assert lps[0][0] == pytest.approx(float(processed[2]))
    assert lps[0][1] == pytest.approx(top_logprobs(processed, 2)) and list(lps[0][1]) == [2, 1]
    assert sample(logits, [params], [None])[0] == [0]  # nothing blocked, no output yet: the argmax
    assert top_logprobs(processed, 0) == {}
