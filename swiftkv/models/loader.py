"""Load models (local HF directory, hub id, built-in default) and save SwiftKV checkpoints.

Only this module and ``models/hf.py`` speak Hugging Face formats.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from swiftkv.models.default import DEFAULT_MODEL, SHIPPED_MODELS, default_model_dir, shipped_model_dir
from swiftkv.models.llama import LlamaForCausalLM, check_supported
from swiftkv.platforms import DTYPES, resolve_dtype

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def parse_dtype(dtype: str | torch.dtype, config=None, device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"``: the fastest dtype on this machine (:mod:`swiftkv.platforms`); ``"checkpoint"``: the
    checkpoint's own dtype (from config.json, else float32); else the named dtype."""
    if dtype == "checkpoint":
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return saved if isinstance(saved, torch.dtype) else DTYPES.get(str(saved), torch.float32)
    return resolve_dtype(dtype, device)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """Local directory, a built-in model (``None`` = ``smollm2-135m-instruct``; the shipped SwiftKV
    models ``smollm2-135m-instruct-swiftkv``, ``-swiftkv-l15`` and ``-swiftkv-g2``), or a hub id."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_dir()
    if str(name_or_path) in SHIPPED_MODELS:
        return shipped_model_dir(str(name_or_path))
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

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))


def load_config(path: str | os.PathLike):
    """The transformers config of a model directory (SwiftKV types registered)."""
    import swiftkv.models.hf  # noqa: F401  (registers llama_swiftkv / qwen2_swiftkv)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as e:
        raise ValueError(f"Cannot read the config of {path}: {e}") from e
    check_supported(config)
    return config


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"No safetensors weights in {path} (expected one of {', '.join(WEIGHT_FILES)}).")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's (possibly sharded) safetensors files."""
    tensors = {}
    for f in _weight_files(path):
        if not f.exists():
            raise ValueError(f"Weight shard {f.name} listed in the index is missing from {path}.")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    tensors[name] = sf.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f} is not a valid safetensors file (corrupt or truncated?): {e}") from e
    return tensors


def _teacher_qkv_names(model: LlamaForCausalLM) -> set[str]:
    skv = model.swiftkv_config
    return {
        f"model.layers.{i}.self_attn.{p}_proj.{w}"
        for i in range(skv.num_key_value_layers, skv.num_layers)
        for p in "qkv"
        for w in ("weight", "bias")
    }


def load_state(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``model``, checking names and shapes.

    A SwiftKV checkpoint may lack the later layers' original q/k/v (the teacher); the model then
    runs only in SwiftKV mode (``model.teacher_available`` is False).
    """
    expected = dict(model.named_parameters())  # tied lm_head appears once, as embed_tokens
    missing = [n for n in expected if n not in tensors]
    teacher_missing = [n for n in missing if n in _teacher_qkv_names(model)]
    other_missing = [n for n in missing if n not in teacher_missing]
    if other_missing:
        raise ValueError(
            f"{source} is missing {len(other_missing)} tensor(s) the {model.config.model_type} config needs, "
            f"e.g. {other_missing[:3]}; is the checkpoint complete and does config.json match it?"
        )
    if teacher_missing and not model.swiftkv_enabled:
        raise ValueError(f"{source} is missing tensors {teacher_missing[:3]}...")
    with torch.no_grad():
        for name, param in expected.items():
            if name not in tensors:
                continue
            t = tensors[name]
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(param.shape)}."
                )
            param.copy_(t)
    if teacher_missing:
        model.teacher_available = False
        for i in range(model.swiftkv_config.num_key_value_layers, model.config.num_hidden_layers):
            attn = model.model.layers[i].self_attn
            attn.q_proj = attn.k_proj = attn.v_proj = None  # free the never-loaded teacher q/k/v


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    swiftkv: bool | None = None,
) -> tuple[LlamaForCausalLM, Path]:
    """Load a model for swiftkv's own runtime. Returns ``(model, resolved_directory)``.

    ``swiftkv``: ``None`` keeps the checkpoint's mode, ``False`` runs the original model.
    """
    path = resolve_model_path(name_or_path)
    config = load_config(path)
    dt = parse_dtype(dtype, config, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state(model, read_tensors(path), source=str(path))
    model.to(dt).eval().requires_grad_(False)
    if swiftkv is not None:
        model.set_swiftkv(swiftkv)
    return model, path


def save_checkpoint(model: LlamaForCausalLM, out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> Path:
    """Save ``model`` (config + safetensors) atomically, copying tokenizer files from ``source_dir``.

    The directory appears complete or not at all: everything is written to a temporary sibling
    that is renamed into place at the end.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                skip = f.name == "config.json" or f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")
                if f.is_file() and not skip:
                    shutil.copy2(f, tmp / f.name)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_torch_state_dict(state, tmp, max_shard_size="5GB")
        model.config.dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(model.config.to_json_string())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the model (transformers ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"No usable tokenizer in {path}: {e}") from e
