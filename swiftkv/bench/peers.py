"""Optional benchmark peers: vLLM (plain, and with swiftkv's plugin on the SwiftKV checkpoint:
``vllm-swiftkv``), llama.cpp and OpenVINO GenAI, each in its own interpreter (usually its own venv).

None is a dependency of swiftkv. A peer's Python is found, in order, from ``--vllm-python`` /
``--llamacpp-python`` / ``--openvino-python``, the environment (``SWIFTKV_VLLM_PYTHON``,
``SWIFTKV_LLAMACPP_PYTHON``, ``SWIFTKV_OPENVINO_PYTHON``), or the current interpreter when it can import the
peer. ``scripts/install_peers.sh`` builds the venvs.
The peer runs ``peer_worker.py`` and stays alive, so its runs interleave with swiftkv's.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from swiftkv.bench.env import KV_CACHE_GIB
from swiftkv.bench.interleave import SystemFailed
from swiftkv.bench.peer_worker import TAG
from swiftkv.bench.process import ManagedProcess

PEER_TIMEOUT_S = float(os.environ.get("SWIFTKV_BENCH_PEER_TIMEOUT_S", "3600"))  # a start or run longer: hung
_MODULES = {"vllm": "vllm", "vllm-swiftkv": "vllm", "llama.cpp": "llama_cpp", "openvino": "openvino_genai"}
_ENV = {"vllm": "SWIFTKV_VLLM_PYTHON", "vllm-swiftkv": "SWIFTKV_VLLM_PYTHON", "llama.cpp": "SWIFTKV_LLAMACPP_PYTHON",
        "openvino": "SWIFTKV_OPENVINO_PYTHON"}


def find_peer_python(backend: str, explicit: str | None = None) -> str | None:
    """The interpreter that runs ``backend``, or None when it is not installed anywhere we look."""
    candidate = explicit or os.environ.get(_ENV[backend])
    if candidate:
        if not Path(candidate).exists():
            raise ValueError(f"{backend} interpreter {candidate!r} does not exist; point it at a venv's bin/python "
                             f"(see scripts/install_peers.sh)")
        return candidate
    import importlib.util

    return sys.executable if importlib.util.find_spec(_MODULES[backend]) else None


def _peer_env(backend: str, python: str, threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if backend.startswith("vllm"):
        # all `threads` cores for the model (vLLM reserves one for its front end by default)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(KV_CACHE_GIB)  # what our engines get (bench/env.py)
        iomp = venv_libiomp5(python)
        if iomp is not None and "LD_PRELOAD" not in env:  # vLLM's documented CPU setup
            env["LD_PRELOAD"] = str(iomp)
        # libiomp5's idle workers spin 200 ms after each parallel region by default, slowing whichever system
        # runs next; Intel's CPU tuning guides set 1 ms
        env.setdefault("KMP_BLOCKTIME", "1")
    return env


def venv_libiomp5(python: str) -> Path | None:
    """The ``lib/libiomp5.so`` of the environment ``python`` belongs to (intel-openmp installs it there), or None.
    The environment is found from the path as given: a venv's ``bin/python`` is a symlink to the base
    interpreter, and resolving it would look in the base installation instead."""
    prefix = Path(os.path.abspath(python)).parent.parent
    lib = prefix / "lib" / "libiomp5.so"
    return lib if lib.is_file() else None


class Peer:
    """A running peer process, a :class:`~swiftkv.bench.systems.System`: ``run(prompts, max_tokens)``
    returns ``wall_s``, ``ttft``, ``tpot`` measured by the peer's own clock (no IPC in them).

    A peer that crashes (llama.cpp builds have segfaulted on some CPUs), exits or does not answer within
    ``timeout_s`` raises :class:`~swiftkv.bench.interleave.SystemFailed` with its exit status and log tail;
    the benchmark reports it and goes on with the others."""

    def __init__(self, backend: str, python: str, model: str, threads: int, max_model_len: int = 4096,
                 max_num_seqs: int = 32, log_dir: str | None = None, dtype: str = "bfloat16",
                 prefix_caching: bool = False, name: str | None = None, timeout_s: float = 3600.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.backend, self.name, self.timeout_s = backend, name or backend, timeout_s
        started = time.perf_counter()
        worker = Path(__file__).with_name("peer_worker.py")
        log = Path(log_dir or tempfile.gettempdir()) / f"swiftkv-peer-{self.name}.log"
        self.log_path = log
        self.process = ManagedProcess(
            self.name, [python, str(worker), backend, model, "--threads", str(threads), "--max-model-len",
                        str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--dtype", dtype]
            + (["--prefix-caching"] if prefix_caching else []) + list(extra_args), _peer_env(backend, python, threads),
            log, pipes=True)
        self.proc = self.process.start()
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True, name=f"peer-{self.name}").start()
        try:
            hello = self._read()
        except SystemFailed as e:
            self.close()
            raise RuntimeError(f"{backend} failed to start: {e}") from None
        if "error" in hello:
            self.close()
            raise RuntimeError(f"{backend} failed to start: {hello['error']} (log: {log})")
        self.version = hello.get("version", "?")
        self.load_s = time.perf_counter() - started
        self.dtype = "gguf" if backend == "llama.cpp" else dtype

    def _pump(self) -> None:
        """Reader thread: the peer's stdout lines, then None at its end (so a read can time out)."""
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _failure(self, what: str) -> SystemFailed:
        return SystemFailed(f"{self.name} {what}; log {self.log_path}, last lines:\n{self.process.log_tail()}")

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                raise self._failure(f"did not answer within {self.timeout_s:.0f} s and was killed") from None
            if line is None:
                self.proc.wait()
                raise self._failure(f"exited ({self.process.how_it_ended()})")
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            self.process.log(line)  # the peer's own logging may share stdout

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # the peer is gone: say how
            pass
        out = self._read()
        if "error" in out:
            raise self._failure(f"answered an error: {out['error']}")
        return out

    def memory(self) -> dict[str, int]:
        """Resident and peak bytes of the peer's processes (vLLM runs its engine in a child process)."""
        return self.process.memory()

    def close(self) -> None:
        self.process.stop(grace_s=60)


