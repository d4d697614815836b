"""Least-squares initialisation of the SingleInputKV projections (an alternative to copying).

The reference initialises a group leader's ``k/v_proj_swiftkv`` as the mean of its AcrossKV
group's original ``k/v_proj`` weights. Those weights act on each layer's *own* input, so the
copy is only approximate at G=1, and averaging the weights of different layers (G>1) mixes
unrelated bases. Here each leader's projection is instead fitted by ridge regression: from the
SwiftKV input ``norm_swiftkv(h_l)`` to the mean over its group of the K and V (before RoPE,
which is linear and applied afterwards) that the teacher computes, on calibration tokens.
"""

from __future__ import annotations

import torch

from swiftkv.distill.data import Batch, load_conversations, pack_rows
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

    Returns the relative residual (||xW - y|| / ||y||) per fitted tensor, for the log.
    """
    skv = model.swiftkv_config
    L, l = skv.num_layers, skv.num_key_value_layers
    batch = batch.to(model.model.embed_tokens.weight.device)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i in range(l, L):
        attn = model.model.layers[i].self_attn
        for name in ("k_proj", "v_proj"):
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
        group = range(leader, leader + skv.key_value_group_size)
        attn = model.model.layers[leader].self_attn
        for name in ("k_proj", "v_proj"):
            y = torch.stack([captured[(j, name)] for j in group]).mean(0)  # [N, Hkv*D]
            w = _ridge(x, y, ridge)
            dst = getattr(attn, f"{name}_swiftkv")
            dst.weight.copy_(w[: dst.in_features].T)
            if has_bias:
                dst.bias.copy_(w[dst.in_features])
            residuals[f"model.layers.{leader}.self_attn.{name}_swiftkv"] = float((x @ w - y).norm() / y.norm())
    return residuals


def calibration_batch(tokenizer, cfg, num_tokens: int = 8192) -> Batch:
    """Calibration tokens from the training split (never the held-out one); seed ``cfg.seed + 1``
    so they are not simply the first training batch."""
    convs = load_conversations(cfg.data)
    rows = pack_rows(tokenizer, convs, cfg.seq_len, num_tokens, cfg.seed + 1, held_out=False,
                     fraction=cfg.held_out_fraction)
    if not rows:
        raise ValueError("no training conversations for the least-squares K/V init; use --kv-init mean")
    return Batch.from_rows(rows)
