"""Dynamic batching with admission control: one ``Lane`` per model.

A request becomes a ``Job`` on the lane's queue. The lane's dispatcher task
takes the first waiting job, waits up to ``max_wait_ms`` for more (or until
the batch is full: ``max_batch_size`` inputs, ``max_batch_tokens`` tokens),
and runs the batch in the lane's own worker threads (``max_concurrency`` of
them: the seed's semaphore) so the event loop never blocks — tallow's kernels
release the GIL. While every worker is busy, jobs keep arriving and the next
batch is fuller: batching grows with load by itself. A lone request on an
idle lane whose previous request came more than ``max_wait_ms`` earlier
starts at once: waiting for company that is not coming only adds latency.

Admission is bounded: at most ``max_queue`` jobs wait or run. Job
``max_queue + 1`` gets ``Overloaded`` (HTTP 429 with Retry-After: the queue's
depth over its measured drain rate) at once — never an unbounded backlog;
the shedding middleware (``serve.shedding``) asks ``refuse()`` before the
request's body is even read. A job whose request timed out or went away is
marked cancelled: if it has not started it is dropped, if it is running the
batch function may stop early (generation checks between tokens).

Only jobs with the same ``key`` share a batch (an image add never shares
one with searches). Completions do not batch here: the generator's
scheduler batches them step by step (``serve.generation``); ``Gate`` bounds
how many wait or run.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


class DrainRate:
    """How fast a queue empties: completions per second over the last
    ``window_s`` seconds. ``retry_after(depth)`` is the wait a refused client
    is told (Retry-After): the time the work ahead of it takes to drain at
    that rate, 1 s at least and ``max_s`` at most."""

    def __init__(self, window_s: float = 10.0, max_s: int = 60):
        self.window_s = window_s
        self.max_s = max_s
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def record(self, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self._done.append((now, n))
            while self._done and now - self._done[0][0] > self.window_s:
                self._done.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._done if now - t <= self.window_s]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(1.0, now - recent[0][0])

    def retry_after(self, depth: int) -> int:
        rate = self.per_second()
        if rate <= 0:  # nothing finished lately: a long job holds the queue
            return min(self.max_s, 5)
        return max(1, min(self.max_s, math.ceil(depth / rate)))


class Overloaded(Exception):
    """The lane's queue is full."""

    def __init__(self, lane: str, limit: int, retry_after_s: int):
        super().__init__(f"the {lane} queue is full ({limit} requests waiting or running); retry later")
        self.lane = lane
        self.retry_after_s = retry_after_s


class Gate:
    """Admission without batching: at most ``max_queue`` requests wait or
    run; ``enter()`` raises ``Overloaded`` past that, ``leave()`` when done."""

    def __init__(self, name: str, max_queue: int, observe_depth: Callable[[str, int], None] | None = None):
        self.name = name
        self.max_queue = max_queue
        self.depth = 0
        self.drain = DrainRate()
        self._observe_depth = observe_depth or (lambda lane, depth: None)

    def refuse(self) -> int | None:
        return self.drain.retry_after(self.depth) if self.depth >= self.max_queue else None

    def enter(self) -> None:
        retry_after = self.refuse()
        if retry_after is not None:
            raise Overloaded(self.name, self.max_queue, retry_after)
        self.depth += 1
        self._observe_depth(self.name, self.depth)

    def leave(self) -> None:
        self.depth -= 1
        self.drain.record(1)
        self._observe_depth(self.name, self.depth)


class LaneTimeout(Exception):
    """The job did not finish within the request timeout."""


class LaneClosed(Exception):
    """The lane is shutting down and takes no new jobs."""


@dataclass(eq=False)
class Job:
    payload: Any
    size: int
    tokens: int
    key: Hashable
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue | None = None  # for streaming jobs

    def emit(self, event: Any) -> None:
        """Called from a worker thread: hands one streamed item to the request."""
        if self.events is not None and not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


BatchFn = Callable[[Sequence[Job]], Sequence[Any]]


