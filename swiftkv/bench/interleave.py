"""Interleaved repetitions (A B C A B C ...) so a noisy machine affects every system alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interleave(runners: dict[str, Callable[[], T]], reps: int, desc: str, warmup: bool = True) -> dict[str, list[T]]:
    """Run each system once to warm up (result dropped), then ``reps`` rounds of every system in turn.
    A progress bar on stderr names the system running now (benchmarks can take many minutes)."""
    results: dict[str, list[T]] = {name: [] for name in runners}
    rounds = reps + (1 if warmup else 0)
    with tqdm(total=rounds * len(runners), desc=desc, unit="run", leave=False) as bar:
        for r in range(rounds):
            for name, fn in runners.items():
                bar.set_postfix_str(f"{name}{' (warm-up)' if warmup and r == 0 else ''}")
                out = fn()
                if not (warmup and r == 0):
                    results[name].append(out)
                bar.update(1)
    return results
