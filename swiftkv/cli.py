"""``swiftkv`` command line: convert | generate (more subcommands arrive with the engine)."""

from __future__ import annotations

import argparse
import sys
import time

from swiftkv.models.default import DEFAULT_MODEL


def _add_swiftkv_layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-key-value-layers", "-l", type=int, help="l: layers that keep their own KV")
    g.add_argument("--swiftkv-fraction", type=float, help="fraction of layers made SwiftKV (default 0.5)")
    p.add_argument("--key-value-group-size", "-G", type=int, default=1, help="AcrossKV group size G (default 1)")


def layout_from_args(args, num_layers: int):
    from swiftkv.config import SwiftKVConfig

    if args.num_key_value_layers is not None:
        return SwiftKVConfig(num_layers, args.num_key_value_layers, args.key_value_group_size)
    fraction = 0.5 if args.swiftkv_fraction is None else args.swiftkv_fraction
    return SwiftKVConfig.from_fraction(num_layers, fraction, args.key_value_group_size)


def cmd_convert(args) -> None:
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    base, path = load_model(args.model, dtype=args.dtype)
    if not base.swiftkv_config.is_baseline:
        raise ValueError(f"{path} is already a SwiftKV checkpoint (l={base.swiftkv_config.num_key_value_layers}).")
    skv = layout_from_args(args, base.config.num_hidden_layers)
    model = to_swiftkv(base, skv)
    out = save_checkpoint(model, args.out, source_dir=path)
    print(
        f"wrote {out}: l={skv.num_key_value_layers} of L={skv.num_layers}, G={skv.key_value_group_size}, "
        f"KV bytes/token {skv.kv_bytes_ratio:.3f}x of the original"
    )


def cmd_generate(args) -> None:
    from swiftkv.models.full_sequence import greedy_generate
    from swiftkv.models.loader import load_model, load_tokenizer

    model, path = load_model(args.model, dtype=args.dtype, swiftkv=args.swiftkv)
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": args.prompt}]
    if args.raw or not getattr(tok, "chat_template", None):
        ids = tok(args.prompt)["input_ids"]
    else:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    t0 = time.perf_counter()
    out = greedy_generate(model, list(ids), args.max_tokens, {tok.eos_token_id})
    dt = time.perf_counter() - t0
    print(tok.decode(out, skip_special_tokens=True))
    print(f"[{len(out)} tokens in {dt:.2f}s, swiftkv={model.swiftkv_enabled}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="turn a Llama-family checkpoint into an (undistilled) SwiftKV checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model dir, hub id or {DEFAULT_MODEL}")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint's), float32, bfloat16")
    _add_swiftkv_layout_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--swiftkv", action=argparse.BooleanOptionalAction, default=None,
                   help="SwiftKV path (default: the checkpoint's mode); --no-swiftkv runs the original model")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"swiftkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
