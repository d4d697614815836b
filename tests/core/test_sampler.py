"""The sampler against hand-computed distributions (top-k, top-p, temperature)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from swiftkv.layers.sampler import Sampler
from swiftkv.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]


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
        tokens, _ = Sampler()(logits, [params] * len(logits), [gen] * len(logits))
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
