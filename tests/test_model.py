"""The model definition against references we did not write (transformers) or wrote plainly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from swiftkv.config import SwiftKVConfig
from swiftkv.layers.attention import AttentionMetadata
from swiftkv.models.full_sequence import full_logits, greedy_generate
from swiftkv.models.loader import load_model, save_checkpoint
from swiftkv.transform import to_swiftkv


def _ours(path, **kw):
    return load_model(path, **kw)[0]


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "mistral"])
def test_teacher_matches_transformers(hf_dir, arch):
    extra = {"sliding_window": None} if arch == "mistral" else {}
    path, hf = hf_dir("llama" if arch == "mistral" else arch, **extra)
    if arch == "mistral":  # save a genuine Mistral config with the same weights
        from transformers import MistralConfig, MistralForCausalLM

        cfg = MistralConfig(**{k: v for k, v in hf.config.to_dict().items() if k not in ("model_type", "architectures")})
        mistral = MistralForCausalLM(cfg).eval()
        mistral.load_state_dict(hf.state_dict())
        mistral.save_pretrained(path)
        hf = mistral
    model = _ours(path)
    seqs = [[3, 17, 99, 4, 5, 6, 7], list(range(40, 71)), [1]]  # mixed lengths, flat layout
    for seq, logits in zip(seqs, full_logits(model, seqs)):
        ref = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_is_used(hf_dir):
    """Positions past original_max_position_embeddings: scaled and unscaled RoPE differ."""
    path, hf = hf_dir("llama3")
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    model = _ours(path)
    seq = list(range(1, 120))
    torch.testing.assert_close(full_logits(model, [seq])[0], hf(torch.tensor([seq])).logits[0], atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32(hf_dir):
    path, _ = hf_dir("llama")
    seq = [[5, 6, 7, 8, 9, 10, 11, 12]]
    a = full_logits(_ours(path), seq)[0]
    b = full_logits(_ours(path, dtype="bfloat16"), seq)[0]
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def _reference_swiftkv_logits(model, seq: list[int]) -> torch.Tensor:
    """Straightforward full-sequence SwiftKV, written from the spec with plain tensor ops."""
    cfg, skv = model.config, model.swiftkv_config
    sd = {k: v.float() for k, v in model.state_dict().items()}
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    T = len(seq)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def lin(x, name):
        b = sd.get(name + ".bias")
        return F.linear(x, sd[name + ".weight"], b)

    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]  # [1, T, D]

    def attention(q, k, v):  # q [H,T,D], k/v [Hkv,T,D]
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        return s.softmax(-1) @ v

    def heads(x, n):  # [T, n*D] -> [n, T, D]
        return x.view(T, n, D).transpose(0, 1)

    h = sd["model.embed_tokens.weight"][seq]
    kv_of_group = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        if i < skv.num_key_value_layers:
            q, k, v = heads(lin(x, p + "self_attn.q_proj"), H), heads(lin(x, p + "self_attn.k_proj"), Hkv), heads(lin(x, p + "self_attn.v_proj"), Hkv)
            q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
            q, k = q[0], k[0]
        else:
            if i == skv.num_key_value_layers:
                h_l = rms(h, sd["model.norm_swiftkv.weight"])
            leader = i - (i - skv.num_key_value_layers) % skv.key_value_group_size
            if leader not in kv_of_group:
                lp = f"model.layers.{leader}.self_attn."
                k, v = heads(lin(h_l, lp + "k_proj_swiftkv"), Hkv), heads(lin(h_l, lp + "v_proj_swiftkv"), Hkv)
                _, k = apply_rotary_pos_emb(k[None], k[None], cos, sin)
                kv_of_group[leader] = (k[0], v)
            k, v = kv_of_group[leader]
            q = heads(lin(x, p + "self_attn.q_proj_swiftkv"), H)
            q, _ = apply_rotary_pos_emb(q[None], q[None], cos, sin)
            q = q[0]
        h = h + lin(attention(q, k, v).transpose(0, 1).reshape(T, H * D), p + "self_attn.o_proj")
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, sd["model.norm.weight"])
    return F.linear(h, sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))


def _perturb_swiftkv(model, seed=1):
    """Make the SwiftKV tensors differ from their initial copies, so the test sees them used."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "swiftkv" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch,L,l,G", [("llama", 6, 3, 1), ("llama", 6, 2, 2), ("llama", 6, 3, 3),
                                         ("llama", 6, 1, 5), ("qwen2", 6, 2, 2), ("qwen2", 6, 4, 1)])
