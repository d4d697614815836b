"""K/V initialisation of the SwiftKV projections: least-squares fit (G = 1) and the AcrossKV shared K/V (G > 1)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import random_chats, tiny_config

from swiftkv.config import SwiftKVConfig
from swiftkv.data.conversations import load_conversations
from swiftkv.data.rows import Batch, pack_rows
from swiftkv.distill.init import _shared_keys, _shared_value_target, fit_kv_projections
from swiftkv.distill.loss import DistillModule
from swiftkv.layers.rotary import RotaryEmbedding, apply_rotary
from swiftkv.models.loader import load_model, load_tokenizer
from swiftkv.transform import to_swiftkv


@pytest.fixture(scope="module")
def setup(tiny_chat_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in random_chats(40, seed=2)))
    tok, convs = load_tokenizer(tiny_chat_model_dir), load_conversations(str(data))
    return (tiny_chat_model_dir, pack_rows(tok, convs, 64, None, 0, held_out=False, fraction=0.2),
            pack_rows(tok, convs, 64, None, 0, held_out=True, fraction=0.2))


def _student(path, l, G):
    base = load_model(path)[0]
    return to_swiftkv(base, SwiftKVConfig(base.config.num_hidden_layers, l, G))


@pytest.mark.parametrize("G", [1, 2])
def test_least_squares_kv_init_fits_better_than_mean_init(setup, G):
    """The fitted K/V projections predict the teacher's K/V (G > 1: the shared K/V) better than the
    reference's mean-of-weights init and lower the KL; only the leaders' k/v_proj_swiftkv change,
    plus, at G > 1, the members' q_proj_swiftkv (rotated to read the shared K)."""
    path, rows, eval_rows = setup
    student = _student(path, l=2, G=G)
    before = {n: p.clone() for n, p in student.named_parameters()}
    calib = Batch.from_rows(rows[:8])
    mean_res = fit_kv_projections(_student(path, l=2, G=G), calib, ridge=1e12)  # ~zero weights: residual ~1
    res = fit_kv_projections(student, calib)
    leaders = student.swiftkv_config.group_leaders
    assert set(res) == {f"model.layers.{i}.self_attn.{k}_swiftkv" for i in leaders for k in ("k_proj", "v_proj")}
    assert all(r < 0.9 for r in res.values())
    assert all(v > 0.99 for k, v in mean_res.items() if G == 1 or "v_proj" in k)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    members = range(2, student.config.num_hidden_layers) if G > 1 else []  # queries rotate to the shared K
    queries = {f"model.layers.{i}.self_attn.q_proj_swiftkv.weight" for i in members}
    assert changed == {f"{k}.weight" for k in res} | queries
    module = DistillModule(student, temperature=1.0)
    mean_init = DistillModule(_student(path, l=2, G=G), temperature=1.0)
    batch = Batch.from_rows(eval_rows)
    with torch.no_grad():
        assert module(batch)["kl"] < mean_init(batch)["kl"]


def _attn(H=4, Hkv=2, D=16, d=32, seed=0):
    torch.manual_seed(seed)
    return SimpleNamespace(num_heads=H, num_kv_heads=Hkv, head_dim=D, q_proj_swiftkv=torch.nn.Linear(d, H * D),
                           o_proj=torch.nn.Linear(H * D, d, bias=False))


def _pair_scaled(k: torch.Tensor, c: torch.Tensor, D: int) -> torch.Tensor:
    """Multiply each head's RoPE pair (f, f + D/2) of k [N, Hkv*D] by the complex c [Hkv, D/2]."""
    k = k.view(k.shape[0], -1, 2, D // 2)
    z = torch.complex(k[:, :, 0], k[:, :, 1]) * c
    return torch.stack([z.real, z.imag], 2).flatten(1)


def test_shared_keys_keep_each_members_rotary_attention_scores():
    """Two layers whose keys differ by a complex scale per RoPE frequency pair (a rotation within
    the pair and a gain: what RoPE lets the queries absorb) share one key without changing either
    layer's attention scores at any positions; the group-mean key (the reference) changes them."""
    H, Hkv, D, d, N = 4, 2, 16, 32, 256
    layers = [_attn(seed=1), _attn(seed=2)]
    torch.manual_seed(0)
    x, xq = torch.randn(N, d), torch.randn(8, d)
    k_a = x @ torch.randn(d, Hkv * D)
    k_b = _pair_scaled(k_a, torch.randn(Hkv, D // 2, dtype=torch.complex64), D)
    q_before = [a.q_proj_swiftkv(xq).detach() for a in layers]
    queries = [a.q_proj_swiftkv(x).detach() for a in layers]
    w, residual = _shared_keys(x, layers, [k_a, k_b], queries, ridge=1e-9)
    assert residual < 1e-3
    rope = RotaryEmbedding(tiny_config(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv))
    cos_q, sin_q = rope(torch.arange(100, 108), torch.float32)
    cos_k, sin_k = rope(torch.arange(N), torch.float32)

    def scores(q, k):  # [8, H*D], [N, Hkv*D] -> [H, 8, N]
        q = apply_rotary(q.view(8, H, D), cos_q, sin_q)
        k = apply_rotary(k.view(N, Hkv, D), cos_k, sin_k).repeat_interleave(H // Hkv, 1)
        return torch.einsum("qhd,khd->hqk", q, k)

    shared = x @ w
    for attn, q, k in zip(layers, q_before, (k_a, k_b)):
        want = scores(q, k)
        got = scores(attn.q_proj_swiftkv(xq).detach(), shared)
        assert torch.allclose(got, want, atol=1e-3 * want.abs().max()), (got - want).abs().max()
        assert not torch.allclose(scores(q, (k_a + k_b) / 2), want, atol=0.1 * want.abs().max())


def test_shared_value_target_weights_each_member_by_what_its_output_projection_sees():
    layers = [_attn(seed=1), _attn(seed=2)]
    torch.manual_seed(0)
    v_a, v_b = torch.randn(10, 32), torch.randn(10, 32)
    with torch.no_grad():
        layers[1].o_proj.weight.copy_(layers[0].o_proj.weight)
    assert torch.allclose(_shared_value_target([v_a, v_b], layers), (v_a + v_b) / 2, atol=1e-4)
    with torch.no_grad():  # a member whose o_proj ignores KV head 1 defers to the other there
        layers[1].o_proj.weight.view(32, 2, 2, 16)[:, 1] = 0
    y = _shared_value_target([v_a, v_b], layers).view(10, 2, 16)
    assert torch.allclose(y[:, 1], v_a.view(10, 2, 16)[:, 1], atol=1e-4)
    assert torch.allclose(y[:, 0], ((v_a + v_b) / 2).view(10, 2, 16)[:, 0], atol=1e-4)
