"""Scoring (as lm-evaluation-harness defines it) and paired bootstrap confidence intervals.

Pure functions over numbers: no model here, so every rule is testable with given log-likelihoods.
"""

from __future__ import annotations

import math
import re

import numpy as np

from swiftkv.eval.tasks import GenItem, MCItem

# primary metric per task (the one averaged and charted), following lm-eval / the Open LLM Leaderboard
PRIMARY_METRIC = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "piqa": "acc_norm",
    "boolq": "acc",
    "mmlu": "acc",
    "truthfulqa_mc1": "acc",
    "truthfulqa_mc2": "mc2",
    "gsm8k": "exact_match",
}


def score_mc(item: MCItem, lls: list[float]) -> dict[str, float]:
    """``acc``: argmax of the summed log-likelihoods; ``acc_norm``: argmax of log-likelihood per
    character of the choice text (lm-eval's length normalisation; the leading delimiter space
    is not counted); ``mc2`` (when ``item.labels``): probability mass on the true choices."""
    if len(lls) != len(item.continuations):
        raise ValueError(f"{item.id}: {len(lls)} log-likelihoods for {len(item.continuations)} choices")
    ll = np.asarray(lls, dtype=np.float64)
    chars = np.array([max(1, len(c.lstrip(" "))) for c in item.continuations], dtype=np.float64)
    out = {"acc": float(int(np.argmax(ll)) == item.gold), "acc_norm": float(int(np.argmax(ll / chars)) == item.gold)}
    if item.labels is not None:
        labels = np.asarray(item.labels, dtype=bool)
        m = ll.max()
        p = np.exp(ll - m)  # stable: the common factor exp(m) cancels in the ratio
        out["mc2"] = float(p[labels].sum() / p.sum())
    return out


def chance_score(item: MCItem | GenItem, metric: str) -> float:
    """The expected score of a uniform random guess on ``item`` under ``metric``: 1 / choices for
    ``acc`` / ``acc_norm``, the share of true choices for ``mc2``, 0 for generation."""
    if isinstance(item, GenItem):
        return 0.0
    if metric == "mc2":
        return sum(item.labels) / len(item.labels)
    return 1.0 / len(item.continuations)


def clearly_above(scores: list[float], level: float, z: float = 1.96) -> bool:
    """Whether the mean of per-item ``scores`` exceeds ``level`` by more than ``z`` standard errors
    (the lower end of its 95% interval, normal approximation)."""
    a = np.asarray(scores, dtype=np.float64)
    if a.size < 2:
        return False
    return bool(a.mean() - z * a.std(ddof=1) / math.sqrt(a.size) > level)


_ANSWER_RE = re.compile(r"answer is \$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def extract_number(text: str) -> str | None:
    """GSM8K answer extraction: the number after "the answer is" (the 8-shot format), else the
    last number in the text (lm-eval's flexible extract). Commas removed; ``None`` if no number."""
    m = _ANSWER_RE.search(text)
    if m:
        found = m.group(1)
    else:
        nums = _NUMBER_RE.findall(text)
        if not nums:
            return None
        found = nums[-1]
    return found.replace(",", "").rstrip(".")


def gsm8k_exact_match(generated: str, gold: str) -> float:
    """1.0 when the extracted final number equals the gold answer numerically."""
    pred = extract_number(generated)
    if pred is None:
        return 0.0
    try:
        return float(math.isclose(float(pred), float(gold.replace(",", "")), abs_tol=1e-9))
    except ValueError:
        return 0.0


def paired_bootstrap(
    pairs: list[tuple[np.ndarray, np.ndarray]], num_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Confidence interval of ``mean over tasks of (mean(b) - mean(a))``.

    ``pairs`` holds per-item scores of the same items under two models (teacher ``a``, SwiftKV
    ``b``), one pair per task; items are resampled with replacement within each task, and the
    same resampled items are used for both models (paired).
    """
    rng = np.random.default_rng(seed)
    diffs = np.zeros(num_samples)
    for a, b in pairs:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or a.size == 0:
            raise ValueError("paired scores need the same, non-zero number of items")
        idx = rng.integers(0, a.size, size=(num_samples, a.size))
        diffs += (b[idx] - a[idx]).mean(axis=1)
    diffs /= len(pairs)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
