"""Least-squares initialisation of the SingleInputKV projections (an alternative to copying).

The reference initialises a group leader's ``k/v_proj_swiftkv`` as the mean of its AcrossKV
group's original ``k/v_proj`` weights. Those weights act on each layer's *own* input, so the
copy is only approximate at G=1, and averaging the weights of different layers (G>1) mixes
unrelated bases. Here each leader's projection is instead fitted by ridge regression: from the
SwiftKV input ``norm_swiftkv(h_l)`` to the mean over its group of the K and V (before RoPE,
which is linear and applied afterwards) that the teacher computes, on calibration tokens.

AcrossKV (G > 1) shares one K and one V between layers whose attention bases differ, so a fit to
the group's mean K is poor (and halves the scores). Instead:

* **K**: for each KV head and RoPE frequency pair (dims ``f``, ``f + D/2``, one complex number), the
  shared key is the top complex principal component of the group's fitted keys, each weighted by
  the root mean square of the queries that read it; each member's ``q_proj_swiftkv`` rows of that
  pair are then multiplied by the conjugate of its reconstruction coefficient. A complex scalar per
  frequency pair commutes with RoPE, so ``q . k`` is preserved up to the shared key's error.
* **V**: the shared value minimises ``sum_j ||o_proj_j (v - v_j)||^2`` per KV head (the error each
  member's output projection sees), not the plain mean.
"""

from __future__ import annotations

import torch

from swiftkv.data.conversations import load_conversations
from swiftkv.data.rows import Batch, pack_rows
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.paired import paired_forward


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """W minimising ||x W - y||^2 + ridge * mean(diag(x^T x)) * ||W||^2; x [N, d], y [N, k]."""
    xtx = x.T @ x
    reg = ridge * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(xtx + reg, x.T @ y)  # [d, k]


@torch.no_grad()
def fit_kv_projections(model: LlamaForCausalLM, batch: Batch, ridge: float = 1e-3) -> dict[str, float]:
    """Fit every group leader's ``k/v_proj_swiftkv`` (weights and biases) in place.

    Returns the relative residual (||xW - y|| / ||y||) per fitted tensor, for the log (at G > 1,
    K's is that of each member's key rebuilt from the shared one, averaged over the group).
    """
    skv = model.swiftkv_config
    L, l = skv.num_layers, skv.num_key_value_layers
    batch = batch.to(model.compute_device)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i in range(l, L):
        attn = model.model.layers[i].self_attn
        for name in ("q_proj", "k_proj", "v_proj") if skv.key_value_group_size > 1 else ("k_proj", "v_proj"):
            hooks.append(getattr(attn, name).register_forward_hook(
                lambda _m, _inp, out, key=(i, name): captured.__setitem__(key, out.float())))
    try:
        h_l = paired_forward(model, batch.input_ids, batch.positions, batch.seq_lens, swiftkv=False).h_l
    finally:
        for hook in hooks:
            hook.remove()
    x = model.model.norm_swiftkv(h_l).float()
    has_bias = model.model.layers[l].self_attn.k_proj.bias is not None
    if has_bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    residuals = {}
    for leader in skv.group_leaders:
        group = list(range(leader, leader + skv.key_value_group_size))
        prefix, fits = f"model.layers.{leader}.self_attn", {}
        if len(group) == 1:  # ridge targets: the layer's own K and V
            targets = {name: captured[(leader, name)] for name in ("k_proj", "v_proj")}
        else:  # the shared K is built from the members' fits; V gets a ridge target
            layers = [model.model.layers[j].self_attn for j in group]
            fits["k_proj"], residuals[f"{prefix}.k_proj_swiftkv"] = _shared_keys(
                x, layers, [captured[(j, "k_proj")] for j in group], [captured[(j, "q_proj")] for j in group], ridge)
            targets = {"v_proj": _shared_value_target([captured[(j, "v_proj")] for j in group], layers)}
        for name, y in targets.items():
            fits[name] = _ridge(x, y, ridge)
            residuals[f"{prefix}.{name}_swiftkv"] = float((x @ fits[name] - y).norm() / y.norm())
        for name, w in fits.items():
            dst = getattr(model.model.layers[leader].self_attn, f"{name}_swiftkv")
            dst.weight.copy_(w[: dst.in_features].T)
            if has_bias:
                dst.bias.copy_(w[dst.in_features])
    return residuals


