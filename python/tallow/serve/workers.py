"""Where the models run: in worker processes of their own (``workers.mode =
"process"``, the default) or inside the server's process (``"inline"``).

The server process parses, validates, tokenizes and batches; a worker owns
a model's weights and runs its forward passes (``tallow.worker``), so the
event loop never waits for the GIL behind a forward pass. Every model slot
has a ``WorkerGroup`` of ``workers.<slot>`` processes (a request goes to the
one with the fewest calls in flight), and the routes see a ``ServedModel``:
the same methods as the model (``embed_ids``, ``classify_ids``,
``features``, ``generate``...), its tokenizer and config, whichever mode.

Faults: a worker that dies (killed, out of memory, a crash in native code)
is noticed at once — its socket closes —, every call and generation it had
in flight fails with ``WorkerDied`` (HTTP 503, never a hang), and its place
in the group is restarted: one restart at a time per place, one attempt per
``WorkerGroup.RESTART_BACKOFF_S`` entry (the wait before it). While no
worker of the slot runs, it is "restarting" (``/ready`` says 503); it is
ready again when one has loaded. When every attempt failed (the model was
moved away, the disk is full) the place is given up for good and logged:
with no worker left the slot is "failed" with the last load error, and stays
so until tallow is restarted — a model that cannot load is an operator's
fix, and retrying forever would only hide it behind a loop of processes.
State that matters (documents, the index, the store) lives in the server
process, so a worker's death loses none.

A consumer of a request's events (a "sink") that raises fails that request
only: it is logged, forgotten and cancelled in the worker; the worker and
its other requests carry on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ..errors import Unavailable
from ..worker import (Arena, Call, Cancel, Error, Events, Generate, LoadFailed, ModelHost, Ready, Result, Start,
                      Stop, WorkerSpec, from_wire, load_model, to_wire)

log = logging.getLogger("tallow.serve")

_arena_ids = itertools.count()
_WORKER_MAIN = "import sys; from tallow.worker import main; sys.exit(main(sys.argv[1:]))"

# A sink receives one request's events (a list of RowEvent) or, when the
# worker died, the exception to fail the request with.
Sink = Callable[[Any], None]


class WorkerDied(Unavailable):
    """The worker process running this request exited; it is being restarted."""


class WorkerStartError(RuntimeError):
    """A worker process could not load its model."""


class SinkFailed(RuntimeError):
    """The consumer of this request's events raised; the request was cancelled."""


def _deliver(slot: str, request_id: Any, sink: Sink, item: Any) -> bool:
    """Hands ``item`` to ``sink``; False (logged) when the sink raised. A
    sink's bug is its request's failure, never the worker's."""
    try:
        sink(item)
        return True
    except Exception:
        log.exception("the %s request %r could not take its events: failing that request only", slot, request_id)
        return False


def _dispatch(slot: str, events: list, sinks: dict, cancel: Callable[[Any], None]) -> None:
    """One decode step's events to their requests' sinks; a request whose sink
    raises is cancelled in the worker and told so (the others carry on)."""
    for request_id, evs in _by_request(events).items():
        sink = sinks.get(request_id)
        if sink is not None and not _deliver(slot, request_id, sink, evs):
            cancel(request_id)
            _tell_failed(sink, SinkFailed(f"request {request_id!r}: its consumer raised"))


def _tell_failed(sink: Sink, exc: BaseException) -> None:
    """One try to end a request whose sink raised (it may raise again: then
    its consumer is beyond telling)."""
    with contextlib.suppress(Exception):
        sink(exc)


class InlineWorker:
    """The model in this process (``workers.mode = "inline"``, or a caller's
    own model such as a host engine's embedder)."""

    def __init__(self, spec: WorkerSpec, model: Any = None):
        self.spec = spec
        self._model = model
        self.host: ModelHost | None = None
        self._sinks: dict[Any, Sink] = {}
        self._lock = threading.Lock()
        self.pid = os.getpid()

    def start(self, timeout: float | None = None) -> dict:
        model = self._model if self._model is not None else load_model(self.spec)
        self.host = ModelHost(self.spec, model, self._dispatch)
        return self.host.info()

    @property
    def inflight(self) -> int:
        return len(self._sinks)

    def call(self, method: str, *args, **kwargs) -> Any:
        return self.host.call(method, args, kwargs)

    def generate(self, request_id: Any, prompt_ids: list, params: list, sink: Sink) -> None:
        with self._lock:
            self._sinks[request_id] = sink
        try:
            self.host.generate(request_id, prompt_ids, params)
        except Exception:
            self._forget(request_id)
            raise

    def cancel(self, request_id: Any) -> None:
        self._forget(request_id)
        self.host.cancel(request_id)

    def _forget(self, request_id: Any) -> None:
        with self._lock:
            self._sinks.pop(request_id, None)

    def _dispatch(self, events: list) -> None:
        with self._lock:
            sinks = dict(self._sinks)
        _dispatch(self.spec.slot, events, sinks, self.cancel)

    def finished(self, request_id: Any) -> None:
        self._forget(request_id)

    def stop(self) -> None:
        if self.host is not None:
            self.host.close()


