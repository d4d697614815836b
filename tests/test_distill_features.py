"""Cached frozen-model features (swiftkv.distill.features): the cached loss is the uncached loss,
training and resuming with the cache continue exactly, a killed build resumes, wrong caches are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_chats

from swiftkv.config import SwiftKVConfig
from swiftkv.data.conversations import load_conversations
from swiftkv.data.rows import Batch, pack_rows, training_rows
from swiftkv.distill.features import FeatureCache
from swiftkv.distill.loss import DistillModule, trainable_parameters
from swiftkv.distill.trainer import DistillConfig, Trainer
from swiftkv.models.loader import load_model, load_tokenizer
from swiftkv.transform import to_swiftkv


@pytest.fixture(scope="module")
def setup(tiny_chat_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in random_chats(60, seed=1)))
    tok = load_tokenizer(tiny_chat_model_dir)
    convs = load_conversations(str(data))
    rows = training_rows(tok, convs, 64, 4000, 0, fraction=0.2)  # > the split: a second epoch, repacked
    eval_rows = pack_rows(tok, convs, 64, None, 0, held_out=True, fraction=0.2)
    return tiny_chat_model_dir, tok, rows, eval_rows


def _student(path, l=3, G=1):
    base = load_model(path)[0]
    return to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, l, G))


def _trainable(model):
    model.requires_grad_(False)
    params = trainable_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    return params


def _cfg(out, **kw):
    base = {"out": str(out), "seq_len": 64, "batch_size": 4, "lr": 1e-2, "eval_every": 1000, "save_every": 1000,
            "bf16": False}
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("l,G", [(3, 1), (2, 2)])
def test_cached_loss_and_gradients_equal_the_uncached_ones(setup, tmp_path, l, G):
    path, _, rows, _ = setup
    model = _student(path, l, G)
    params = _trainable(model)
    cache = FeatureCache(tmp_path / "f", model, rows)
    cache.build(model, batch_tokens=100, progress=False)  # other chunks than the step's rows: still exact
    module = DistillModule(model, temperature=2.0)
    step_rows = rows[5:9]
    results = []
    for batch in (Batch.from_rows(step_rows), cache.batch(step_rows)):
        model.zero_grad(set_to_none=True)
        out = module(batch, 1.0 / batch.num_loss_tokens)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in params.items()}))
    (plain, g_plain), (cached, g_cached) = results
    assert cached["kl"] > 1e-3  # a real gap, not a trivially equal zero
    torch.testing.assert_close(cached["kl"], plain["kl"], rtol=1e-5, atol=1e-6)
    assert float(cached["agree"]) == float(plain["agree"])
    for n in g_plain:
        torch.testing.assert_close(g_cached[n], g_plain[n], rtol=1e-4, atol=1e-6)


def test_cache_keeps_each_distinct_conversation_once(setup, tmp_path):
    path, _, rows, _ = setup
    cache = FeatureCache(tmp_path / "f", _student(path), rows)
    in_rows = [d for r in rows for d in r.docs]
    assert len(cache.docs) < len(in_rows)  # the second epoch repeats the first's conversations
    assert cache.meta["num_tokens"] == sum(len(ids) for ids, _ in cache.docs)
    assert cache.disk_bytes == 4 * cache.hidden * (cache.meta["num_tokens"] + cache.meta["num_loss_tokens"])


def test_killed_build_resumes_to_the_same_files(setup, tmp_path):
    path, _, rows, _ = setup
    model = _student(path)
    whole = FeatureCache(tmp_path / "whole", model, rows)
    whole.build(model, batch_tokens=128, progress=False)
    part = FeatureCache(tmp_path / "part", model, rows)
    part.build(model, batch_tokens=128, progress=False, max_conversations=7)  # "killed" after 7 conversations
    assert part.docs_done() >= 7 and not part.complete
    with pytest.raises(ValueError, match="incomplete"):
        part.batch(rows[:2])
    again = FeatureCache(tmp_path / "part", model, rows)  # a new process
    again.build(model, batch_tokens=128, progress=False)
    assert again.complete
    for name in ("h_l.f32", "teacher.f32"):
        a, b = (np.fromfile(d / name, np.float32) for d in (tmp_path / "whole", tmp_path / "part"))
        # the same values up to float rounding: the resumed build batches conversations differently, and a GEMM's
        # rounding may depend on its row count (it does with oneDNN's AVX-512 kernels)
        assert a.size == b.size > 0 and np.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_cached_run_resumes_exactly_and_tracks_the_uncached_run(setup, tmp_path):
    path, tok, rows, eval_rows = setup
    shared = tmp_path / "features"  # one cache serves several runs of one model, l and data

    def trainer(out, cache=True):
        return Trainer(_student(path), tok, _cfg(tmp_path / out, feature_cache=str(shared) if cache else None),
                       rows, eval_rows)

    full = trainer("a")
    full.train(progress=False)
    assert full.step == full.total_steps >= 6 and full.features.complete
    first = trainer("b")
    first.features.build(first.model, progress=False)
    for _ in range(3):
        first.train_step()
    first.save()
    del first  # "killed" after its checkpoint
    resumed = trainer("b")
    assert resumed.resume() and resumed.step == 3
    resumed.train(progress=False)
    for n, p in full.params.items():
        assert torch.equal(p, resumed.params[n]), n
    plain = trainer("c", cache=False)
    plain.train(progress=False)
    for n, p in full.params.items():
        torch.testing.assert_close(p, plain.params[n], rtol=1e-3, atol=1e-4)
    assert full.log[-1]["eval_kl"] < 0.9 * full.log[0]["eval_kl"]


def test_wrong_caches_and_settings_are_refused(setup, tmp_path):
    path, tok, rows, eval_rows = setup
    model = _student(path, l=3)
    FeatureCache(tmp_path / "f", model, rows).build(model, progress=False, max_conversations=2)
    other_l = _student(path, l=2)
    with pytest.raises(ValueError, match=r"differs in: l\)"):
        FeatureCache(tmp_path / "f", other_l, rows).build(other_l, progress=False)
    with pytest.raises(ValueError, match="differs in: conversations"):
        FeatureCache(tmp_path / "f", model, rows[:3]).build(model, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # another teacher
    with pytest.raises(ValueError, match=r"differs in: frozen_weights\)"):
        FeatureCache(tmp_path / "f", model, rows).build(model, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a feature cache"):
        FeatureCache(tmp_path / "notes", model, rows).build(model, progress=False)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="mse-weight"):
        Trainer(_student(path), tok, _cfg(tmp_path / "r", feature_cache=str(tmp_path / "g"), mse_weight=1.0),
                rows, eval_rows)
