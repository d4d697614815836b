"""Distillation outputs: trained tensors, the full SwiftKV checkpoint, plots and ablation tables."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from swiftkv.fileio import atomic_write


def save_trained_tensors(params: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """The trained SwiftKV tensors only (bf16), atomically: what a shipped model adds to its base."""
    tensors = {n: p.detach().to("cpu", torch.bfloat16).contiguous() for n, p in params.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()}))


def plot_logs(logs: dict[str, list[dict]], path: Path) -> None:
    """Held-out top-1 agreement and KL vs training tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, log in logs.items():
        pts = [e for e in log if "eval_agree" in e]
        toks = [e["tokens"] / 1e6 for e in pts]
        ax1.plot(toks, [100 * e["eval_agree"] for e in pts], marker="o", label=name)
        ax2.plot(toks, [e["eval_kl"] for e in pts], marker="o", label=name)
    ax1.set(xlabel="training tokens (M)", ylabel="held-out top-1 agreement with teacher (%)", title="Agreement")
    ax2.set(xlabel="training tokens (M)", ylabel="held-out KL(teacher || student)", title="KL")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


def ablation_table(logs: dict[str, list[dict]]) -> str:
    """Markdown table: start and end held-out agreement / KL per run."""
    lines = ["| run | tokens | agree start | agree end | KL start | KL end |", "|---|---|---|---|---|---|"]
    for name, log in logs.items():
        pts = [e for e in log if "eval_agree" in e]
        if not pts:
            continue
        a, b = pts[0], pts[-1]
        lines.append(f"| {name} | {b['tokens']:,} | {100 * a['eval_agree']:.1f}% | {100 * b['eval_agree']:.1f}% "
                     f"| {a['eval_kl']:.3f} | {b['eval_kl']:.3f} |")
    return "\n".join(lines)


def read_log(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "log.json").read_text())["log"]