class ProcessWorker:
    """One worker process and the thread that reads its answers.

    ``on_exit(worker, reason)`` is called when a worker that had loaded
    exits without being asked to; a start that fails raises from ``start``
    and reports nothing else."""

    def __init__(self, spec: WorkerSpec, on_exit: Callable[["ProcessWorker", str], None]):
        self.spec = spec
        self._on_exit = on_exit
        self._conn = None
        self.proc: subprocess.Popen | None = None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._sinks: dict[Any, Sink] = {}
        self._ids = itertools.count()
        self._ready = Future()
        self._dead = False
        self._closing = False  # stop() or kill() was called: no process may start, no exit is a fault
        self.pid: int | None = None
        # Shared memory for arrays: ours carries calls' inputs, the worker's its answers.
        self._arenas: dict[str, Arena] = {}
        self._arena_call: int | None = None  # the call whose inputs are in our arena
        self._answers_read = 0  # answers copied out of the worker's arena

    def start(self, timeout: float = 600.0) -> dict:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        tag = f"tallow-{os.getpid()}-{next(_arena_ids)}"
        for side in ("server", "worker"):
            arena = Arena.create(f"{tag}-{side}")
            if arena is not None:
                self._arenas[side] = arena
        env = dict(os.environ)
        if self.spec.threads:  # before torch loads in the worker: OpenMP reads it once
            env["OMP_NUM_THREADS"] = str(self.spec.threads)
        # Not "-m tallow.worker": its classes would pickle as __main__.X, which the server cannot load.
        try:
            with self._state_lock:  # a stop() racing this start either sees the process or prevents it
                if self._closing:
                    raise WorkerStartError(f"the {self.spec.slot} worker was stopped before it started")
                self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, str(theirs.fileno())],
                                             pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            self._drop_arenas()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self._conn = Connection(ours.detach())
        self._send_message(Start(self.spec, {side: a.path for side, a in self._arenas.items()}))
        threading.Thread(target=self._read, name=f"tallow-worker-{self.spec.slot}-{self.pid}", daemon=True).start()
        try:
            return self._ready.result(timeout)
        except TimeoutError:
            self.kill()
            raise WorkerStartError(f"the {self.spec.slot} worker did not load {self.spec.path} within "
                                   f"{timeout:g} s") from None
        except BaseException:
            # Gone before start() returns: a retry never runs beside the process it replaces.
            self._reap()
            raise

    def _reap(self, grace: float = 10.0) -> None:
        """Waits for the process to exit (one that failed to load exits by
        itself), killing it past ``grace`` seconds."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def inflight(self) -> int:
        return len(self._calls) + len(self._sinks)

    @property
    def loaded(self) -> bool:
        """It answered ready (and may have died since)."""
        return self._ready.done() and self._ready.exception() is None

    # -- requests (any thread) --------------------------------------------------------------

    # A call that takes longer than this is a hung worker (a forward pass of the
    # largest batch the limits allow takes seconds): it is killed and restarted,
    # so a lane thread never waits forever.
    CALL_TIMEOUT_S = 600.0

    def call(self, method: str, *args, **kwargs) -> Any:
        """Runs ``model.method(*args, **kwargs)`` in the worker; blocks this thread."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._state_lock:
            if self._dead:
                raise WorkerDied(self._died_message(), retry_after_s=5)
            self._calls[call_id] = future
        payload, in_arena = to_wire((args, kwargs), self._arenas.get("server"))
        if in_arena:
            self._arena_call = call_id  # the arena is ours again when this call's answer comes
        self._send_message(Call(call_id, method, payload, self._answers_read))
        try:
            return future.result(self.CALL_TIMEOUT_S)
        except TimeoutError:
            log.error("the %s worker (pid %s) did not answer %s within %g s: killing it", self.spec.slot,
                      self.pid, method, self.CALL_TIMEOUT_S)
            self.kill(expected=False)  # the reader fails every call in flight and the group restarts it
            return future.result(30)

    def generate(self, request_id: Any, prompt_ids: list, params: list, sink: Sink) -> None:
        with self._state_lock:
            if self._dead:
                raise WorkerDied(self._died_message(), retry_after_s=5)
            self._sinks[request_id] = sink
        self._send_message(Generate(request_id, prompt_ids, params))

    def cancel(self, request_id: Any) -> None:
        with self._state_lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self._send_message(Cancel(request_id))

    def finished(self, request_id: Any) -> None:
        with self._state_lock:
            self._sinks.pop(request_id, None)

    def _send_message(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=5)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError:  # the worker is gone; the reader fails what was in flight
            pass

    # -- answers (the reader thread) ----------------------------------------------------------

    def _read(self) -> None:
        reason = "its connection closed"
        try:
            while True:
                message = pickle.loads(self._conn.recv_bytes())
                if isinstance(message, Events):
                    self._dispatch(message.events)
                elif isinstance(message, (Result, Error)):
                    self._answer(message)
                elif isinstance(message, Ready):
                    # Both sides have mapped the arenas: their files can go now, so
                    # nothing is left in /dev/shm however either process ends.
                    for arena in self._arenas.values():
                        arena.unlink()
                    self._ready.set_result(message.info)
                elif isinstance(message, LoadFailed):
                    self._ready.set_exception(WorkerStartError(message.message))
                else:
                    raise TypeError(f"not a worker message: {type(message).__name__}")
        except (EOFError, OSError) as exc:
            reason = f"its connection closed ({type(exc).__name__})"
        except Exception as exc:  # a frame we cannot read: treat the worker as broken
            reason = f"an unreadable message ({type(exc).__name__}: {exc})"
        self._fail_all(reason)

    def _dispatch(self, events: list) -> None:
        _dispatch(self.spec.slot, events, self._sinks, self.cancel)

    def _answer(self, message: "Result | Error") -> None:
        with self._state_lock:
            future = self._calls.pop(message.call_id, None)
        if message.call_id == self._arena_call:  # the worker has copied its inputs out
            self._arena_call = None
            self._arenas["server"].release()
        if isinstance(message, Result):
            value = from_wire(message.value, self._arenas.get("worker"))
            self._answers_read += message.in_arena  # copied out: told with the next call
        if future is not None:
            if isinstance(message, Result):
                future.set_result(value)
            else:
                future.set_exception(message.exception)

    def _died_message(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        how = f"exited with {code}" if code is not None and code >= 0 else (
            f"was killed by signal {-code}" if code is not None else "stopped answering")
        return f"the {self.spec.slot} worker (pid {self.pid}) {how}; it is being restarted"

    def _fail_all(self, reason: str) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drop_arenas()
        with self._state_lock:
            self._dead = True
            calls, self._calls = self._calls, {}
            sinks, self._sinks = self._sinks, {}
            expected = self._closing
        error = WorkerDied(self._died_message(), retry_after_s=5)
        if not self._ready.done():
            self._ready.set_exception(WorkerStartError(f"the {self.spec.slot} worker exited while loading "
                                                       f"{self.spec.path} ({reason})"))
        for future in calls.values():
            future.set_exception(error)
        for request_id, sink in sinks.items():
            _deliver(self.spec.slot, request_id, sink, error)
        # A worker that never loaded is its start()'s failure, reported there:
        # reporting its exit too would start a second restart for the same place.
        if self.loaded and not expected:
            self._on_exit(self, reason)

    # -- shutdown ---------------------------------------------------------------------------

    def _drop_arenas(self) -> None:
        arenas, self._arenas = self._arenas, {}
        for arena in arenas.values():
            with contextlib.suppress(BufferError, ValueError):
                arena.close()
            arena.unlink()

    def stop(self, timeout: float = 10.0) -> None:
        """Asks the worker to exit (it finishes the call in progress); kills it
        past ``timeout``. Its exit is no fault: nothing restarts it."""
        with self._state_lock:
            self._closing = True
            proc = self.proc
        if proc is None:
            return
        self._send_message(Stop())
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self, expected: bool = True) -> None:
        """SIGKILL; the reader thread then sees the socket close and cleans
        up. ``expected=False``: a fault (a hung worker), restarted as one."""
        with self._state_lock:
            self._closing = self._closing or expected
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _by_request(events: list) -> dict:
    out: dict[Any, list] = {}
    for e in events:
        out.setdefault(e.request, []).append(e)
    return out


