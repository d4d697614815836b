"""Base model -> SwiftKV model, initialised as the paper and reference code do: in memory
(:func:`to_swiftkv`) or streamed from checkpoint to checkpoint (:func:`convert_checkpoint`).

``q_proj_swiftkv`` = copy of ``q_proj``; a group leader's ``k/v_proj_swiftkv`` = mean of its
AcrossKV group's original ``k_proj``/``v_proj`` (biases too); ``norm_swiftkv`` = copy of layer
``l``'s ``input_layernorm``. Optional low-rank adapters (``adapter_rank > 0``, off by default) start
as a no-op: ``B = 0``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from swiftkv.config import SwiftKVConfig
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.shards import DEFAULT_SHARD_SIZE

_SWIFTKV_FIELDS = ("swiftkv", "num_key_value_layers", "key_value_group_size", "swiftkv_adapter_rank")


def _plain_fields(config) -> dict:
    """The config's fields without its type and SwiftKV settings."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", *_SWIFTKV_FIELDS):
        fields.pop(key, None)
    return fields


def swiftkv_hf_config(base_config, skv: SwiftKVConfig, adapter_rank: int = 0):
    """The published-format config (``llama_swiftkv`` / ``qwen2_swiftkv``) for ``base_config``."""
    from swiftkv.models.hf_config import SWIFTKV_CONFIGS

    base_type = base_config.model_type.removesuffix("_swiftkv")
    fields = _plain_fields(base_config)
    fields.update(swiftkv=True, num_key_value_layers=skv.num_key_value_layers,
                  key_value_group_size=skv.key_value_group_size)
    if adapter_rank:  # recorded so the checkpoint reloads with its adapters; absent = published format
        fields["swiftkv_adapter_rank"] = adapter_rank
    config = SWIFTKV_CONFIGS[base_type](**fields)
    config.architectures = ["Qwen2SwiftKVForCausalLM" if base_type == "qwen2" else "LlamaSwiftKVForCausalLM"]
    return config


def base_hf_config(config):
    """The inverse: the plain ``llama`` / ``qwen2`` config of the original model (what other engines load)."""
    from swiftkv.models.hf_config import SWIFTKV_CONFIGS

    base_type = config.model_type.removesuffix("_swiftkv")
    plain_cls = SWIFTKV_CONFIGS[base_type].__mro__[1]  # LlamaConfig / Qwen2Config
    plain = plain_cls(**_plain_fields(config))
    plain.architectures = ["Qwen2ForCausalLM" if base_type == "qwen2" else "LlamaForCausalLM"]
    return plain


def swiftkv_init_plan(config, skv: SwiftKVConfig) -> dict[str, tuple[str, list[str]]]:
    """The new SwiftKV tensors of a base model with ``config`` (``L`` layers) in layout ``skv``, each as
    ``name -> ("copy" | "mean", source names)``: ``q_proj_swiftkv`` copies ``q_proj``, a group leader's
    ``k/v_proj_swiftkv`` is the mean of its group's ``k/v_proj``, ``norm_swiftkv`` copies layer ``l``'s
    input norm (biases as their weights)."""
    from swiftkv.models.arch import attention_biases

    L, l, g = skv.num_layers, skv.num_key_value_layers, skv.key_value_group_size
    qkv_bias = attention_biases(config)[0]
    parts = ("weight", "bias") if qkv_bias else ("weight",)
    plan: dict[str, tuple[str, list[str]]] = {}
    if l < L:
        plan["model.norm_swiftkv.weight"] = ("copy", [f"model.layers.{l}.input_layernorm.weight"])
    for i in range(l, L):
        attn = f"model.layers.{i}.self_attn"
        for w in parts:
            plan[f"{attn}.q_proj_swiftkv.{w}"] = ("copy", [f"{attn}.q_proj.{w}"])
        if skv.is_group_leader(i):
            for p, w in ((p, w) for p in ("k_proj", "v_proj") for w in parts):
                plan[f"{attn}.{p}_swiftkv.{w}"] = ("mean", [f"model.layers.{j}.self_attn.{p}.{w}" for j in range(i, i + g)])
    return plan


def initial_tensor(op: str, sources: list[torch.Tensor]) -> torch.Tensor:
    """One planned tensor (:func:`swiftkv_init_plan`) from its sources, in their dtype (a mean runs in fp32)."""
    if op == "copy":
        return sources[0].detach().clone()
    return torch.stack([t.detach().float() for t in sources]).mean(0).to(sources[0].dtype)


