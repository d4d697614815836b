"""Load models (a local Hugging Face directory or a hub id) and save SwiftKV checkpoints.

``load_model`` builds the model on the meta device and fills it either for inference (the safetensors
files memory-mapped, each weight held once in its stored form by ``prepare_for_inference``) or as plain
``dtype`` parameters (training, references); which path a forward runs is the caller's argument. Saving
writes sharded safetensors with an index, atomically (:mod:`swiftkv.models.shards`). Built-in names are
resolved one floor up (:func:`swiftkv.builtin.resolve_model`). Only this module, ``models/hf.py``,
``models/hf_config.py``, ``transform.py`` and ``builtin.py`` speak Hugging Face formats.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from swiftkv.fileio import SIDE_FILES, atomic_directory, read_json_object
from swiftkv.memory import back_with_huge_pages
from swiftkv.models.arch import SIZES, check_sizes, check_supported, head_dim_of
from swiftkv.models.footprint import held_bytes, model_tensors, release_unheld_pages
from swiftkv.models.llama import LlamaForCausalLM
from swiftkv.models.registry import BUILTIN_MODELS, DEFAULT_MODEL
from swiftkv.models.shards import (
    DEFAULT_SHARD_SIZE,
    read_tensors,
    tensor_index,
    weight_files,
    write_sharded,
)
from swiftkv.platforms import DTYPES, resolve_dtype


def parse_dtype(dtype: str | torch.dtype, config=None, device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"``: the fastest dtype on this machine (:mod:`swiftkv.platforms`); ``"checkpoint"``: the
    checkpoint's own dtype (from config.json, else float32); else the named dtype."""
    if dtype == "checkpoint":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return saved if isinstance(saved, torch.dtype) else DTYPES.get(str(saved), torch.float32)
    return resolve_dtype(dtype, device)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local model directory, or a hub id (downloaded). Built-in names are resolved a floor up,
    by :func:`swiftkv.builtin.resolve_model`."""
    if name_or_path is None or str(name_or_path) in BUILTIN_MODELS:
        raise ValueError(f"{name_or_path!r} is a built-in model: resolve it with swiftkv.builtin.resolve_model "
                         "(LLM() and the CLI do).")
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory.")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise ValueError(
            f"Model {str(name_or_path)!r} is neither a model directory nor a hub id (org/name); "
            f"use a local directory or {DEFAULT_MODEL!r}."
        )
    from huggingface_hub import snapshot_download  # hub id: same path as transformers

    try:
        return Path(snapshot_download(str(name_or_path),
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated, network: dozens of hub error types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"Model {str(name_or_path)!r}: no such directory, and the hub could not provide it "
                         f"({type(e).__name__}: {reason[:200]}). Check the path, or the hub id and your network.") from None


def load_config(path: str | os.PathLike):
    """The transformers config of a model directory (SwiftKV types registered)."""
    from transformers import AutoConfig

    from swiftkv.models.hf_config import register_configs

    register_configs()  # llama_swiftkv / qwen2_swiftkv
    _check_config_json(Path(path) / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError, AttributeError, TypeError, ArithmeticError, StrictDataclassError) as e:
        # transformers' own validation (a field of the wrong type, heads = 0): one line, naming the file
        raise ValueError(f"Cannot read {Path(path) / 'config.json'}: {' '.join(str(e).split())}") from None
    check_supported(config)
    return config


def _check_config_json(file: Path) -> None:
    """What transformers reports as a raw traceback: invalid JSON, an unknown dtype."""
    config = read_json_object(file)
    check_sizes({name: config[name] for name in SIZES if name in config})
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype)):
            raise ValueError(f"{file}: {key} {value!r} is not a torch dtype; use float32, bfloat16 or float16.")


def _teacher_qkv_names(model: LlamaForCausalLM) -> set[str]:
    skv = model.swiftkv_config
    return {
        f"model.layers.{i}.self_attn.{p}_proj.{w}"
        for i in range(skv.num_key_value_layers, skv.num_layers)
        for p in "qkv"
        for w in ("weight", "bias")
    }


def load_state(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
               assign: bool = False) -> None:
    """Put ``tensors`` into ``model``, checking names, shapes and values: copied into its parameters, or
    (``assign``) made its parameters as they are -- no copy, a memory-mapped file stays mapped.

    A SwiftKV checkpoint may lack the later layers' original q/k/v (the teacher); the model then
    runs only in SwiftKV mode (``model.teacher_available`` is False).
    """
    model.tie_lm_head()  # (to_empty() unties them)
    expected = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    missing = [n for n in expected if n not in tensors]
    teacher_missing = [n for n in missing if n in _teacher_qkv_names(model)]
    other_missing = [n for n in missing if n not in teacher_missing]
    if other_missing:
        raise ValueError(
            f"{source} is missing {len(other_missing)} tensor(s) the {model.config.model_type} config needs, "
            f"e.g. {other_missing[:3]}; is the checkpoint complete and does config.json match it?"
        )
    if teacher_missing and model.swiftkv_config.is_baseline:
        raise ValueError(f"{source} is missing tensors {teacher_missing[:3]}...")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in expected.items():
            if name not in tensors:
                continue
            t = tensors[name]
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}."
                )
            if not t.is_floating_point():
                raise ValueError(f"{source}: tensor {name} is stored as {t.dtype}; a float parameter needs a float "
                                 "tensor (is this a quantised checkpoint? swiftkv loads float weights only).")
            if not torch.isfinite(t).all():
                raise ValueError(f"{source}: tensor {name} contains NaN or Inf values; the checkpoint is damaged.")
            if assign:
                owner, attr = name.rpartition(".")[::2]
                setattr(modules[owner], attr, torch.nn.Parameter(t, requires_grad=False))
            else:
                param.copy_(t)
    model.tie_lm_head()
    if teacher_missing:
        model.teacher_available = False
        for i in range(model.swiftkv_config.num_key_value_layers, model.config.num_hidden_layers):
            attn = model.model.layers[i].self_attn
            attn.q_proj = attn.k_proj = attn.v_proj = None  # free the never-loaded teacher q/k/v


def check_config_matches_weights(config, path: Path) -> None:
    """Refuse (``ValueError``), from the safetensors headers alone and before any module is built, a config that
    does not describe the checkpoint's tensors: a layer count or size that the weights do not have (a config
    claiming 10^9 layers would otherwise build layers until the process is killed)."""
    index = tensor_index(weight_files(path))
    layers = {int(m.group(1)) for n in index if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    where = f"{path}/config.json"
    n = config.num_hidden_layers
    if len(layers) != n or (layers and (min(layers), max(layers)) != (0, n - 1)):  # never a range of n: n is untrusted
        have = f"layers 0..{max(layers)}" if layers and len(layers) == max(layers) + 1 else f"{len(layers)} layers"
        raise ValueError(f"{where} says num_hidden_layers={config.num_hidden_layers} but the weights hold {have}; "
                         "fix the config or re-download the checkpoint.")
    hd = head_dim_of(config)
    expected = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
                "model.layers.0.self_attn.q_proj.weight": (config.num_attention_heads * hd, config.hidden_size),
                "model.layers.0.self_attn.k_proj.weight": (config.num_key_value_heads * hd, config.hidden_size),
                "model.layers.0.mlp.gate_proj.weight": (config.intermediate_size, config.hidden_size)}
    for name, shape in expected.items():
        if name not in index:
            raise ValueError(f"{path} has no tensor {name}; it is not a Llama-family checkpoint swiftkv reads.")
        if index[name].shape != shape:
            raise ValueError(f"{where} describes {name} as {list(shape)} (from hidden_size, heads, vocab_size, "
                             f"intermediate_size) but the weights hold {list(index[name].shape)}; fix the config or "
                             "re-download the checkpoint.")


# Models whose held weights reach this go onto 2 MB pages: a decode step streams them from memory, bound by its
# bandwidth (Llama-3.2-1B shape, 2.25 GB: batch 1 1.09x). The default model (0.11 GB) decodes no faster on them
# (bound by per-op overhead: 1.0x), so it keeps the quarter second that moving costs at load.
HUGE_PAGES_MIN_BYTES = 1 << 30


def _on_huge_pages(model: LlamaForCausalLM) -> None:
    """The held weights onto 2 MB pages (:func:`~swiftkv.memory.back_with_huge_pages`) where they are
    ``HUGE_PAGES_MIN_BYTES`` or more; said on stderr where it took long enough to notice (a memory-mapped
    checkpoint's bytes are copied)."""
    if held_bytes(model) < HUGE_PAGES_MIN_BYTES:
        return
    started = time.perf_counter()
    moved = back_with_huge_pages(model_tensors(model))
    if (took := time.perf_counter() - started) >= 1.0:
        print(f"swiftkv: weights moved onto 2 MB pages ({moved / 1e9:.2f} GB in {took:.1f} s: decode reads them "
              "~1.1x faster; SWIFTKV_HUGE_PAGES=0 keeps them in place)", file=sys.stderr)


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    for_inference: bool = False,
) -> tuple[LlamaForCausalLM, Path]:
    """Load a model directory (or hub id) for swiftkv's own runtime. Returns ``(model, directory)``.
    Built-in names: ``load_model(resolve_model(name))`` (:mod:`swiftkv.builtin`).

    Which path a forward runs (SwiftKV or the original model) is the caller's argument, not the model's.
    ``for_inference``: every weight held once in its stored form (the safetensors files memory-mapped,
    :meth:`~swiftkv.models.llama.SwiftKVCausalLM.prepare_for_inference`), computing in ``dtype``; the model
    is inference-only. Otherwise every parameter is a ``dtype`` copy (training, references).
    """
    path = resolve_model_path(name_or_path)
    config = load_config(path)
    dt = parse_dtype(dtype, config, device)
    check_config_matches_weights(config, path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if for_inference and torch.device(device).type == "cpu":
        tensors = read_tensors(path)  # memory-mapped: nothing is read until used
        load_state(model, tensors, source=str(path), assign=True)
        model.prepare_for_inference(dt)
        release_unheld_pages(model, tensors)
        _on_huge_pages(model)
    else:
        model.to_empty(device=device)
        load_state(model, read_tensors(path), source=str(path))
        model.to(dt).eval().requires_grad_(False)
        if for_inference:
            model.prepare_for_inference(dt)
    return model, path


def copy_side_files(source_dir: Path, out: Path, modes: dict[str, int] | None = None) -> None:
    """The tokenizer, chat template, generation config and licence files of ``source_dir``
    (:data:`~swiftkv.fileio.SIDE_FILES`; nothing else: not a README, not a multi-GB GGUF). A symlink (the Hugging
    Face cache's layout) is read through; each copy's source mode goes into ``modes`` so that a private (0600)
    file stays private (:func:`~swiftkv.fileio.atomic_directory`'s ``keep_modes``)."""
    for f in Path(source_dir).iterdir():
        if SIDE_FILES.match(f.name) and f.is_file():
            shutil.copyfile(f, out / f.name)
            if modes is not None:
                modes[f.name] = f.stat().st_mode


def save_checkpoint(model: LlamaForCausalLM, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                    overwrite: bool = False, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Save ``model`` (config + safetensors in shards of ``max_shard_size``) atomically, copying tokenizer
    files from ``source_dir``.

    The directory appears complete or not at all (:func:`swiftkv.fileio.atomic_directory`); an
    existing file or non-checkpoint directory at ``out_dir`` is refused unless ``overwrite``.
    """
    if model.inference_dtype is not None:
        raise ValueError("this model was prepared for inference (weights in their held form); save a model loaded "
                         "without for_inference")
    out = Path(out_dir).resolve()
    if source_dir is not None and out == Path(source_dir).resolve():
        raise ValueError(f"the output directory {out} is the model being read; choose another --out.")
    modes: dict[str, int] = {}
    with atomic_directory(out, overwrite, modes) as tmp:
        if source_dir is not None:
            copy_side_files(Path(source_dir), tmp, modes)
        state = {n: p.detach() for n, p in model.named_parameters()}  # a tied lm_head appears once
        write_sharded(tmp, {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}, state.__getitem__,
                      max_shard_size, desc="save")
        model.config.dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(model.config.to_json_string())
    return out


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the model (transformers ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"No usable tokenizer in {path}: {e}") from e
