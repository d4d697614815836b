"""The distillation pipeline end to end: load (and convert) the model, fit the K/V initialisation, train,
and write the run directory (``swiftkv_tensors.safetensors``, ``model/``, ``distill.png``). ``swiftkv
distill`` calls :func:`distill`; so can a script or a notebook."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from swiftkv.builtin import resolve_model
from swiftkv.config import LayoutRequest
from swiftkv.distill.report import plot_logs, save_trained_tensors
from swiftkv.distill.trainer import DistillConfig, Trainer
from swiftkv.fileio import read_json_object
from swiftkv.models.arch import adapter_rank_of
from swiftkv.models.loader import load_model, load_tokenizer, save_checkpoint
from swiftkv.platforms import resolve_device, resolve_dtype
from swiftkv.transform import to_swiftkv


def check_run_directory(out: Path, overwrite: bool = False) -> None:
    """Refuse (``ValueError``) an ``--out`` that is a file, or a non-empty directory that is not a distill run
    (no ``trainer_state.pt``, no distill ``log.json``): a run writes ``log.json``, ``distill.png`` and ``model/``
    there, replacing any of the user's files of those names. ``overwrite`` allows it."""
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; a distill run writes a directory. Choose another --out.")
    names = {p.name for p in out.iterdir()}
    try:
        log = read_json_object(out / "log.json") if "log.json" in names else {}
    except ValueError:
        log = {}
    if names and "trainer_state.pt" not in names and not {"config", "log"} <= set(log):
        raise ValueError(f"--out {out} is a non-empty directory that is not a swiftkv distill run (it has no "
                         "trainer_state.pt or distill log.json); a run writes log.json, distill.png and model/ there. "
                         "Choose a new or empty directory (or pass --overwrite to write into it).")


def distill(model: str | None, cfg: DistillConfig, layout: LayoutRequest | None = None, *, adapter_rank: int = 0,
            kv_init: str = "lstsq", resume: bool = False, device: str = "auto", dtype: str = "auto",
            overwrite: bool = False) -> list[dict]:
    """Distill ``model`` (a base model, converted first with ``layout`` and ``adapter_rank``, or a SwiftKV
    checkpoint, trained further) into ``cfg.out``; returns the training log. Under ``torchrun`` each process
    trains its share (DDP, one GPU per process on CUDA) and rank 0 writes. ``kv_init``: ``lstsq`` (fit the
    new K/V projections on calibration tokens) or ``mean`` (the reference's mean of the group's k/v_proj).
    ``dtype``: the autocast dtype (``auto``: bf16 only where the device multiplies it natively)."""
    layout = layout or LayoutRequest()  # default: half the layers
    check_run_directory(Path(cfg.out), overwrite)
    if kv_init not in ("lstsq", "mean"):
        raise ValueError(f"kv_init must be lstsq or mean, got {kv_init!r}")
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(cfg.seed)
    student, path = load_model(resolve_model(model), dtype="float32")
    converted = student.swiftkv_config.is_baseline
    if converted:
        student = to_swiftkv(student, layout.for_layers(student.config.num_hidden_layers), adapter_rank)
    elif adapter_rank != adapter_rank_of(student.config):
        raise ValueError(f"{path} is already a SwiftKV checkpoint with adapter rank {adapter_rank_of(student.config)}; "
                         f"--adapter-rank {adapter_rank} applies only when converting a base model.")
    student = student.to(dev)
    skv, rank = student.swiftkv_config, adapter_rank_of(student.config)
    cfg = dataclasses.replace(cfg, bf16=resolve_dtype(dtype, dev) == torch.bfloat16)
    tokenizer = load_tokenizer(path)
    if kv_init == "lstsq" and converted and not (resume and (Path(cfg.out) / "trainer_state.pt").exists()):
        from swiftkv.distill.init import calibration_batch, fit_kv_projections

        res = fit_kv_projections(student, calibration_batch(tokenizer, cfg))
        print(f"least-squares K/V init: mean relative residual {sum(res.values()) / len(res):.3f}", file=sys.stderr)
    trainer = Trainer(student, tokenizer, cfg)
    if resume and trainer.resume():
        print(f"resumed at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    print(f"distilling l={skv.num_key_value_layers} of L={skv.num_layers}, G={skv.key_value_group_size}, "
          f"adapter rank {rank}, on {dev} x {trainer.world}: {trainer.total_steps} steps x {cfg.batch_size} rows x "
          f"{cfg.seq_len} tokens, {sum(p.numel() for p in trainer.params.values()):,} trainable parameters",
          file=sys.stderr)
    log = trainer.train()
    if trainer.rank == 0:
        _write_run(Path(cfg.out), path, trainer, skv, rank, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return log


def _write_run(out: Path, base: Path, trainer: Trainer, skv, adapter_rank: int, log: list[dict]) -> None:
    """The trained tensors alone, a full checkpoint (``model/``: the base as loaded + the trained tensors; the
    frozen weights ran in bf16 when training did) and the curves."""
    save_trained_tensors(trainer.params, out / "swiftkv_tensors.safetensors",
                         {"num_key_value_layers": skv.num_key_value_layers,
                          "key_value_group_size": skv.key_value_group_size, "adapter_rank": adapter_rank,
                          "base": str(base)})
    trained = {n: p.detach().float().cpu() for n, p in trainer.params.items()}
    fresh, _ = load_model(base, dtype="float32")
    if fresh.swiftkv_config.is_baseline:
        fresh = to_swiftkv(fresh, skv, adapter_rank)
    unexpected = fresh.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"trained tensors without a place in the reloaded model: {unexpected[:3]}")
    save_checkpoint(fresh, out / "model", source_dir=base)
    plot_logs({out.name: log}, out / "distill.png")
    last = [e for e in log if "eval_agree" in e]
    if last:
        print(f"held-out agreement {100 * last[0]['eval_agree']:.1f}% -> {100 * last[-1]['eval_agree']:.1f}%, "
              f"KL {last[0]['eval_kl']:.3f} -> {last[-1]['eval_kl']:.3f}")
    print(f"wrote {out / 'model'} and {out / 'swiftkv_tensors.safetensors'}")