def _as_complex(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[..., heads*D] real -> [..., heads, D/2] complex: RoPE's pairs (f, f + D/2) as one number."""
    w = w.reshape(*w.shape[:-1], heads, head_dim)
    return torch.complex(w[..., : head_dim // 2], w[..., head_dim // 2 :])


def _shared_keys(x, layers, keys: list[torch.Tensor], queries: list[torch.Tensor], ridge: float):
    """Shared K projection of one AcrossKV group (module docstring); rotates and scales each member's
    ``q_proj_swiftkv`` in place. Returns (W [d, Hkv*D], mean relative residual of the members' keys)."""
    H, Hkv, D = layers[0].num_heads, layers[0].num_kv_heads, layers[0].head_dim
    xc = x.to(torch.complex64)
    w_c = [_as_complex(w, Hkv, D) for w in _ridge(x, torch.cat(keys, 1), ridge).split(Hkv * D, 1)]  # [d, Hkv, D/2]
    fitted = [xc @ w.flatten(1) for w in w_c]  # per member [N, Hkv*D/2]
    # RMS of the queries reading each (KV head, pair): mean |q|^2 over the tokens and the head's query group
    q_rms = [_as_complex(q, H, D).abs().pow(2).mean(0).view(Hkv, H // Hkv, D // 2).mean(1).sqrt().flatten()
             for q in queries]  # per member [Hkv*D/2]
    z = torch.stack([r * f for r, f in zip(q_rms, fitted)], -1)  # [N, Hkv*D/2, G]
    cov = torch.einsum("npg,nph->pgh", z, z.conj()) / z.shape[0]  # [Hkv*D/2, G, G], Hermitian
    u = torch.linalg.eigh(cov).eigenvectors[..., -1]  # top component per (head, pair): [Hkv*D/2, G]
    shared = sum(u[:, g].conj() * q_rms[g] * w.flatten(1) for g, w in enumerate(w_c))  # [d, Hkv*D/2]
    shared_keys = xc @ shared  # [N, Hkv*D/2]
    residual = 0.0
    for g, attn in enumerate(layers):
        lam = u[:, g] / q_rms[g].clamp_min(1e-12)  # member key ~ lam * shared key
        residual += float((lam * shared_keys - fitted[g]).norm() / fitted[g].norm()) / len(layers)
        _scale_query_pairs(attn.q_proj_swiftkv, lam.conj().view(Hkv, D // 2), H // Hkv)
    w = shared.view(-1, Hkv, D // 2)
    return torch.cat([w.real, w.imag], -1).reshape(-1, Hkv * D), residual


def _scale_query_pairs(q_proj, c: torch.Tensor, group: int) -> None:
    """Multiply each query head's RoPE pair (f, f + D/2) by the complex ``c[kv_head, f]`` (rows of
    weight and bias): q . k with k' = k / conj(c) is unchanged, and it commutes with RoPE."""
    for p in (q_proj.weight, q_proj.bias):
        if p is None:
            continue
        half = c.shape[1]
        v = p.data.view(c.shape[0], group, 2, half, -1)  # [Hkv, r, re/im, D/2, in or 1]
        cr, ci = c.real[:, None, :, None], c.imag[:, None, :, None]
        re, im = v[:, :, 0].clone(), v[:, :, 1].clone()
        v[:, :, 0] = cr * re - ci * im
        v[:, :, 1] = ci * re + cr * im


def _shared_value_target(values: list[torch.Tensor], layers) -> torch.Tensor:
    """Per token, the V minimising sum_j ||o_proj_j (v - v_j)||^2 per KV head: [N, Hkv*D]."""
    H, Hkv, D = layers[0].num_heads, layers[0].num_kv_heads, layers[0].head_dim
    n = values[0].shape[0]
    gram = []  # per member [Hkv, D, D]: o_proj restricted to the head's query group, O^T O
    for attn in layers:
        o = attn.o_proj.weight.float().view(-1, Hkv, H // Hkv, D)  # [hidden, Hkv, r, D]
        gram.append(torch.einsum("ahrd,ahre->hde", o, o))
    rhs = sum(torch.einsum("hde,nhe->nhd", m, v.view(n, Hkv, D)) for m, v in zip(gram, values))
    total = sum(gram)  # + a tiny ridge: a head that no member's o_proj reads stays solvable
    total = total + 1e-6 * total.diagonal(dim1=1, dim2=2).mean() * torch.eye(D, device=total.device)
    return torch.linalg.solve(total[None], rhs.unsqueeze(-1)).squeeze(-1).reshape(n, Hkv * D)


def calibration_batch(tokenizer, cfg, num_tokens: int = 8192) -> Batch:
    """Calibration tokens from the training split (never the held-out one); seed ``cfg.seed + 1``
    so they are not simply the first training batch."""
    convs = load_conversations(cfg.data)
    rows = pack_rows(tokenizer, convs, cfg.seq_len, num_tokens, cfg.seed + 1, held_out=False,
                     fraction=cfg.held_out_fraction)
    if not rows:
        raise ValueError("no training conversations for the least-squares K/V init; use --kv-init mean")
    return Batch.from_rows(rows)
