"""``swiftkv`` command line: convert | generate | distill | distill-data | distill-report | serve | bench | eval |
lm-eval."""

# convert and generate are here; the others live beside their code (swiftkv/{distill,server,bench,eval}/cli.py)
# and register through add_parsers(sub); argument helpers they share are in swiftkv/cli_args.py.

from __future__ import annotations

import argparse
import sys
import time

from swiftkv.bench.cli import add_parsers as add_bench_parsers
from swiftkv.cli_args import DTYPE_HELP, add_swiftkv_layout_args, layout_request
from swiftkv.distill.cli import add_parsers as add_distill_parsers
from swiftkv.eval.cli import add_parsers as add_eval_parsers
from swiftkv.models.registry import DEFAULT_MODEL, DEFAULT_SWIFTKV_MODEL
from swiftkv.server.cli import add_parsers as add_serve_parsers


def cmd_convert(args) -> None:
    from pathlib import Path

    from swiftkv.builtin import resolve_model
    from swiftkv.fileio import check_replaceable
    from swiftkv.models.loader import load_config
    from swiftkv.platforms import resolve_dtype
    from swiftkv.transform import convert_checkpoint

    check_replaceable(Path(args.out), args.overwrite)  # before the slow part
    path = resolve_model(args.model)
    config = load_config(path)
    if getattr(config, "swiftkv", False):
        raise ValueError(f"{path} is already a SwiftKV checkpoint (l={config.num_key_value_layers}).")
    skv = layout_request(args).for_layers(config.num_hidden_layers)
    dtype = None if args.dtype == "checkpoint" else resolve_dtype(args.dtype)
    out = convert_checkpoint(path, args.out, skv, dtype, args.overwrite, args.max_shard_size)
    print(
        f"wrote {out}: l={skv.num_key_value_layers} of L={skv.num_layers}, G={skv.key_value_group_size}, "
        f"KV bytes/token {skv.kv_bytes_ratio:.3f}x of the original"
    )


def cmd_generate(args) -> None:
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    llm = LLM(args.model, swiftkv=args.swiftkv, dtype=args.dtype, speculative_config=args.speculative_config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    prompt = args.prompt if args.raw else llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    t0, printed, n = time.perf_counter(), 0, 0
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        print(text[printed:], end="", flush=True)
        printed, n = len(text), len(out.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    print()
    spec = llm.engine.spec_stats
    drafts = f", {spec.mean_acceptance_length:.2f} tokens per verification" if spec.num_drafts else ""
    print(f"[{n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s), swiftkv={llm.swiftkv}, "
          f"finish={out.outputs[0].finish_reason}{drafts}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="turn a Llama-family checkpoint into an (undistilled) SwiftKV checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model dir, hub id or {DEFAULT_MODEL}")
    p.add_argument("--out", required=True, help="output directory (written atomically; must be new, empty or a "
                   "swiftkv checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is a file or another directory")
    p.add_argument("--dtype", default="checkpoint", help="checkpoint (keep the checkpoint's), float32, bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB, as transformers)")
    add_swiftkv_layout_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="stream a reply to one prompt (chat template applied)")
    p.add_argument("model", nargs="?", default=None, help=f"default: the default SwiftKV model {DEFAULT_SWIFTKV_MODEL}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--swiftkv", action=argparse.BooleanOptionalAction, default=None,
                   help="SwiftKV path (default: the checkpoint's mode); --no-swiftkv runs the original model")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='prompt-lookup speculative decoding (vLLM\'s syntax), e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\'')
    p.set_defaults(func=cmd_generate)

    add_distill_parsers(sub)
    add_serve_parsers(sub)
    add_bench_parsers(sub)

    add_eval_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # everything after `lm-eval` belongs to lm-evaluation-harness
        args.lm_eval_args = [*extra, *args.lm_eval_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from swiftkv.engine.llm_engine import EngineStepError

    try:
        args.func(args)
    except ValueError as e:
        print(f"swiftkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except EngineStepError as e:  # the request itself failed (e.g. its sampling found no finite distribution)
        print(f"swiftkv {args.command}: error: the request failed: {e.cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