@dataclass
class PeerSpec:
    """Where to find the peers and what model file each runs."""

    vllm_python: str | None = None
    llamacpp_python: str | None = None
    gguf: tuple[str, ...] = ()  # llama.cpp models (one system each); default: the built-in model's Q4_1 GGUF
    enabled: tuple[str, ...] = ("vllm", "vllm-swiftkv", "llama.cpp")
    openvino_python: str | None = None
    speculative_config: str | None = None  # JSON: each vLLM and llama.cpp peer also runs with it, as "<name>+ngram"

    def python_for(self, backend: str) -> str | None:
        """The interpreter given for ``backend`` (None: look in the environment)."""
        return {"llama.cpp": self.llamacpp_python, "openvino": self.openvino_python}.get(backend, self.vllm_python)


def start_peers(spec: PeerSpec, model_dir: Path, threads: int, max_model_len: int, max_num_seqs: int,
                log_dir: str | None = None, dtype: str = "bfloat16", prefix_caching: bool = False) -> dict[str, Peer]:
    """Start every enabled, installed peer on the original (non-SwiftKV) weights of ``model_dir``,
    vLLM in ``dtype`` (the same as swiftkv's, so no system is measured in an emulated dtype) and with
    prefix caching as ``prefix_caching`` says (emptied before every run);
    a peer that is missing or fails to start is reported and skipped."""
    peers: dict[str, Peer] = {}
    for backend in spec.enabled:
        python = find_peer_python(backend, spec.python_for(backend))
        if python is None:
            print(f"bench: {backend} not installed (see scripts/install_peers.sh); skipped", file=sys.stderr)
            continue
        try:
            if backend == "vllm":  # the original model
                models = {backend: str(plain_checkpoint(model_dir))}
            elif backend == "vllm-swiftkv":  # the SwiftKV checkpoint itself, through swiftkv's plugin in that venv
                models = {backend: str(model_dir)}
            elif backend == "openvino":  # the original model, exported once by that venv's optimum-intel
                models = {backend: str(openvino_model(model_dir, python))}
            else:
                files = gguf_for(model_dir, spec.gguf)
                models = {backend if len(files) == 1 else f"{backend}[{f.stem}]": str(f) for f in files}
        except (RuntimeError, ValueError) as e:
            print(f"bench: {backend} skipped: {e}", file=sys.stderr)
            continue
        if spec.speculative_config and backend != "openvino":  # the peer's own n-gram speculation beside it
            models.update({f"{name}+ngram": model for name, model in list(models.items())})
        for name, model in models.items():
            extra = ("--speculative-config", spec.speculative_config) if name.endswith("+ngram") else ()
            print(f"bench: starting {name} ({python}) on {model}", file=sys.stderr, flush=True)
            try:
                peers[name] = Peer(backend, python, model, threads, max_model_len, max_num_seqs, log_dir, dtype,
                                   prefix_caching, name, timeout_s=PEER_TIMEOUT_S, extra_args=extra)
            except (RuntimeError, ValueError) as e:
                print(f"bench: {name} skipped: {e}", file=sys.stderr)
    return peers