def _fail(job: Job, exc: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
    if job.events is not None:
        job.events.put_nowait(None)


class Lane:
    """``Lane(name, run_batch, config, observe_batch=None, observe_depth=None)``

    ``run_batch(jobs)`` runs in a worker thread and returns one result per job
    (an ``Exception`` instance fails only that job)."""

    def __init__(self, name: str, run_batch: BatchFn, config, *,
                 observe_batch: Callable[[str, int], None] | None = None,
                 observe_depth: Callable[[str, int], None] | None = None):
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._observe_batch = observe_batch or (lambda lane, size: None)
        self._observe_depth = observe_depth or (lambda lane, depth: None)
        self._pending: collections.deque[Job] = collections.deque()
        self._admitted = 0  # jobs waiting or running
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrency,
                                            thread_name_prefix=f"tallow-{name}")
        self._slots: asyncio.Semaphore | None = None
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task] = set()
        self._closed = False
        self.drain = DrainRate()  # for Retry-After
        self._last_arrival = self._previous_arrival = float("-inf")

    # -- admission -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._admitted

    def refuse(self) -> int | None:
        """Retry-After seconds when the queue is full (the next job would be
        refused), else None: the shedding middleware asks before reading a body."""
        if self._admitted < self.config.max_queue:
            return None
        return self.drain.retry_after(self._admitted)

    def _start(self) -> None:
        """Starts the dispatcher on the running loop — again if the app now runs
        on another loop (an app object served twice, a test client per request):
        asyncio primitives belong to the loop that made them."""
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._loop is not loop or self._dispatcher.done():
            for job in self._pending:  # jobs of a loop that is gone can never be answered
                job.loop.call_soon_threadsafe(_fail, job, LaneClosed("the event loop of this request stopped"))
            self._release(len(self._pending))
            self._pending.clear()
            self._loop = loop
            self._slots = asyncio.Semaphore(self.config.max_concurrency)
            self._wakeup = asyncio.Event()
            self._running = set()
            self._dispatcher = loop.create_task(self._dispatch(), name=f"lane-{self.name}")

    def enqueue(self, payload: Any, *, size: int = 1, tokens: int = 0, key: Hashable = None,
                stream: bool = False) -> Job:
        """Admits a job or raises ``Overloaded`` / ``LaneClosed``."""
        if self._closed:
            raise LaneClosed(f"the server is shutting down; the {self.name} lane takes no new requests")
        self._start()
        retry_after = self.refuse()
        if retry_after is not None:
            raise Overloaded(self.name, self.config.max_queue, retry_after)
        loop = asyncio.get_running_loop()
        job = Job(payload, size, tokens, key, loop.create_future(), loop,
                  events=asyncio.Queue() if stream else None)
        self._previous_arrival, self._last_arrival = self._last_arrival, job.enqueued
        self._pending.append(job)
        self._admitted += 1
        self._observe_depth(self.name, self._admitted)
        self._wakeup.set()
        return job

    async def submit(self, payload: Any, *, size: int = 1, tokens: int = 0, key: Hashable = None,
                     timeout: float | None = None) -> Any:
        """Runs ``payload`` in a batch and returns its result."""
        job = self.enqueue(payload, size=size, tokens=tokens, key=key)
        return await self.wait(job, timeout)

    async def wait(self, job: Job, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self.cancel(job)
            raise LaneTimeout(f"the {self.name} request did not finish within {timeout:g} s") from None
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        """The request gave up: drop the job if it has not started."""
        job.cancelled.set()
        try:
            self._pending.remove(job)
        except ValueError:
            return  # running (the batch function may notice) or done
        self._release(1)
        if not job.future.done():
            job.future.cancel()

    def _release(self, n: int) -> None:
        self._admitted -= n
        self._observe_depth(self.name, self._admitted)

    # -- dispatch --------------------------------------------------------------------

    def _full(self) -> bool:
        size = tokens = 0
        first = self._pending[0]
        for job in self._pending:
            if job.key != first.key:
                continue
            size += job.size
            tokens += job.tokens
            if size >= self.config.max_batch_size or tokens >= self.config.max_batch_tokens:
                return True
        return False

    def _take(self) -> list[Job]:
        """The first job plus the following same-key jobs that fit."""
        first = self._pending.popleft()
        batch, size, tokens = [first], first.size, first.tokens
        keep: list[Job] = []
        while self._pending:
            job = self._pending.popleft()
            fits = (size + job.size <= self.config.max_batch_size
                    and tokens + job.tokens <= self.config.max_batch_tokens)
            if job.key == first.key and fits:
                batch.append(job)
                size += job.size
                tokens += job.tokens
            else:
                keep.append(job)
                if job.key == first.key:
                    break  # full: keep arrival order for the rest
        self._pending.extendleft(reversed(keep))
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            # Wait for company only when it is likely to come: a batch is
            # running, or the previous request arrived within max_wait. A lone
            # request on an idle lane (one client, light traffic) starts at
            # once instead of paying max_wait for nothing.
            idle = not self._running and len(self._pending) == 1
            quiet = first.enqueued - self._previous_arrival > max_wait
            deadline = first.enqueued + (0.0 if idle and quiet else max_wait)
            while self._pending and not self._full():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            await self._slots.acquire()  # the concurrency limit; jobs keep queueing meanwhile
            if not self._pending:
                self._slots.release()
                continue
            batch = self._take()
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._observe_batch(self.name, sum(j.size for j in batch))
            results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: the batch function returned {len(results)} results "
                                   f"for {len(batch)} jobs")
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        except BaseException as exc:  # the whole batch failed
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.drain.record(len(batch))
            self._slots.release()
            self._release(len(batch))
            for job in batch:
                if job.events is not None:
                    job.events.put_nowait(None)  # end of stream
            if self._wakeup is not None:
                self._wakeup.set()

    async def close(self, timeout: float = 30.0) -> None:
        """Stops admitting, lets queued and running jobs finish (up to ``timeout``)."""
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.set()
        deadline = time.monotonic() + timeout
        if self._dispatcher is not None:  # it drains the queue, then returns
            await asyncio.wait([self._dispatcher], timeout=timeout)
        while self._running and time.monotonic() < deadline:  # batches it started meanwhile
            await asyncio.wait(list(self._running), timeout=max(0.0, deadline - time.monotonic()))
        for t in [self._dispatcher, *self._running]:
            if t is not None and not t.done():
                t.cancel()
        # Past the deadline: whoever still waits gets an answer, not a hang.
        for job in self._pending:
            _fail(job, LaneClosed(f"the server shut down before this {self.name} request ran"))
        self._release(len(self._pending))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
