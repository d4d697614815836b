"""Quality evaluation: real task files, scoring rules, paired log-likelihoods, lm-eval usability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from swiftkv.config import SwiftKVConfig
from swiftkv.eval import runner
from swiftkv.eval.instructions import INSTRUCTIONS
from swiftkv.eval.loglik import Scored, encode_pair, score_pairs
from swiftkv.eval.metrics import (
    chance_score,
    clearly_above,
    extract_number,
    gsm8k_exact_match,
    paired_bootstrap,
    score_mc,
)
from swiftkv.eval.packing import build_trees
from swiftkv.eval.tasks import GenItem, MCItem, load_lambada, load_task, subset
from swiftkv.models.full_sequence import full_logits
from swiftkv.models.loader import load_model, load_tokenizer, save_checkpoint
from swiftkv.transform import to_swiftkv

EXPECTED_COUNTS = {"arc_challenge": 299, "arc_easy": 570, "hellaswag": 10042, "winogrande": 1267, "piqa": 1838,
                   "boolq": 3270, "mmlu": 14042, "truthfulqa_mc1": 299, "truthfulqa_mc2": 299, "gsm8k": 1319}
NUM_CHOICES = {"arc_challenge": (3, 5), "arc_easy": (3, 5), "hellaswag": (4, 4), "winogrande": (2, 2), "piqa": (2, 2),
               "boolq": (2, 2), "mmlu": (4, 4), "truthfulqa_mc1": (2, 13), "truthfulqa_mc2": (2, 30)}


@pytest.mark.parametrize("task", list(EXPECTED_COUNTS))
def test_task_loaders_read_real_files(task):
    items = load_task(task)
    assert len(items) == EXPECTED_COUNTS[task]
    if task == "gsm8k":
        for it in items[:50]:
            assert it.prompt.count("Question:") == 9 and it.prompt.endswith("Answer:")  # 8 shots + the question
            assert extract_number(it.answer) == it.answer.replace(",", "")
        return
    lo, hi = NUM_CHOICES[task]
    for it in items:
        assert lo <= len(it.continuations) <= hi and len(it.contexts) == len(it.continuations)
        assert 0 <= it.gold < len(it.continuations)
        assert all(c for c in it.contexts) and all(c.strip() for c in it.continuations)
    if task == "mmlu":
        assert items[0].contexts[0].count("\nAnswer:") == 6  # 5 dev shots + the question
    if task == "truthfulqa_mc2":
        assert all(1 in it.labels and 0 in it.labels for it in items)


def test_lambada_and_subsets():
    passages = load_lambada()
    assert len(passages) == 5153 and all(ctx and word.strip() for ctx, word in passages[:100])
    a, b = subset(passages, 50, seed=3), subset(passages, 50, seed=3)
    assert a == b and len(a) == 50 and subset(passages, 50, seed=4) != a
    assert subset(passages, 0, seed=0) == passages
    with pytest.raises(ValueError, match="limit"):
        subset(passages, -1, 0)


def test_scoring_on_hand_made_items():
    item = MCItem("x", ["Q:"] * 3, [" a", " bbbbbbbbbb", " cc"], gold=1)
    # raw: choice 0 wins; per character: choice 1 (-3/10) beats choice 0 (-1/1) and 2 (-4/2)
    s = score_mc(item, [-1.0, -3.0, -4.0])
    assert s == {"acc": 0.0, "acc_norm": 1.0}
    assert score_mc(item, [-5.0, -0.5, -4.0]) == {"acc": 1.0, "acc_norm": 1.0}
    mc2 = MCItem("y", ["Q:"] * 3, [" t1", " t2", " f"], gold=0, labels=[1, 1, 0])
    lls = [math.log(0.2), math.log(0.1), math.log(0.3)]
    assert score_mc(mc2, lls)["mc2"] == pytest.approx(0.3 / 0.6)
    assert score_mc(mc2, [x - 800 for x in lls])["mc2"] == pytest.approx(0.5)  # stable for tiny probabilities
    with pytest.raises(ValueError):
        score_mc(item, [0.0])


def test_gsm8k_answer_extraction():
    assert extract_number("She has 3 + 4 = 7 apples. So the answer is 7.") == "7"
    assert extract_number("The answer is $1,250.") == "1250"
    assert extract_number("first 12 then 15") == "15"
    assert extract_number("no digits here") is None
    assert gsm8k_exact_match("So the answer is 18.", "18") == 1.0
    assert gsm8k_exact_match("So the answer is 18.0", "18") == 1.0
    assert gsm8k_exact_match("So the answer is 17. Then 18", "18") == 0.0
    assert gsm8k_exact_match("nothing", "18") == 0.0


def test_paired_bootstrap():
    a = np.array([0, 1, 1, 0, 1, 0, 1, 1] * 10, dtype=float)
    assert paired_bootstrap([(a, a)]) == (0.0, 0.0)
    b = a.copy()
    b[:40] = 1.0  # SwiftKV better on some items
    lo, hi = paired_bootstrap([(a, b)])
    assert 0 < lo <= (b - a).mean() <= hi
    lo2, hi2 = paired_bootstrap([(a, b), (a, a)])  # the average over two tasks halves the shift
    assert lo2 == pytest.approx(lo / 2, abs=0.03) and hi2 == pytest.approx(hi / 2, abs=0.03)


def test_instruction_rules():
    by_id = {i.id: i.check for i in INSTRUCTIONS}
    assert by_id["bullets_3"]("- a\n- b\n- c") and not by_id["bullets_3"]("- a\n- b")
    assert by_id["lowercase"]("the sea is blue.") and not by_id["lowercase"]("The sea.")
    assert by_id["json"]('```json\n{"name": "Ann", "age": 3}\n```') and not by_id["json"]("{name: Ann}")
    assert by_id["two_paragraphs"]("one.\n\ntwo.") and not by_id["two_paragraphs"]("one.\ntwo.")
    assert by_id["title_brackets"]("<<The Dragon>>") and not by_id["title_brackets"]("The Dragon")
    assert by_id["no_letter_e"]("A big dog ran.") and not by_id["no_letter_e"]("The dog.")


@pytest.fixture(scope="module")
def models(tiny_chat_model_dir):
    base, _ = load_model(tiny_chat_model_dir)
    tok = load_tokenizer(tiny_chat_model_dir)
    student = to_swiftkv(base, SwiftKVConfig(6, 2, 2))
    with torch.no_grad():  # make SwiftKV differ visibly from the teacher
        for n, p in student.named_parameters():
            if "_swiftkv" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return base, student, tok, tiny_chat_model_dir


def test_packed_loglikelihoods_match_full_sequence(models):
    _, student, tok, _ = models
    pairs = [encode_pair(tok, "The sky is", c) for c in [" blue", " green today", " blue"]]
    pairs += [encode_pair(tok, "Numbers: 1 2 3", " 4 5"), encode_pair(tok, "x ", "y")]
    out = score_pairs(student, pairs, max_batch_tokens=16)
    for mode in ("teacher", "swiftkv"):
        for (ctx, cont), s in zip(pairs, out[mode]):
            logp = full_logits(student, [ctx + cont], swiftkv=mode == "swiftkv")[0].log_softmax(-1)[len(ctx) - 1 : -1]
            ref = logp.gather(1, torch.tensor(cont)[:, None]).squeeze(1)
            torch.testing.assert_close(s.logprobs, ref, atol=1e-4, rtol=1e-4)
            assert torch.equal(s.greedy, logp.argmax(-1) == torch.tensor(cont))
    assert not torch.allclose(out["teacher"][3].logprobs, out["swiftkv"][3].logprobs)
    assert encode_pair(tok, "x ", "y") == encode_pair(tok, "x", " y")  # trailing space moves


def test_shared_prefix_scoring_equals_unshared(models):
    """Few-shot questions behind one copy of their common prefix (a tree mask) score exactly as each
    question alone; a small token budget splits them into several trees, each with the prefix."""
    _, student, tok, _ = models
    head = "Examples follow. alpha beta gamma delta, river stone cloud. " * 4
    contexts = [head + f"Question {q}: which word comes next?\nAnswer:" for q in range(6)]
    pairs = [encode_pair(tok, c, x) for c in contexts for x in (" A", " B", " river")]
    pairs.append(encode_pair(tok, "Nothing shared here", " ok"))
    groups = {}
    for ctx, cont in pairs:
        groups.setdefault(tuple(ctx), []).append(tuple(cont))
    shared_tokens = sum(len(t.tokens) for t in build_trees(groups, 256, 4096))
    plain_tokens = sum(len(t.tokens) for t in build_trees(groups, 256, 4096, share=False))
    assert shared_tokens < plain_tokens / 2  # the prefix really is computed once
    assert len(build_trees(groups, 256, 120)) > 2  # the budget splits the shared questions
    for budget in (4096, 120):
        shared = score_pairs(student, pairs, max_batch_tokens=budget)
        plain = score_pairs(student, pairs, share_prefixes=False)
        for mode in ("teacher", "swiftkv"):
            for a, b in zip(shared[mode], plain[mode]):
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
                assert torch.equal(a.greedy, b.greedy)


def test_teacher_and_l_equals_L_score_identically(models):
    base, _, tok, _ = models
    same = to_swiftkv(base, SwiftKVConfig(6, 6, 1))
    items = load_task("arc_easy")[:5]
    pairs = [encode_pair(tok, c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    out = score_pairs(same, pairs)
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(out["teacher"], out["swiftkv"]))


def test_task_scores_from_given_loglikelihoods(monkeypatch, models):
    """The runner's scoring over a stub whose log-likelihoods are given: known answers."""
    _, student, tok, _ = models
    items = [MCItem("a", ["Q:"] * 2, [" yes", " no"], gold=0), MCItem("b", ["Q:"] * 2, [" yes", " no"], gold=1)]
    monkeypatch.setattr(runner, "load_task", lambda name: items)
    given = {"teacher": [-1.0, -2.0, -1.0, -2.0], "swiftkv": [-1.0, -2.0, -3.0, -2.0]}
    monkeypatch.setattr(runner, "score_pairs", lambda m, pairs, *a, **k: {
        mode: [Scored(torch.tensor([v]), torch.tensor([True])) for v in vals] for mode, vals in given.items()})
    n, chance, scores = runner._task_scores(student, tok, "boolq", runner.EvalConfig(limit=0))
    assert n == 2 and chance == 0.5 and scores == {"teacher": [1.0, 0.0], "swiftkv": [1.0, 1.0]}


