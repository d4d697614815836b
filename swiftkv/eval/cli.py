"""``swiftkv eval`` and ``swiftkv lm-eval`` subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swiftkv.eval.config import BUDGETS, EvalConfig
from swiftkv.eval.tasks import ALL_TASKS


def cmd_eval(args) -> None:
    from swiftkv.eval.runner import format_table, run_eval

    tasks = ALL_TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = EvalConfig.from_budget(args.budget, model=args.model, tasks=tasks, limit=args.limit,
                                 gsm8k_limit=args.gsm8k_limit, lambada_limit=args.lambada_limit,
                                 chat_prompts=args.chat_prompts, seed=args.seed, dtype=args.dtype,
                                 max_batch_tokens=args.max_batch_tokens, distribution=not args.no_distribution,
                                 generation=not args.no_generation, data=args.data)
    out = Path(args.out) if args.out else Path("eval_results") / Path(args.model or "default-swiftkv").name
    result = run_eval(cfg, out)
    print(format_table(result))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}", file=sys.stderr)


def cmd_lm_eval(args) -> None:
    """Run lm-evaluation-harness with the SwiftKV transformers classes registered."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    from swiftkv.models.hf import register

    register()  # llama_swiftkv / qwen2_swiftkv in transformers' Auto classes

    sys.argv = ["lm_eval", *args.lm_eval_args]
    cli_evaluate()


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="quality of a SwiftKV model vs its teacher on real benchmarks")
    p.add_argument("model", nargs="?", default=None, help="SwiftKV checkpoint (default: the default SwiftKV model)")
    p.add_argument("--tasks", default="all", help=f"comma-separated, or 'all': {','.join(ALL_TASKS)}")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help="how much of each benchmark: quick = seeded 100-item subsets (minutes); judge = full sets, "
                        "2,000 HellaSwag items (about +-1 point on the above-chance average; hours on a CPU). "
                        "The limits below override it")
    p.add_argument("--limit", type=int, default=None,
                   help="items per multiple-choice task, every task (seeded subset; 0 = all; quick: 100)")
    p.add_argument("--gsm8k-limit", type=int, default=None,
                   help="GSM8K questions (0 = all 1319; quick: 20, judge: 200)")
    p.add_argument("--lambada-limit", type=int, default=None,
                   help="LAMBADA passages (0 = all 5153; quick: 100, judge: 1000)")
    p.add_argument("--chat-prompts", type=int, default=EvalConfig.chat_prompts,
                   help="held-out chat prompts for greedy agreement (default %(default)s)")
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=EvalConfig.dtype)
    p.add_argument("--max-batch-tokens", type=int, default=EvalConfig.max_batch_tokens,
                   help="tokens per log-likelihood forward")
    p.add_argument("--no-distribution", action="store_true", help="skip held-out KL/agreement and LAMBADA")
    p.add_argument("--no-generation", action="store_true", help="skip chat agreement and instructions")
    p.add_argument("--data", default=None, help="held-out chats source (default: ShareGPT, as distillation)")
    p.add_argument("--out", default=None, help="output directory (default: eval_results/<model name>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness with SwiftKV checkpoints loadable (args pass through)",
                       add_help=False)
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
