"""The sampler against hand-computed distributions (top-k, top-p, temperature)."""

from __future__ import annotations

import math

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
