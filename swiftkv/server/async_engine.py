"""One engine loop shared by all HTTP requests: a background thread steps the engine and hands
outputs to each request's mailbox (bounded for slow readers). Bounded waiting queue, aborts, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from swiftkv.engine.llm_engine import EngineStepError, LLMEngine
from swiftkv.outputs import RequestOutput
from swiftkv.platforms import release_openmp_threads
from swiftkv.sampling_params import SamplingParams
from swiftkv.server.metrics import Metrics


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine is shutting down or was stopped."""


class OutputMailbox:
    """Where the engine thread leaves one HTTP request's outputs for its handler, in order. A reader that keeps
    up gets every step's output (one streamed chunk per token); for a reader that falls behind -- a client that
    stops reading its socket -- at most ``keep`` outputs per engine request wait, a newer one superseding the
    oldest (outputs are cumulative, so nothing is lost: the next chunk carries several tokens). Its memory is
    bounded however slowly the client reads. ``put_nowait`` runs on the event loop (the engine thread hands
    items over with ``call_soon_threadsafe``)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._items: deque[RequestOutput | BaseException] = deque()
        self._count: dict[str, int] = {}
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            rid = item.request_id
            if self._count.get(rid, 0) >= self.keep:  # superseded: drop the oldest of this request's outputs
                self._items.remove(next(x for x in self._items if isinstance(x, RequestOutput) and x.request_id == rid))
            else:
                self._count[rid] = self._count.get(rid, 0) + 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, RequestOutput):
            self._count[item.request_id] -= 1
        return item

    def qsize(self) -> int:
        return len(self._items)


@dataclass
class _Request:
    queue: OutputMailbox
    loop: asyncio.AbstractEventLoop
    n: int = 1  # sequences (samples) it runs
    tokens: int = 0  # generated so far, all samples
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self._pending: deque[tuple[str, str, tuple | None]] = deque()  # thread-safe appends/pops
        self._wake = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._accepting = True
        self._stop = False
        self._stats = self._read_stats()  # the engine thread's snapshot, replaced whole after every step
        # the engine thread runs every parallel op from here on: free this thread's OpenMP workers, or libgomp
        # (more workers than CPUs) sleeps its workers between regions and every step runs 1.4-1.9x slower
        release_openmp_threads()
        self._thread = threading.Thread(target=self._loop, name="swiftkv-engine", daemon=True)
        self._thread.start()

    # -- called from the event loop -----------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, queue: OutputMailbox | None = None,
               arrival: float | None = None, cache_salt: str | None = None) -> OutputMailbox:
        """Queue a request; outputs (or an exception) arrive on ``queue`` (new if not given). ``arrival``
        (``time.monotonic()``, default now) is when the client's request came in: the TTFT metric counts from it.

        Never blocks on a running engine step: the engine thread picks the request up.
        """
        if not self._accepting:
            raise EngineDeadError("server is shutting down")
        self.engine.check_request(prompt_token_ids, params)  # ValueError -> 400
        # sequences in flight beyond the running slots = really waiting (requests still on their way
        # to the scheduler count too; a burst must not be refused while running slots are free)
        in_flight = sum(r.n for r in list(self._requests.values()))
        if in_flight + params.n - self.engine.scheduler.max_num_seqs > self.max_waiting:
            self.metrics.rejected.inc()
            raise QueueFullError(f"{self.max_waiting} sequences already waiting")
        req = _Request(queue or OutputMailbox(), asyncio.get_running_loop(), params.n,
                       arrival=time.monotonic() if arrival is None else arrival)
        self._requests[request_id] = req
        self._pending.append(("add", request_id, (prompt_token_ids, params, prompt, cache_salt)))
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        self._wake.set()
        return req.queue

    def abort(self, request_id: str) -> None:
        """Abort (client gone, timeout); its KV blocks are freed by the engine thread."""
        if self._requests.pop(request_id, None) is not None:
            self._pending.append(("abort", request_id, None))
            self.metrics.requests.labels("abort").inc()
            self._wake.set()

    def stats(self) -> dict:
        """The scheduler's and KV cache's counters as the engine thread last published them (after its latest
        step): never read across threads while a step changes them."""
        return dict(self._stats)

    def _read_stats(self) -> dict:  # engine thread (or before it starts)
        sched, bm = self.engine.scheduler, self.engine.block_manager
        return {"running": len(sched.running), "waiting": len(sched.waiting),
                "kv_blocks_used": bm.num_used_blocks, "kv_blocks_free": bm.num_free_blocks,
                "prefix_cache_queried_tokens": bm.num_queried_tokens, "prefix_cache_hit_tokens": bm.num_hit_tokens,
                "prefix_cache_hit_rate": bm.prefix_cache_hit_rate, **self._spec_stats()}

    def _spec_stats(self) -> dict:
        s = self.engine.spec_stats
        return {"spec_decode_num_drafts": s.num_drafts, "spec_decode_num_draft_tokens": s.num_draft_tokens,
                "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
                "spec_decode_mean_acceptance_length": s.mean_acceptance_length}

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish for ``grace_s``, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._requests):
            req = self._requests.get(rid)
            self.abort(rid)
            if req is not None:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, EngineDeadError("server shut down"))
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    # -- engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            deliveries = self._apply_pending()
            busy = self.engine.has_unfinished_requests()
            outputs, failed = [], None
            if busy:
                try:
                    outputs = self.engine.step()
                except EngineStepError as e:  # the failed requests alone; the others' outputs go on
                    outputs, failed = e.outputs, e
            deliveries += self._collect(outputs, failed)
            for req, item in deliveries:
                req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
            self._stats = self._read_stats()  # after every step (and every add or abort)
            if deliveries or busy:
                self.metrics.set_state(self._stats)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _apply_pending(self) -> list:
        failed = []
        while self._pending:
            op, rid, args = self._pending.popleft()
            if op == "abort":
                self.engine.abort_request(rid)
            elif rid in self._requests:  # not aborted before it started
                try:
                    self.engine.add_request(args[0], args[1], rid, args[2], args[3])
                except ValueError as e:
                    failed.append((self._requests.pop(rid), e))
        return failed

    def _collect(self, outputs: list[RequestOutput], failed: EngineStepError | None):
        now = time.monotonic()
        deliveries = []
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:
                continue
            if req.first_token is None:
                req.first_token = now
                self.metrics.ttft.observe(now - req.arrival)
            elif req.last_token is not None:
                self.metrics.tpot.observe(now - req.last_token)
            req.last_token = now
            tokens = sum(len(c.token_ids) for c in out.outputs)
            self.metrics.generation_tokens.inc(tokens - req.tokens)
            req.tokens = tokens
            if out.finished:
                del self._requests[out.request_id]
                self.metrics.requests.labels(out.outputs[0].finish_reason or "stop").inc()
            deliveries.append((req, out))
        if failed is not None:
            for rid in failed.request_ids:
                req = self._requests.pop(rid, None)
                if req is not None:
                    self.metrics.requests.labels("error").inc()
                    deliveries.append((req, failed))
        return deliveries
