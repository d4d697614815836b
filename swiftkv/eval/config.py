"""``EvalConfig``: what ``swiftkv eval`` evaluates (light to import: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from swiftkv.eval.tasks import ALL_TASKS

# How much of each benchmark a run scores. "quick": seeded 100-item subsets (minutes; a difference
# of one point is inside its noise). "judge": every item where the files have a full set, 2,000
# HellaSwag items; sized so the interval of the above-chance average is about +-1 point.
BUDGETS: dict[str, dict] = {
    "quick": {"limit": 100, "gsm8k_limit": 20, "lambada_limit": 100, "task_limits": {}},
    "judge": {"limit": 0, "gsm8k_limit": 200, "lambada_limit": 1000, "task_limits": {"hellaswag": 2000}},
}


@dataclass
class EvalConfig:
    """What to evaluate and how much of it (``limit`` 0 = full sets)."""

    model: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    limit: int = 100
    gsm8k_limit: int = 20
    lambada_limit: int = 100
    chat_prompts: int = 16
    seed: int = 0
    dtype: str = "auto"
    max_batch_tokens: int = 4096
    bootstrap_samples: int = 1000
    distribution: bool = True  # held-out KL/agreement, LAMBADA
    generation: bool = True  # chat agreement, verifiable instructions
    data: str | None = None  # held-out chats: the distillation data (default ShareGPT)
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task overrides of ``limit``
    budget: str = "quick"  # the preset the limits came from (recorded in results.json)

    @classmethod
    def from_budget(cls, budget: str = "quick", **overrides) -> EvalConfig:
        """A config with ``budget``'s limits (:data:`BUDGETS`); ``overrides`` that are not None win, and
        an explicit ``limit`` applies to every task (the budget's per-task limits are dropped)."""
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown eval setting(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        preset = {**BUDGETS[budget], **({"task_limits": {}} if "limit" in given else {})}
        return cls(**{**preset, "budget": budget, **given})

    def limit_for(self, task: str) -> int:
        """Items of ``task`` to score (0 = all)."""
        return self.task_limits.get(task, self.limit)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
        for name in ("limit", "gsm8k_limit", "lambada_limit", "chat_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = full set)")
        for task, n in self.task_limits.items():
            if task not in ALL_TASKS or n < 0:
                raise ValueError(f"task limit {task}={n}: the task must be one of {', '.join(ALL_TASKS)} and the "
                                 "limit >= 0")
