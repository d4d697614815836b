"""Benchmark reports: one table (text), one chart (PNG), one JSON."""

from __future__ import annotations

from pathlib import Path

from swiftkv.fileio import atomic_write, atomic_write_json

COLUMNS = [  # (key, header, format)
    ("total_tokens_per_s", "tok/s", "{:.0f}"),
    ("requests_per_s", "req/s", "{:.2f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50", "{:.2f}s"),
    ("ttft_p99_s", "TTFT p99", "{:.2f}s"),
    ("tpot_p50_s", "TPOT p50", "{:.3f}s"),
    ("tpot_p99_s", "TPOT p99", "{:.3f}s"),
    ("kv_bytes_per_token", "KV B/tok", "{:.0f}"),
    ("max_concurrent_seqs", "max seqs", "{:.0f}"),
    ("gflops_per_s", "GFLOP/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
]


def format_table(systems: dict[str, dict]) -> str:
    """Rows = systems, columns = metrics; missing values print as '-'."""
    name_w = max([len("system")] + [len(s) for s in systems]) + 2
    widths = [max(len(h), 9) + 2 for _, h, _ in COLUMNS]
    lines = ["system".ljust(name_w) + "".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, widths))]
    for name, m in systems.items():
        cells = [(fmt.format(m[k]) if m.get(k) is not None else "-").rjust(w)
                 for (k, _, fmt), w in zip(COLUMNS, widths)]
        lines.append(name.ljust(name_w) + "".join(cells))
    return "\n".join(lines)


def ratio_lines(systems: dict[str, dict], key: str = "total_tokens_per_s", ref: str = "swiftkv") -> list[str]:
    if ref not in systems or not systems[ref].get(key):
        return []
    return [f"{ref}/{name} {key}: {systems[ref][key] / m[key]:.2f}x" for name, m in systems.items()
            if name != ref and m.get(key)]


def plot(systems: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(systems)
    metrics = [("total_tokens_per_s", "throughput (tokens/s)"), ("prefill_tokens_per_s", "prefill (tokens/s)"),
               ("ttft_p50_s", "TTFT p50 (s)"), ("tpot_p50_s", "TPOT p50 (s)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (key, label) in zip(axes, metrics):
        vals = [systems[n].get(key) or 0 for n in names]
        palette = ["tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        bars = ax.bar(names, vals, color=[palette[i % len(palette)] for i in range(len(names))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def write_json(result: dict, path: Path) -> None:
    atomic_write_json(path, result, indent=2)