@torch.no_grad()
def to_swiftkv(base: LlamaForCausalLM, skv: SwiftKVConfig, adapter_rank: int = 0) -> LlamaForCausalLM:
    """Return a SwiftKV model sharing ``base``'s tensors, with initialised SwiftKV projections
    (and, for ``adapter_rank > 0``, zero-output low-rank adapters on the later layers)."""
    if not base.teacher_available:
        raise ValueError("The base model lacks its original q/k/v; convert from a full checkpoint.")
    if skv.num_layers != base.config.num_hidden_layers:
        raise ValueError(f"SwiftKV config is for {skv.num_layers} layers; the model has {base.config.num_hidden_layers}.")
    param = base.model.embed_tokens.weight
    with torch.device("meta"):
        model = LlamaForCausalLM(swiftkv_hf_config(base.config, skv, adapter_rank))
    state = {n: p for n, p in base.named_parameters() if "swiftkv" not in n}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_lm_head()
    new = {name: initial_tensor(op, [state[s] for s in sources]).to(param.device, param.dtype)
           for name, (op, sources) in swiftkv_init_plan(base.config, skv).items()}
    model.load_state_dict(new, strict=False, assign=True)
    for i in range(skv.num_key_value_layers, skv.num_layers):
        layer = model.model.layers[i]
        for adapter in (layer.self_attn.o_adapter_swiftkv, layer.mlp_adapter_swiftkv):
            if adapter is not None:
                adapter.to_empty(device=param.device).to(param.dtype).reset_parameters()
    model.eval().requires_grad_(False)
    return model


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, skv: SwiftKVConfig,
                       dtype: torch.dtype | None = None, overwrite: bool = False,
                       max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Convert the checkpoint directory ``src`` into SwiftKV layout ``skv`` at ``out``, tensor by tensor: the
    base tensors are read one shard's worth at a time (never the whole model) and written, with the new
    SwiftKV tensors, in shards of ``max_shard_size`` (an index when there are several), so peak memory is
    about one shard whatever the model's size. ``dtype`` casts floating tensors (None keeps each as stored).
    Written atomically (:func:`swiftkv.fileio.atomic_directory`), with the user's umask."""
    from swiftkv.fileio import atomic_directory
    from swiftkv.models.loader import (
        check_config_matches_weights,
        copy_side_files,
        load_config,
    )
    from swiftkv.models.shards import (
        read_tensor,
        tensor_index,
        weight_files,
        write_sharded,
    )

    src = Path(src)
    config = load_config(src)
    if getattr(config, "swiftkv", False):
        raise ValueError(f"{src} is already a SwiftKV checkpoint (l={config.num_key_value_layers}); convert the "
                         "original model.")
    if skv.num_layers != config.num_hidden_layers:
        raise ValueError(f"SwiftKV config is for {skv.num_layers} layers; the model has {config.num_hidden_layers}.")
    check_config_matches_weights(config, src)  # a config that cannot load is not written out with rc 0
    index = tensor_index(weight_files(src))
    plan = swiftkv_init_plan(config, skv)
    missing = sorted({s for _, sources in plan.values() for s in sources} - set(index))
    if missing:
        raise ValueError(f"{src} lacks {missing[:3]}, which the SwiftKV tensors are made from; is it complete?")
    cast = (lambda dt: dtype if dtype is not None and dt.is_floating_point else dt)
    specs = {n: (cast(info.dtype), info.shape) for n, info in index.items()}
    specs.update({n: (cast(index[sources[0]].dtype), index[sources[0]].shape) for n, (_, sources) in plan.items()})

    def produce(name: str) -> torch.Tensor:
        if name in plan:
            op, sources = plan[name]
            t = initial_tensor(op, [read_tensor(index[s], s) for s in sources])
        else:
            t = read_tensor(index[name], name)
        return t.to(specs[name][0])

    out = Path(out).resolve()
    if out == src.resolve():
        raise ValueError(f"the output directory {out} is the model being read; choose another --out.")
    modes: dict[str, int] = {}
    with atomic_directory(out, overwrite, modes) as tmp:
        copy_side_files(src, tmp, modes)
        write_sharded(tmp, specs, produce, max_shard_size, desc="convert")
        config = swiftkv_hf_config(config, skv)
        saved = {dt for dt, _ in specs.values() if dt.is_floating_point}
        config.dtype = str(saved.pop() if len(saved) == 1 else torch.float32).removeprefix("torch.")
        (tmp / "config.json").write_text(config.to_json_string())
    return out


def original_checkpoint(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The inverse of :func:`convert_checkpoint`: the original model a SwiftKV checkpoint ``src`` keeps (its teacher
    tensors) written to ``out`` as a plain Llama/Qwen2 checkpoint (no ``*_swiftkv`` tensors, the base
    ``model_type``) that other engines load; tensor by tensor, atomically."""
    from swiftkv.fileio import atomic_directory
    from swiftkv.models.loader import copy_side_files, load_config
    from swiftkv.models.shards import (
        read_tensor,
        tensor_index,
        weight_files,
        write_sharded,
    )

    src = Path(src)
    config = load_config(src)
    if not getattr(config, "swiftkv", False):
        raise ValueError(f"{src} is not a SwiftKV checkpoint: it is the original model already")
    plain = base_hf_config(config)
    index = {n: info for n, info in tensor_index(weight_files(src)).items() if "_swiftkv" not in n}
    with torch.device("meta"):
        needed = dict(LlamaForCausalLM(plain).named_parameters())  # a tied lm_head appears once
    missing = [n for n in needed if n not in index]
    if missing:
        raise ValueError(f"{src} lacks the original model's tensors {missing[:3]}; other engines cannot run it")
    with atomic_directory(Path(out), overwrite) as tmp:
        copy_side_files(src, tmp)
        write_sharded(tmp, {n: (i.dtype, i.shape) for n, i in index.items()}, lambda n: read_tensor(index[n], n),
                      desc="original checkpoint")
        plain.dtype = config.dtype
        (tmp / "config.json").write_text(plain.to_json_string())
    return Path(out)