def test_chance_levels_and_clearly_above():
    mc = MCItem("a", ["Q:"] * 4, [" a", " b", " c", " d"], gold=0)
    mc2 = MCItem("b", ["Q:"] * 5, [" a", " b", " c", " d", " e"], gold=0, labels=[1, 1, 0, 0, 0])
    assert chance_score(mc, "acc") == chance_score(mc, "acc_norm") == 0.25
    assert chance_score(mc2, "mc2") == 0.4
    assert chance_score(GenItem("g", "2+2=", "4"), "exact_match") == 0.0
    # 60% right over 400 items: SE 2.4 points, so clearly above 50% but not above 56%
    scores = [1.0] * 240 + [0.0] * 160
    assert clearly_above(scores, 0.5) and not clearly_above(scores, 0.56)
    assert not clearly_above([1.0], 0.0)  # one item says nothing


def test_judge_averages_only_tasks_where_the_teacher_is_above_chance(monkeypatch, models, tmp_path):
    """Given per-item scores: the judge row is the average over the above-chance tasks, its interval
    the paired bootstrap of those tasks; the plain average keeps every task."""
    _, student, _, src = models
    per_task = {"arc_easy": ([1.0] * 80 + [0.0] * 20, [1.0] * 78 + [0.0] * 22, 0.25),  # clearly above chance
                "boolq": ([1.0] * 50 + [0.0] * 50, [1.0] * 40 + [0.0] * 60, 0.5)}  # at chance: left out
    monkeypatch.setattr(runner, "_task_scores", lambda m, t, task, cfg: (
        100, per_task[task][2], {"teacher": per_task[task][0], "swiftkv": per_task[task][1]}))
    monkeypatch.setattr(runner, "_extra_checks", lambda *a: {})
    ckpt = save_checkpoint(student, tmp_path / "skv", source_dir=src)
    result = runner.run_eval(runner.EvalConfig(model=str(ckpt), tasks=["arc_easy", "boolq"], dtype="float32"))
    assert [r["teacher_above_chance"] for r in result["tasks"]] == [True, False]
    judge, avg = result["judge"], result["average"]
    assert judge["tasks"] == ["arc_easy"] and judge["diff"] == pytest.approx(-0.02)
    assert avg["diff"] == pytest.approx((-0.02 - 0.10) / 2)
    lo, hi = paired_bootstrap([(np.array(per_task["arc_easy"][0]), np.array(per_task["arc_easy"][1]))], 1000, 0)
    assert judge["ci95"] == [lo, hi]
    assert "judge" in runner.format_table({**result, "wall_time_s": 1.0})


