"""One managed child process under the benchmark's peers and servers: started with its output in a log file,
asked how it ended, measured (resident and peak bytes of its process tree) and stopped gracefully, then by force.

:class:`~swiftkv.bench.peers.Peer` talks to its process over pipes (``pipes=True``: stdin and stdout are pipes,
stderr goes to the log) and stops it by closing stdin; :class:`~swiftkv.bench.servers.Server` runs a server in
its own session (stdout and stderr to the log) and stops it with SIGINT to the process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from swiftkv.bench.env import log_tail, tree_memory


class ManagedProcess:
    """A child process and its log (``log_path``: truncated at start, or appended to with ``append_log``)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, pipes: bool = False,
                 append_log: bool = False) -> None:
        self.name, self.argv, self.env, self.log_path, self.pipes = name, argv, env, Path(log_path), pipes
        self.append_log = append_log
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.started_at: float | None = None

    def start(self) -> subprocess.Popen:
        """Start it (a server in its own session, so a stop reaches its children too)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a" if self.append_log else "w")  # noqa: SIM115 -- open while it runs
        if self.append_log:  # restarts append: mark each start
            self._log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n")
            self._log.flush()
        pipe = subprocess.PIPE if self.pipes else None
        self.proc = subprocess.Popen(self.argv, stdin=pipe, stdout=pipe if self.pipes else self._log,
                                     stderr=self._log if self.pipes else subprocess.STDOUT, env=self.env,
                                     text=True, start_new_session=not self.pipes)
        self.started_at = time.perf_counter()
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def how_it_ended(self) -> str | None:
        """``"code N"`` or ``"signal NAME"`` once it has exited; None while it runs."""
        if self.proc is None or (code := self.proc.poll()) is None:
            return None
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"

    def log(self, text: str) -> None:
        """Add ``text`` to its log (a peer's own logging that shares its stdout)."""
        self._log.write(text)

    def log_tail(self, n: int = 15) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return log_tail(self.log_path, n)

    def memory(self) -> dict[str, int]:
        """Resident and peak bytes of its process tree (zeros once it has exited)."""
        return tree_memory(self.proc.pid) if self.running else {"rss": 0, "peak": 0}

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        """Ask it to end (pipes: close its stdin; a server: SIGINT to its process group), kill it after
        ``grace_s``, and close the log."""
        try:
            if self.running:
                if self.pipes:
                    try:
                        self.proc.stdin.close()
                    except OSError:
                        pass
                    try:
                        self.proc.wait(timeout=grace_s)
                    except subprocess.TimeoutExpired:
                        self.kill()
                else:
                    self._signal_group(grace_s)
        finally:
            if self._log is not None:
                self._log.close()

    def _signal_group(self, grace_s: float) -> None:
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return
