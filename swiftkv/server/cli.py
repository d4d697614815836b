"""``swiftkv serve``: the OpenAI-compatible HTTP server (:mod:`swiftkv.server.app`) over one :class:`~swiftkv.LLM`."""

from __future__ import annotations

import argparse
import sys

from swiftkv.cli_args import DTYPE_HELP, check_range
from swiftkv.models.registry import DEFAULT_SWIFTKV_MODEL


def cmd_serve(args) -> None:
    import os

    import uvicorn

    from swiftkv.llm import LLM
    from swiftkv.server.app import build_app

    check_serve_args(args)
    llm = LLM(args.model, swiftkv=args.swiftkv, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=int(args.kv_cache_gb * (1 << 30)),
              enable_prefix_caching=args.enable_prefix_caching, prefill_batch_tokens=args.prefill_batch_tokens or None,
              speculative_config=args.speculative_config)
    name = args.served_model_name or (args.model and os.path.basename(os.path.normpath(str(args.model)))) \
        or DEFAULT_SWIFTKV_MODEL
    api_key = args.api_key if args.api_key is not None else os.environ.get("SWIFTKV_API_KEY")  # "" is refused
    app = build_app(llm, name, api_key=api_key, max_waiting=args.max_waiting, request_timeout=args.request_timeout,
                    enable_docs=args.enable_docs, max_request_bytes=args.max_request_bytes)
    print(f"serving {name} (swiftkv={llm.swiftkv}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)


def check_serve_args(args) -> None:
    """Every number of ``swiftkv serve``'s command line, and the key, checked before the model is loaded."""
    check_range("--port", args.port, 0, 65535)
    check_range("--kv-cache-gb", args.kv_cache_gb, 0, low_open=True)
    check_range("--max-num-seqs", args.max_num_seqs, 1)
    check_range("--max-num-batched-tokens", args.max_num_batched_tokens, 1)
    check_range("--prefill-batch-tokens", args.prefill_batch_tokens, 0)
    check_range("--max-waiting", args.max_waiting, 0)
    check_range("--max-request-bytes", args.max_request_bytes, 1)
    check_range("--request-timeout", args.request_timeout, 0, low_open=True)
    if args.speculative_config is not None:
        from swiftkv.engine.spec_decode import SpeculativeConfig

        SpeculativeConfig.parse(args.speculative_config)  # "--speculative-config: ..." before the model loads
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty (an unset shell variable?); give a non-empty key, or leave it out")


def add_parsers(sub) -> None:
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
    p.add_argument("--prefill-batch-tokens", type=int, default=256,
                   help="once a step holds prompt tokens, another waiting prompt joins it only within this many, so "
                        "the oldest prompt's first token comes sooner (shorter prompts still batch); 0: no cap")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes seen before (default on; /metrics has the hit rate)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued beyond the --max-num-seqs running slots before 429")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--enable-docs", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /docs and /openapi.json (default: only without --api-key)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (504)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='prompt-lookup speculative decoding, vLLM\'s syntax: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (default off; '
                        'a request may lower it with "num_speculative_tokens"; /metrics has the acceptance)')
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)
