"""``swiftkv distill``: train the SwiftKV tensors against the original model.

Long runs are first-class: tqdm progress (tokens/s, ETA), periodic held-out KL / top-1 agreement,
atomic checkpoints every ``--save-every`` steps, ``--resume`` that continues exactly (same data
order, optimizer, scheduler and RNG state), a JSON log and a PNG plot. Under
``torchrun --nproc-per-node N`` it trains data-parallel with PyTorch DDP (gloo on CPU, NCCL with one
GPU per process).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from swiftkv.data.conversations import load_conversations
from swiftkv.data.rows import Batch, Row, held_out_rows, training_rows
from swiftkv.distill.features import FeatureCache
from swiftkv.distill.loss import DistillModule, trainable_parameters
from swiftkv.fileio import atomic_write, atomic_write_json, clean_stale_temps

RESUMABLE_CHANGES = ("out", "eval_every", "eval_rows", "save_every")  # may differ on --resume


@dataclass
class DistillConfig:
    out: str
    seq_len: int = 512
    batch_size: int = 4  # global rows per step
    max_tokens: int = 200_000
    lr: float = 3e-3  # the paper's 2e-4 is too timid for the budgets measured here
    warmup_frac: float = 0.05
    schedule: str = "cosine"  # or "linear"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 2.0
    mse_weight: float = 0.0
    eval_every: int = 25
    eval_rows: int = 16
    save_every: int = 25
    seed: int = 0
    data: str | None = None
    held_out_fraction: float = 0.01
    bf16: bool = True
    feature_cache: str | None = None  # directory of cached frozen-model features (swiftkv.distill.features)
    epochs: int = 1  # passes over max_tokens / epochs of the data (the feature cache pays from the 2nd)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine or linear, got {self.schedule!r}")
        for name in ("seq_len", "batch_size", "max_tokens", "eval_every", "save_every", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _lr_lambda(cfg: DistillConfig, total_steps: int):
    warmup = max(1, int(cfg.warmup_frac * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


class Trainer:
    def __init__(self, model, tokenizer, cfg: DistillConfig, rows: list[Row] | None = None,
                 eval_rows: list[Row] | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {self.world} processes")
        model.requires_grad_(False)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no SwiftKV tensors to train (l == L?)")
        for p in self.params.values():
            p.requires_grad_(True)
        if cfg.bf16:  # frozen weights stay bf16 (no per-step autocast copies); trained ones fp32
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        self.device = next(iter(self.params.values())).device  # the model's: cpu or cuda:<local rank>
        self.module = DistillModule(model, cfg.temperature, cfg.mse_weight)
        if self.distributed:  # gloo on CPU, nccl on GPUs (one per process)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.ddp = self.module
        if rows is None or eval_rows is None:
            convs = load_conversations(cfg.data)
            f = cfg.held_out_fraction
            rows = training_rows(tokenizer, convs, cfg.seq_len, cfg.max_tokens, cfg.seed, fraction=f,
                                 epochs=cfg.epochs)
            eval_rows = held_out_rows(tokenizer, convs, cfg.seq_len, cfg.eval_rows, fraction=f)
        if len(rows) < cfg.batch_size:
            raise ValueError(f"only {len(rows)} packed rows of training data; need at least batch_size={cfg.batch_size}")
        self.rows, self.eval_rows = rows, eval_rows
        self.features = None
        if cfg.feature_cache:
            if self.distributed:
                raise ValueError("--feature-cache is for single-process runs; under torchrun train without it")
            if cfg.mse_weight:
                raise ValueError("--mse-weight needs the teacher's layer states, which the feature cache does not "
                                 "keep; drop one of the two")
            self.features = FeatureCache(cfg.feature_cache, model, rows, bf16=cfg.bf16)
        self.total_steps = max(1, len(rows) // cfg.batch_size)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg, self.total_steps))
        self.step = 0
        self.tokens_seen = 0
        self.log: list[dict] = []
        self.out = Path(cfg.out)
        if self.rank == 0:
            clean_stale_temps(self.out)  # e.g. a half-written trainer_state.pt of a killed run

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "log": self.log, "config": asdict(self.cfg),
                "layout": self._layout(),
                "params": {n: p.detach().clone() for n, p in self.params.items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.log = state["step"], state["tokens_seen"], state["log"]

    def save(self) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            state = self.state_dict()
            atomic_write(self.out / "trainer_state.pt", lambda tmp: torch.save(state, tmp))
            atomic_write_json(self.out / "log.json", {"config": asdict(self.cfg), "log": self.log})

    def resume(self) -> bool:
        path = self.out / "trainer_state.pt"
        if not path.exists():
            return False
        state = torch.load(path, weights_only=False, map_location="cpu")  # a GPU run resumes anywhere
        diffs = self._resume_differences(state)
        if diffs:
            raise ValueError(f"{path} was saved by a run with other settings ({'; '.join(diffs)}); resume with the "
                             "same arguments, or start a new run in another --out directory.")
        self.load_state_dict(state)
        return True

    def _resume_differences(self, state: dict) -> list[str]:
        """What differs between the saved run and this one (bookkeeping fields may change)."""
        now = {**asdict(self.cfg), **self._layout()}
        saved = {**state.get("config", {}), **state.get("layout", {})}
        diffs = [f"{k}: saved {saved[k]!r}, now {now[k]!r}" for k in now
                 if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
        if sorted(state["params"]) != sorted(self.params):
            diffs.append("the trained tensors differ (another layout or adapter rank)")
        return diffs

    def _layout(self) -> dict:
        skv = self.model.swiftkv_config
        return {"l": skv.num_key_value_layers, "G": skv.key_value_group_size}

    # -- training -----------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _local_rows(self, step: int) -> list[Row]:
        b = self.cfg.batch_size
        rows = self.rows[step * b : (step + 1) * b]
        return rows[self.rank :: self.world]

    def train_step(self) -> dict:
        step_rows = self.rows[self.step * self.cfg.batch_size : (self.step + 1) * self.cfg.batch_size]
        global_tokens = sum(r.num_loss_tokens for r in step_rows)
        local = self._local_rows(self.step)
        batch = (self.features.batch(local) if self.features else Batch.from_rows(local)).to(self.device)
        with self._autocast():
            # DDP averages gradients over processes: scale so the result is the global mean
            out = self.ddp(batch, loss_scale=self.world / max(1, global_tokens))
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.tokens_seen += sum(r.num_tokens for r in step_rows)
        stats = {k: float(v.detach()) / self.world for k, v in out.items()}
        if self.distributed:
            t = torch.tensor([stats["kl"], stats["agree"]], device=self.device)  # nccl reduces GPU tensors
            dist.all_reduce(t)
            stats["kl"], stats["agree"] = float(t[0]), float(t[1])
        return {**stats, "grad_norm": float(grad_norm), "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out KL(teacher || student) at T=1 and top-1 agreement, over assistant tokens."""
        if not self.eval_rows:
            return {}
        module = DistillModule(self.model, temperature=1.0)
        kl = agree = n = 0.0
        for i in range(0, len(self.eval_rows), self.cfg.batch_size):
            batch = Batch.from_rows(self.eval_rows[i : i + self.cfg.batch_size]).to(self.device)
            with self._autocast():
                out = module(batch)
            kl, agree, n = kl + float(out["kl"]), agree + float(out["agree"]), n + batch.num_loss_tokens
        return {"eval_kl": kl / n, "eval_agree": agree / n, "eval_tokens": int(n)}

    def train(self, progress: bool = True) -> list[dict]:
        if self.features is not None:  # computes what a previous (killed) build did not
            self.features.build(self.model, self.cfg.batch_size * self.cfg.seq_len, self._autocast, progress)
        if self.step == 0 and not self.log:
            self.log.append({"step": 0, "tokens": 0, **self.evaluate()})
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc="distill", unit="step")
        t0, tok0 = time.perf_counter(), self.tokens_seen
        while self.step < self.total_steps:
            stats = self.train_step()
            entry = {"step": self.step, "tokens": self.tokens_seen, **stats}
            if self.step % self.cfg.eval_every == 0 or self.step == self.total_steps:
                entry.update(self.evaluate())
            self.log.append(entry)
            tps = (self.tokens_seen - tok0) / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(kl=f"{stats['kl']:.3f}", agree=f"{stats['agree']:.2f}", tok_s=f"{tps:.0f}",
                            **({"eval_agree": f"{entry['eval_agree']:.3f}"} if "eval_agree" in entry else {}))
            bar.update(1)
            if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                self.save()
        bar.close()
        return self.log