class WorkerGroup:
    """The workers of one model slot; restarts the ones that die.

    Each place in ``workers`` has at most one restart in progress: up to one
    attempt per ``RESTART_BACKOFF_S`` entry (the wait before it); when all
    fail the place is given up (logged, never retried: see the module's
    docstring). ``on_state(slot, status, error)`` reports the slot's status
    when it changes: "ready" while at least one worker runs, "restarting"
    when none runs and a restart is in progress, "failed" when none runs
    and none will (the error says why: the last load error)."""

    RESTART_BACKOFF_S = (0.0, 1.0, 5.0, 15.0)

    def __init__(self, spec: WorkerSpec, count: int, mode: str, on_state: Callable[[str, str, str], None],
                 model: Any = None):
        self.spec = spec
        self.count = count if mode == "process" and model is None else 1
        self.mode = "inline" if model is not None else mode
        self._model = model
        self._on_state = on_state
        self.workers: list = []
        self.info: dict = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # set by stop(): wakes restarts sleeping in their backoff
        self._restarts = 0
        self._restarting: dict[int, threading.Thread] = {}  # place -> its restart
        self._loading: dict[int, ProcessWorker] = {}  # place -> the worker a restart is starting
        self._given_up = 0  # places whose restarts all failed (the reason is in the log and the state)
        self._status = "ready"
        self._start_timeout = 600.0

    def _new(self):
        if self.mode == "process":
            return ProcessWorker(self.spec, self._exited)
        return InlineWorker(self.spec, self._model)

    def start(self, timeout: float = 600.0) -> dict:
        """Starts every worker (in parallel, blocking); returns the model's info."""
        self._start_timeout = timeout
        workers = [self._new() for _ in range(self.count)]
        results: list = [None] * len(workers)

        def start_one(i: int) -> None:
            try:
                results[i] = workers[i].start(timeout)
            except BaseException as exc:
                results[i] = exc

        # The group holds them before they start: one that loads and dies while
        # another still loads is one of ours, and is restarted (_exited).
        with self._lock:
            self.workers = workers
        threads = [threading.Thread(target=start_one, args=(i,), daemon=True) for i in range(len(workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.stop()  # the workers, and any restart a death has begun meanwhile
            raise errors[0]
        self.info = results[0]
        return self.info

    def pick(self):
        """The worker with the fewest requests in flight."""
        with self._lock:
            live = [w for w in self.workers if not getattr(w, "_dead", False)]
        if not live:
            if self._status == "failed":
                raise WorkerDied(f"every {self.spec.slot} worker died and could not be restarted (see /ready)")
            raise WorkerDied(f"every {self.spec.slot} worker is restarting", retry_after_s=5)
        return min(live, key=lambda w: w.inflight)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    @property
    def status(self) -> str:
        """"ready", "restarting" or "failed" (see the class docstring)."""
        return self._status

    @property
    def given_up(self) -> int:
        """Places whose restarts all failed."""
        return self._given_up

    def _status_now(self) -> str:  # with self._lock held
        if any(not getattr(w, "_dead", False) for w in self.workers):
            return "ready"
        return "restarting" if self._restarting else "failed"

    def _report(self, status: str, error: str) -> None:
        """Tells on_state when the slot's status changed (with self._lock held)."""
        if status != self._status:
            self._status = status
            self._on_state(self.spec.slot, status, "" if status == "ready" else error)

    def _exited(self, worker: ProcessWorker, reason: str) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            place = next((i for i, w in enumerate(self.workers) if w is worker), None)
            if place is None or place in self._restarting:  # not (or no longer) ours, or already handled
                return
            log.error("the %s worker (pid %s) died: %s; restarting it", self.spec.slot, worker.pid, reason)
            thread = threading.Thread(target=self._restart, args=(place, reason),
                                      name=f"tallow-restart-{self.spec.slot}-{place}", daemon=True)
            self._restarting[place] = thread
            thread.start()  # under the lock: stop() joins only started restarts
            self._report(self._status_now(), f"a worker died ({reason}); restarting")

    def _restart(self, place: int, reason: str) -> None:
        """Restarts the worker at ``place``: one attempt per backoff entry."""
        last = reason
        attempts = len(self.RESTART_BACKOFF_S)
        for attempt, delay in enumerate(self.RESTART_BACKOFF_S, 1):
            if self._stopping.wait(delay):
                return
            fresh = ProcessWorker(self.spec, self._exited)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._loading[place] = fresh
            try:
                fresh.start(self._start_timeout)
            except Exception as exc:
                last = str(exc)
                log.error("restarting the %s worker failed (attempt %d of %d): %s", self.spec.slot, attempt,
                          attempts, exc)
                continue
            finally:
                with self._lock:
                    self._loading.pop(place, None)
            with self._lock:
                if not self._stopping.is_set() and not fresh._dead:  # dead already: its exit was not reported
                    self.workers[place] = fresh
                    self._restarts += 1
                    del self._restarting[place]
                    self._report(self._status_now(), "")
                    log.info("the %s worker is back (pid %s)", self.spec.slot, fresh.pid)
                    return
                closed = self._stopping.is_set()
            if closed:
                fresh.stop()
                return
            last = f"the {self.spec.slot} worker (pid {fresh.pid}) exited right after it loaded"
        if self._stopping.is_set():  # the last attempt was cancelled by stop(): no failure to report
            return
        why = f"the worker died and could not be restarted ({attempts} attempts; the last: {last})"
        log.error("the %s worker is given up: %s. It will not be retried: fix the cause and restart tallow",
                  self.spec.slot, why)
        with self._lock:
            self._restarting.pop(place, None)
            self._given_up += 1
            self._report(self._status_now(), why)

    @property
    def restarts(self) -> int:
        return self._restarts

    def stop(self, timeout: float = 10.0) -> None:
        """Stops every worker and cancels restarts in progress (a restart
        sleeping in its backoff ends, one loading a model has its process
        killed); no process of the group is left when it returns."""
        with self._lock:
            self._stopping.set()
            loading = list(self._loading.values())
            restarts = list(self._restarting.values())
        for w in loading:
            w.kill()
        for t in restarts:
            if t is not threading.current_thread():
                t.join(timeout)
        for w in self.workers:
            w.stop()


class ServedModel:
    """What the routes and the engine hold for a model slot: the model's
    interface, its forward passes run by the slot's workers."""

    def __init__(self, group: WorkerGroup, generation_timeout_s: float = 120.0, head: str | None = None):
        """``head``: serve that classification head of the group's model (an
        embedder with heads, ``WorkerSpec.heads``) instead of the model itself."""
        self.group = group
        # generate()'s bound (the server gives server.request_timeout_s): a
        # RAG answer waits no longer than a completion may take.
        self.generation_timeout_s = generation_timeout_s
        info = group.info if head is None else group.info["heads"][head]
        self.config = info["config"]
        self.tokenizer = info["tokenizer"]
        # model_identity() of the real model, computed where the weights are:
        # content hashes and image tags are the same in both modes.
        # (None for a head: vectors are the embedder's, nothing names a classifier's output)
        self.precomputed_identity = info.get("identity")
        for name, value in info["attrs"].items():
            setattr(self, name, value)
        self._repr = info["repr"]

    def __repr__(self) -> str:
        return self._repr

    def _call(self, method: str, *args, **kwargs) -> Any:
        return self.group.pick().call(method, *args, **kwargs)

    # BERT embedder / classifier, ResNet: what the lanes and the engine call.
    def embed(self, texts, **kwargs):
        return self._call("embed", list(texts), **kwargs)

    def embed_ids(self, ids, **kwargs):
        return self._call("embed_ids", ids, **kwargs)

    def classify(self, texts, **kwargs):
        return self._call("classify", list(texts), **kwargs)

    def classify_ids(self, ids, **kwargs):
        return self._call("classify_ids", ids, **kwargs)

    def features(self, x):
        return self._call("features", x)

    # GPT-2: continuous batching in the worker.
    def start_generation(self, request_id: Any, prompt_ids: list, params: list, sink: Sink):
        """Starts a request on the least busy worker; returns that worker
        (for ``cancel`` / ``finished``). ``sink`` gets its events."""
        worker = self.group.pick()
        worker.generate(request_id, prompt_ids, params, sink)
        return worker

    def generate(self, prompts, **kwargs):
        """``GPT2LMHeadModel.generate``'s contract, through the scheduler
        (RAG's answers join the running batch like any completion)."""
        from .generation import generate_blocking

        return generate_blocking(self, prompts, kwargs, self.generation_timeout_s)