def gguf_for(model_dir: Path, gguf: tuple[str, ...] | str | None) -> list[Path]:
    """The GGUFs llama.cpp runs: ``gguf`` if given, else the built-in model's own Q4_1 file."""
    files = [gguf] if isinstance(gguf, str) else list(gguf or ())
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"--gguf {f!r} is not a file")
    if files:
        return [Path(f) for f in files]
    from swiftkv.builtin import find_gguf

    print(f"bench: llama.cpp runs the built-in model's GGUF; pass --gguf for {model_dir.name}", file=sys.stderr)
    return [find_gguf()]


def openvino_model(model_dir: Path, python: str) -> Path:
    """The original model of ``model_dir`` exported for OpenVINO GenAI by the ``optimum-cli`` beside ``python``
    (fp16 weights: without ``--weight-format`` it silently compresses to int8; OpenVINO computes in the dtype the
    peer asks for), built once in the cache; ``ValueError`` with the exporter's last lines if it fails."""
    from swiftkv.fileio import atomic_directory, cache_dir, stamp_matches, write_stamp

    plain = plain_checkpoint(model_dir)
    out = cache_dir() / "bench" / f"{model_dir.name}-openvino"
    stamp = f"{plain.resolve()} {os.stat(plain / 'config.json').st_mtime_ns}"
    if stamp_matches(out, stamp):
        return out
    cli = Path(os.path.abspath(python)).parent / "optimum-cli"
    print(f"bench: exporting {plain.name} for OpenVINO ({cli})", file=sys.stderr, flush=True)
    with atomic_directory(out, overwrite=True) as tmp:
        done = subprocess.run([str(cli), "export", "openvino", "--model", str(plain), "--weight-format", "fp16",
                               "--task", "text-generation-with-past", str(tmp)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise ValueError(f"optimum-cli could not export {plain} for OpenVINO:\n{tail}")
    write_stamp(out, stamp)
    return out


def plain_checkpoint(model_dir: Path) -> Path:
    """The original model of a SwiftKV checkpoint as a plain Llama/Qwen2 directory that other engines load
    (:func:`swiftkv.transform.original_checkpoint`), built once in the cache; other checkpoints as they are."""
    from swiftkv.fileio import cache_dir, stamp_matches, write_stamp
    from swiftkv.models.loader import load_config
    from swiftkv.transform import original_checkpoint

    if not getattr(load_config(model_dir), "swiftkv", False):
        return model_dir
    out = cache_dir() / "bench" / f"{model_dir.name}-plain"
    stamp = f"{model_dir.resolve()} {os.stat(model_dir / 'config.json').st_mtime_ns}"
    if not stamp_matches(out, stamp):
        original_checkpoint(model_dir, out, overwrite=True)
        write_stamp(out, stamp)
    return out
