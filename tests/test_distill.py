"""Distillation: data masks, trainable tensors, loss floor, learning, resume, torchrun DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_chats

from swiftkv.config import SwiftKVConfig
from swiftkv.data.conversations import is_held_out, iter_json_array, load_conversations
from swiftkv.data.rows import (
    Batch,
    held_out_rows,
    pack_rows,
    tokenize_with_mask,
    training_rows,
)
from swiftkv.distill.loss import DistillModule, trainable_parameters
from swiftkv.distill.trainer import DistillConfig, Trainer
from swiftkv.models.full_sequence import full_logits
from swiftkv.models.loader import load_model, load_tokenizer
from swiftkv.transform import to_swiftkv


@pytest.fixture(scope="module")
def setup(tiny_chat_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in random_chats(80)))
    tok = load_tokenizer(tiny_chat_model_dir)
    convs = load_conversations(str(data))
    rows = pack_rows(tok, convs, 64, None, 0, held_out=False, fraction=0.2)
    eval_rows = pack_rows(tok, convs, 64, None, 0, held_out=True, fraction=0.2)
    return tiny_chat_model_dir, data, tok, rows, eval_rows


def _student(path, l=3, G=1):
    base = load_model(path)[0]
    return to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, l, G))


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), seq_len=64, batch_size=4, lr=1e-2, eval_every=1000, save_every=1000,
                bf16=False)
    return DistillConfig(**{**base, **kw})


def test_assistant_mask_on_hand_made_conversation(setup):
    _, _, tok, _, _ = setup
    msgs = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Six, if doubled."}]
    ids, mask = tokenize_with_mask(tok, msgs, 10_000)
    masked = tok.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "Four.<|im_end|>\nSix, if doubled.<|im_end|>\n"
    assert tok.decode(ids[: mask.index(True)]).endswith("<|im_start|>assistant\n")


def test_truncated_json_array_is_parsed_item_by_item(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('[\n {"id": "a", "x": 1},\n {"id": "b", "x": [2, 3]},\n {"id": "c", "x": "broken')
    assert [i["id"] for i in iter_json_array(f)] == ["a", "b"]


def test_trainer_log_and_eval_score_the_same_held_out_rows(setup, tmp_path):
    """The trainer's eval_agree and ``swiftkv eval``'s held-out figures are one metric: the same rows
    whatever the training seed, from the whole data or from its held-out part only."""
    path, data, tok, _, _ = setup
    convs = load_conversations(str(data))

    def docs(rows):
        return [[tuple(ids) for ids, _ in r.docs] for r in rows]

    expect = docs(held_out_rows(tok, [c for c in convs if is_held_out(c[0], 0.2)], 64, 3, fraction=0.2))
    assert len(expect) == 3 and expect == docs(held_out_rows(tok, convs, 64, 3, fraction=0.2))
    for seed in (0, 7):
        cfg = _cfg(tmp_path, out=str(tmp_path / f"s{seed}"), data=str(data), seed=seed, max_tokens=2000,
                   eval_rows=3, held_out_fraction=0.2)
        assert docs(Trainer(_student(path), tok, cfg).eval_rows) == expect


def test_held_out_split_is_disjoint(setup):
    _, _, _, rows, eval_rows = setup
    train = {tuple(d[0]) for r in rows for d in r.docs}
    held = {tuple(d[0]) for r in eval_rows for d in r.docs}
    assert held and train and not train & held
    assert all(r.num_tokens <= 64 for r in rows)


def test_only_swiftkv_tensors_change(setup, tmp_path):
    path, _, tok, rows, eval_rows = setup
    model = _student(path, l=2, G=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, tok, _cfg(tmp_path), rows, eval_rows)
    assert set(trainer.params) == {n for n in before if "_swiftkv" in n}
    assert "model.layers.3.self_attn.k_proj_swiftkv.weight" not in trainer.params  # AcrossKV follower has none
    trainer.train_step()
    for n, p in model.named_parameters():
        if n in trainer.params:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_loss_is_zero_when_l_equals_L_and_gradients_flow(setup):
    path, _, _, rows, _ = setup
    batch = Batch.from_rows(rows[:2])
    base = load_model(path)[0]
    out = DistillModule(to_swiftkv(base, SwiftKVConfig(6, 6, 1)))(batch, 1.0 / batch.num_loss_tokens)
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-6) and float(out["agree"]) == pytest.approx(1.0)
    model = _student(path, l=2, G=2)
    params = trainable_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    DistillModule(model, mse_weight=1.0)(batch, 1.0)["loss"].backward()
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_training_reduces_held_out_kl(setup, tmp_path):
    path, _, tok, rows, eval_rows = setup
    trainer = Trainer(_student(path, l=2), tok, _cfg(tmp_path), rows, eval_rows)
    start = trainer.evaluate()["eval_kl"]
    for _ in range(min(12, trainer.total_steps)):
        trainer.train_step()
    assert trainer.evaluate()["eval_kl"] < 0.8 * start


def test_resume_reproduces_uninterrupted_run(setup, tmp_path):
    path, _, tok, rows, eval_rows = setup
    full = Trainer(_student(path), tok, _cfg(tmp_path, out=str(tmp_path / "a")), rows, eval_rows)
    for _ in range(4):
        full.train_step()
    first = Trainer(_student(path), tok, _cfg(tmp_path, out=str(tmp_path / "b")), rows, eval_rows)
    for _ in range(2):
        first.train_step()
    first.save()
    del first  # "killed" after its checkpoint
    resumed = Trainer(_student(path), tok, _cfg(tmp_path, out=str(tmp_path / "b")), rows, eval_rows)
    assert resumed.resume() and resumed.step == 2
    for _ in range(2):
        resumed.train_step()
    for n, p in full.params.items():
        assert torch.equal(p, resumed.params[n]), n


def test_resume_refuses_other_settings_and_cleans_stale_temps(setup, tmp_path):
    path, _, tok, rows, eval_rows = setup
    first = Trainer(_student(path), tok, _cfg(tmp_path), rows, eval_rows)
    first.train_step()
    first.save()
    stale = tmp_path / "run" / ".trainer_state.swiftkv-tmp-999999999-0badcafe.pt"  # a kill during torch.save leaves this
    backup = tmp_path / "run" / ".trainer_state.tmp-999999999.pt"  # not a name swiftkv makes: the user's, kept
    backup.write_bytes(b"mine")
    stale.write_bytes(b"")
    with pytest.raises(ValueError, match=r"lr: saved 0.01, now 0.02"):
        Trainer(_student(path), tok, _cfg(tmp_path, lr=2e-2), rows, eval_rows).resume()
    assert not stale.exists() and backup.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="trained tensors differ"):
        Trainer(_student(path, l=2), tok, _cfg(tmp_path), rows, eval_rows).resume()
    same = Trainer(_student(path), tok, _cfg(tmp_path, eval_every=5), rows, eval_rows)  # bookkeeping may change
    assert same.resume() and same.step == 1


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU/gloo tested on Linux")
def test_torchrun_two_gloo_processes_match_single_process(setup, tmp_path):
    path, data, _, _, _ = setup
    args = [str(path), "--data", str(data), "-l", "3", "--max-tokens", "1200", "--seq-len", "64", "--batch-size", "4",
            "--lr", "1e-2", "--dtype", "float32", "--held-out-fraction", "0.2", "--eval-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "swiftkv.cli", "distill", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "swiftkv.cli", "distill", *args, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] > 1
    for n in a["params"]:
        torch.testing.assert_close(a["params"][n], b["params"][n], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "two" / "model" / "config.json").exists()


def test_ablation_report(tmp_path):
    from swiftkv.cli import main

    for name, end in (("a", 0.6), ("b", 0.7)):
        d = tmp_path / name
        d.mkdir()
        log = [{"step": 0, "tokens": 0, "eval_agree": 0.5, "eval_kl": 1.5},
               {"step": 10, "tokens": 20480, "kl": 1.0}, {"step": 20, "tokens": 40960, "eval_agree": end, "eval_kl": 0.9}]
        (d / "log.json").write_text(json.dumps({"config": {}, "log": log}))
    png = tmp_path / "abl.png"
    assert main(["distill-report", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    from swiftkv.distill.report import ablation_table, read_log

    table = ablation_table({"a": read_log(tmp_path / "a"), "b": read_log(tmp_path / "b")}).splitlines()
    assert table[2] == "| a | 40,960 | 50.0% | 60.0% | 1.500 | 0.900 |" and table[3].startswith("| b | 40,960 | 50.0% | 70.0%")


# -- low-rank adapters (off by default) --------------------------------------------------------

def _adapter_model(path, rank=4):
    base = load_model(path)[0]
    return to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, 2, 2), adapter_rank=rank)


def _adapter_seqs(rows):
    return [rows[0].docs[0][0][:20], rows[1].docs[0][0][:13]]


@pytest.fixture
def trained_adapters(setup, tmp_path):
    """A l=2, G=2 student with rank-4 adapters after two training steps, and what it was before."""
    path, _, tok, rows, eval_rows = setup
    model = _adapter_model(path)
    teacher_before = full_logits(model, _adapter_seqs(rows), swiftkv=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, tok, _cfg(tmp_path), rows, eval_rows)
    for _ in range(2):  # A's gradient is zero until B has moved off zero
        trainer.train_step()
    return model, trainer, before, teacher_before


def test_fresh_adapters_are_a_no_op_on_later_layers_only(setup):
    path, _, _, rows, _ = setup
    plain, model = _student(path, l=2, G=2), _adapter_model(path)
    assert not hasattr(plain.config, "swiftkv_adapter_rank") and model.config.swiftkv_adapter_rank == 4
    assert model.model.layers[1].mlp_adapter_swiftkv is None  # only layers >= l get adapters
    for a, b in zip(full_logits(model, _adapter_seqs(rows)), full_logits(plain, _adapter_seqs(rows))):
        assert torch.equal(a, b)  # B = 0: a fresh adapter changes nothing
    with pytest.raises(ValueError, match="adapter_rank"):
        to_swiftkv(load_model(path)[0], SwiftKVConfig(6, 2, 1), adapter_rank=-1)


def test_adapters_train_with_the_swiftkv_tensors_only(trained_adapters):
    model, trainer, before, _ = trained_adapters
    adapters = {n for n in trainer.params if "adapter_swiftkv" in n}
    assert len(adapters) == 4 * (6 - 2) and set(trainer.params) == {n for n in before if "_swiftkv" in n}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainer.params), n


def test_the_teacher_never_sees_the_adapters(setup, trained_adapters):
    model, _, _, teacher_before = trained_adapters
    for a, b in zip(full_logits(model, _adapter_seqs(setup[3]), swiftkv=False), teacher_before):
        assert torch.equal(a, b)


def test_adapters_reload_and_the_fast_path_matches(setup, trained_adapters, tmp_path):
    from swiftkv.layers.attention import AttentionMetadata
    from swiftkv.models.loader import save_checkpoint

    path, rows = setup[0], setup[3]
    model = trained_adapters[0]
    seqs = _adapter_seqs(rows)
    loaded = load_model(save_checkpoint(model, tmp_path / "ckpt", source_dir=path))[0]
    assert loaded.config.swiftkv_adapter_rank == 4  # recorded in config.json
    want = full_logits(model, seqs)
    for a, b in zip(full_logits(loaded, seqs), want):
        torch.testing.assert_close(a, b)
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    with torch.no_grad():  # fast path: later layers only for each sequence's last token
        fast = loaded.compute_logits(loaded(ids, pos, AttentionMetadata.full([len(s) for s in seqs], logits_seq_ids=[0, 1])))
    torch.testing.assert_close(fast, torch.stack([w[-1] for w in want]), atol=1e-4, rtol=1e-4)


def test_training_rows_repeat_the_split_in_new_orders_when_the_budget_exceeds_it(setup):
    _, data, tok, _, _ = setup
    convs = load_conversations(str(data))
    one_epoch = pack_rows(tok, convs, 64, None, 0, held_out=False, fraction=0.2)
    split_tokens = sum(r.num_tokens for r in one_epoch)
    three = training_rows(tok, convs, 64, 3 * split_tokens, 0, fraction=0.2)
    assert sum(r.num_tokens for r in three) >= 3 * split_tokens
    assert [r.docs for r in three[: len(one_epoch)]] == [r.docs for r in one_epoch]  # epoch 1 as before
    second = [d for r in three[len(one_epoch) : 2 * len(one_epoch)] for d in r.docs]
    first = [d for r in one_epoch for d in r.docs]
    assert second != first and sorted(map(str, second[:5])) != sorted(map(str, first[:5]))  # a new order
    assert training_rows(tok, convs, 64, 100, 0, fraction=0.2) == pack_rows(tok, convs, 64, 100, 0, False, 0.2)
    half = split_tokens // 2
    two = training_rows(tok, convs, 64, half, 0, fraction=0.2, epochs=2)  # two passes over a quarter of the split
    distinct = {str(d) for r in two for d in r.docs}
    first_pass = pack_rows(tok, convs, 64, -(-half // 2), 0, False, 0.2)
    assert distinct == {str(d) for r in first_pass for d in r.docs}
    assert sum(r.num_tokens for r in two) >= half
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        training_rows(tok, convs, 64, 100, 0, fraction=0.2, epochs=0)


def test_device_resolution():
    from swiftkv.platforms import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_bf16_run_writes_the_base_weights_unchanged_beside_the_trained_tensors(setup, tmp_path):
    """Training runs the frozen weights in bf16; model/ must still hold the base's exact weights
    (plus the trained SwiftKV tensors), on whatever device the run used."""
    from safetensors.torch import load_file

    from swiftkv.cli import main

    path, data, _, _, _ = setup
    out = tmp_path / "run"
    assert main(["distill", str(path), "--data", str(data), "-l", "3", "--max-tokens", "300", "--seq-len", "64",
                 "--batch-size", "2", "--dtype", "bfloat16", "--device", "cpu", "--held-out-fraction", "0.2",
                 "--kv-init", "mean", "--out", str(out)]) == 0
    base = dict(load_model(path)[0].named_parameters())
    saved = load_model(out / "model")[0]
    trained = load_file(out / "swiftkv_tensors.safetensors")
    for name, p in saved.named_parameters():
        if "_swiftkv" in name:
            assert torch.equal(p.detach().bfloat16(), trained[name])
        else:
            assert torch.equal(p.detach(), base[name].detach()), name


def test_distill_refuses_an_unrelated_non_empty_out(tmp_path):
    from swiftkv.distill.pipeline import check_run_directory

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.json").write_text('{"my": "experiment"}')
    with pytest.raises(ValueError, match="not a swiftkv distill run"):
        check_run_directory(mine)
    check_run_directory(mine, overwrite=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.json").write_text('{"config": {}, "log": []}')  # an earlier run's: restarting it is fine
    check_run_directory(run)
    check_run_directory(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_run_directory(tmp_path / "file")
