"""Size-shaped checkpoints with random weights, **for speed and memory measurements only** (their text is
noise): the shapes of Llama-3.2-1B and -3B, Qwen2.5-1.5B and Llama-3.1-8B, stored in bf16 as those models
are, with SmolLM2's tokenizer (vocabulary 49,152 for every shape, so any prompt tokenizes; the real
Llama-3 vocabulary is 128,256, which would add 0.16-0.6 B embedding parameters).

``sized:NAME`` names them wherever a model is accepted (``swiftkv bench sized:llama-3.2-1b-swiftkv``,
``LLM("sized:llama-3.2-3b")``): built once into ``$XDG_CACHE_HOME/swiftkv/sized/``, streamed tensor by
tensor (one shard in memory at a time), and ``NAME-swiftkv`` is the same model converted to SwiftKV at
50% (``l = L / 2``) with :func:`swiftkv.transform.convert_checkpoint`. ``scripts/sized_checkpoint.py``
writes one anywhere.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swiftkv.models.arch import head_dim_of

PREFIX = "sized:"
SWIFTKV_SUFFIX = "-swiftkv"
VOCAB = 49152


@dataclass(frozen=True)
class Shape:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0


SHAPES = {
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 8192, True),
    "llama-3.2-3b": Shape("llama", 28, 3072, 24, 8, 8192, True),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 8960, True, 1000000.0),
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 14336, False),
}


def config_dict(shape: Shape) -> dict:
    """The config.json of a shape."""
    cfg = {**asdict(shape), "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
           "hidden_act": "silu", "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           "architectures": ["Qwen2ForCausalLM" if shape.model_type == "qwen2" else "LlamaForCausalLM"]}
    if shape.model_type == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def tensor_specs(shape: Shape) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of the shape, as transformers names them (bf16)."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * head_dim_of(shape)
    bf16, specs = torch.bfloat16, {"model.embed_tokens.weight": (torch.bfloat16, (VOCAB, h))}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        specs.update({p + "input_layernorm.weight": (bf16, (h,)), p + "post_attention_layernorm.weight": (bf16, (h,)),
                      p + "self_attn.q_proj.weight": (bf16, (h, h)), p + "self_attn.k_proj.weight": (bf16, (kv, h)),
                      p + "self_attn.v_proj.weight": (bf16, (kv, h)), p + "self_attn.o_proj.weight": (bf16, (h, h)),
                      p + "mlp.gate_proj.weight": (bf16, (shape.intermediate_size, h)),
                      p + "mlp.up_proj.weight": (bf16, (shape.intermediate_size, h)),
                      p + "mlp.down_proj.weight": (bf16, (h, shape.intermediate_size))})
        if shape.model_type == "qwen2":
            specs.update({p + f"self_attn.{n}_proj.bias": (bf16, (d,)) for n, d in (("q", h), ("k", kv), ("v", kv))})
    specs["model.norm.weight"] = (bf16, (h,))
    if not shape.tie_word_embeddings:
        specs["lm_head.weight"] = (bf16, (VOCAB, h))
    return specs


def write_sized_checkpoint(name: str, out: str | Path, tokenizer_dir: str | Path, seed: int = 0,
                           max_shard_size: int | str = "5GB") -> Path:
    """Write the random-weight checkpoint ``name`` (a key of :data:`SHAPES`) to ``out`` (atomically), with the
    tokenizer and chat template of ``tokenizer_dir`` (the default model's: SmolLM2's vocabulary)."""
    from swiftkv.fileio import atomic_directory
    from swiftkv.models.loader import copy_side_files
    from swiftkv.models.shards import write_sharded

    if name not in SHAPES:
        raise ValueError(f"unknown sized model {name!r}; one of: {', '.join(SHAPES)}")
    shape = SHAPES[name]
    specs = tensor_specs(shape)

    def produce(tensor: str) -> torch.Tensor:
        dtype, dims = specs[tensor]
        if len(dims) == 1:  # norms around 1, biases small
            return (torch.ones(dims) if tensor.endswith("norm.weight") else torch.zeros(dims)).to(dtype)
        g = torch.Generator().manual_seed(seed * 100003 + list(specs).index(tensor))
        return (torch.randn(dims, generator=g) * 0.02).to(dtype)

    with atomic_directory(Path(out), overwrite=True) as tmp:
        copy_side_files(Path(tokenizer_dir), tmp)
        (tmp / "config.json").write_text(json.dumps(config_dict(shape), indent=2))
        write_sharded(tmp, specs, produce, max_shard_size, desc=f"writing {name}")
    return Path(out).resolve()


def sized_model_dir(spec: str, tokenizer_dir: str | Path) -> Path:
    """The directory of ``sized:NAME`` or ``sized:NAME-swiftkv``, built once into the cache (with the tokenizer
    of ``tokenizer_dir``)."""
    from swiftkv.config import SwiftKVConfig
    from swiftkv.fileio import cache_dir, stamp_matches, write_stamp
    from swiftkv.transform import convert_checkpoint

    name = spec.removeprefix(PREFIX)
    base = name.removesuffix(SWIFTKV_SUFFIX)
    if base not in SHAPES:
        raise ValueError(f"unknown sized model {spec!r}; use {PREFIX}NAME or {PREFIX}NAME{SWIFTKV_SUFFIX} with NAME "
                         f"one of: {', '.join(SHAPES)}")
    root = cache_dir() / "sized"
    stamp = json.dumps(asdict(SHAPES[base]), sort_keys=True)
    base_dir = root / base
    if not stamp_matches(base_dir, stamp):
        print(f"swiftkv: writing {PREFIX}{base} (random bf16 weights, for speed and memory only) into {base_dir}",
              file=sys.stderr, flush=True)
        write_stamp(write_sized_checkpoint(base, base_dir, tokenizer_dir), stamp)
    if name == base:
        return base_dir
    out = root / name
    if not stamp_matches(out, stamp):
        L = SHAPES[base].num_hidden_layers
        print(f"swiftkv: converting {PREFIX}{base} to SwiftKV (l = {L // 2} of {L}) into {out}", file=sys.stderr,
              flush=True)
        write_stamp(convert_checkpoint(base_dir, out, SwiftKVConfig(L, L // 2), overwrite=True), stamp)
    return out