def test_swiftkv_path_matches_reference(hf_dir, arch, L, l, G):
    path, _ = hf_dir(arch, num_hidden_layers=L)
    model = to_swiftkv(_ours(path), SwiftKVConfig(L, l, G))
    _perturb_swiftkv(model)
    seqs = [list(range(3, 20)), [7, 8, 9], list(range(50, 90))]
    for seq, logits in zip(seqs, full_logits(model, seqs)):
        torch.testing.assert_close(logits, _reference_swiftkv_logits(model, seq), atol=1e-4, rtol=1e-4)


def test_swiftkv_differs_from_teacher_and_switch_restores_it(hf_dir):
    path, hf = hf_dir("llama")
    model = to_swiftkv(_ours(path), SwiftKVConfig(6, 3, 1))
    seq = [list(range(10, 30))]
    student = full_logits(model, seq)[0]
    teacher = full_logits(model, seq, swiftkv=False)[0]
    torch.testing.assert_close(teacher, hf(torch.tensor(seq)).logits[0], atol=1e-5, rtol=1e-5)
    assert (student - teacher).abs().max() > 1e-3


def test_l_equals_L_is_exactly_the_teacher(hf_dir):
    path, _ = hf_dir("llama")
    base = _ours(path)
    model = to_swiftkv(base, SwiftKVConfig(6, 6, 1))
    seq = [list(range(5, 25))]
    assert torch.equal(full_logits(model, seq)[0], full_logits(base, seq)[0])


def test_logits_selection_equals_full_last_token(hf_dir):
    """forward(logits_seq_ids=...) keeps only last tokens; values equal the full pass's."""
    path, _ = hf_dir("llama")
    model = to_swiftkv(_ours(path), SwiftKVConfig(6, 2, 2))
    _perturb_swiftkv(model)
    seqs = [list(range(3, 20)), [7, 8, 9], [4]]
    full = full_logits(model, seqs)
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    hidden = model(ids, pos, AttentionMetadata.full([len(s) for s in seqs], logits_seq_ids=[0, 2]))
    got = model.compute_logits(hidden)
    torch.testing.assert_close(got[0], full[0][-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], full[2][-1], atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_transformers(hf_dir):
    path, hf = hf_dir("llama")
    prompt = [5, 9, 33, 2, 71]
    ours = greedy_generate(_ours(path), prompt, 12)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(prompt):]
    assert ours == ref.tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_loaded_for_inference_keeps_the_logits(hf_dir, tmp_path, arch):
    """Loaded for inference (weights held once in their stored form, memory-mapped), the model gives
    transformers' logits, teacher and SwiftKV paths alike, from fp32 and bf16 checkpoints."""
    path, hf = hf_dir(arch)
    skv_dir = save_checkpoint(to_swiftkv(_ours(path), SwiftKVConfig(6, 3, 1)), tmp_path / "skv", source_dir=path)
    seqs = [[3, 17, 99, 4, 5, 6, 7], list(range(40, 71))]
    before = full_logits(_ours(skv_dir), seqs)
    model, skv_model = _ours(path, for_inference=True), _ours(skv_dir, for_inference=True)
    assert model.model.layers[0].self_attn.q_proj.weight is None and model.lm_head.held is not None
    for seq, logits in zip(seqs, full_logits(model, seqs)):
        torch.testing.assert_close(logits, hf(torch.tensor([seq])).logits[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(before, full_logits(skv_model, seqs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    bf16_dir = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(bf16_dir)
    hf.float()
    held = _ours(bf16_dir, for_inference=True)  # fp32 compute on bf16 weights, held as bf16
    assert held.model.layers[0].mlp.up_proj.held.data.dtype == torch.bfloat16
    for seq, logits in zip(seqs, full_logits(held, seqs)):
        torch.testing.assert_close(logits, full_logits(_ours(bf16_dir), [seq])[0], atol=1e-5, rtol=1e-5)
