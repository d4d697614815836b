"""``EvalConfig``: what ``swiftkv eval`` evaluates (light to import: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from swiftkv.eval.tasks import ALL_TASKS


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

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
        for name in ("limit", "gsm8k_limit", "lambada_limit", "chat_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = full set)")