def test_budgets():
    quick, judge = runner.EvalConfig.from_budget("quick"), runner.EvalConfig.from_budget("judge")
    assert quick.limit_for("hellaswag") == 100 and quick.limit_for("arc_easy") == 100
    assert judge.limit_for("hellaswag") == 2000 and judge.limit_for("arc_easy") == 0 and judge.budget == "judge"
    mine = runner.EvalConfig.from_budget("judge", limit=50)  # an explicit --limit: every task
    assert mine.limit_for("hellaswag") == 50 and mine.gsm8k_limit == 200
    with pytest.raises(ValueError, match="unknown budget"):
        runner.EvalConfig.from_budget("huge")
    with pytest.raises(ValueError, match="task limit"):
        runner.EvalConfig(task_limits={"hellaswag": -1})


def test_eval_end_to_end_writes_table_json_and_png(models, tmp_path):
    _, student, _, src = models
    ckpt = save_checkpoint(student, tmp_path / "skv", source_dir=src)
    chats = tmp_path / "chats.jsonl"
    words = "alpha beta gamma delta river stone cloud".split()
    chats.write_text("\n".join(json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": " ".join(words[i % 7 :] + words[: i % 5])},
        {"role": "assistant", "content": " ".join(words[i % 3 :])}]}) for i in range(600)))
    cfg = runner.EvalConfig(model=str(ckpt), tasks=["arc_easy", "truthfulqa_mc2", "gsm8k"], limit=4, gsm8k_limit=2,
                            lambada_limit=3, chat_prompts=2, dtype="float32", data=str(chats))
    result = runner.run_eval(cfg, tmp_path / "out")
    table = runner.format_table(result)
    for part in ("arc_easy", "average", "LAMBADA", "instructions", "held-out chats", "greedy chat answers"):
        assert part in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["n"] for r in saved["tasks"]] == [4, 4, 2]
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    for r in saved["tasks"]:
        assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]
    with pytest.raises(ValueError, match="unknown task"):
        runner.EvalConfig(tasks=["nope"])
    with pytest.raises(ValueError, match="not a SwiftKV model"):
        runner.run_eval(runner.EvalConfig(model=str(src), tasks=[]))


def test_lm_eval_harness_runs_a_swiftkv_checkpoint(models, tmp_path):
    """lm-evaluation-harness loads the checkpoint through transformers' Auto classes (registered by
    ``import swiftkv``) and its log-likelihoods equal ours, on a local task file (no hub)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    _, student, tok, src = models
    ckpt = save_checkpoint(student, tmp_path / "skv", source_dir=src)
    docs = [{"question": "The sky is", "choices": ["blue", "green"], "label": 0},
            {"question": "Two plus two is", "choices": ["four", "five", "six"], "label": 0}]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: swiftkv_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tasks' / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={ckpt},dtype=float32,device=cpu", tasks=["swiftkv_tiny"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True,
                                  batch_size=1)
    assert 0.0 <= res["results"]["swiftkv_tiny"]["acc,none"] <= 1.0
    samples = sorted(res["samples"]["swiftkv_tiny"], key=lambda s: s["doc_id"])
    ours = score_pairs(student, [encode_pair(tok, d["question"], " " + c) for d in docs for c in d["choices"]])
    theirs = [r[0][0] for s in samples for r in s["resps"]]
    np.testing.assert_allclose(theirs, [s.sum for s in ours["swiftkv"]], atol=1e-3)
