"""Helpers for the server tests: real uvicorn servers on free loopback ports,
run in a background thread of the test process (uvicorn installs no signal
handlers off the main thread), each with its own data directory.

A module of its own, imported by name: every folder's conftest.py is named
``conftest``, so ``from conftest import ...`` finds whichever was loaded first."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from typing import Callable

import httpx
import uvicorn

from tallow.models.scheduler import GenerationLoop, GenerationScheduler
from tallow.serve import create_app, load_config

API_KEY = "test-key-123"
SECOND_KEY = "test-key-second-456"  # another full key (server.api_keys)
READ_ONLY_KEY = "test-read-only-789"  # server.read_only_api_keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``uvicorn`` serving ``create_app(config=...)`` until ``stop()``."""

    def __init__(self, config, engine=None, **uvicorn_options):
        self.port = free_port()
        self.app = create_app(engine=engine, config=config)
        self.services = self.app.state.services
        options = {"log_level": "warning", **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    lifespan="on", **options))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 300.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        while True:
            r = httpx.get(self.url + "/ready", timeout=10)
            if r.status_code == 200:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {ready_timeout} s: {r.json()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)


def make_config(data_dir: Path, **overrides):
    """The embedded defaults with the data in ``data_dir``, but no generator unless
    the test names one (make run's SmolLM2 would load into every test server)."""
    return load_config(**{"data.dir": str(data_dir), "models.generator": "", **overrides})


class GenerationGate:
    """Holds the generation loop of an inline-mode server (``workers.mode =
    "inline"``: the loop runs in this process) at the start of a step for as
    long as ``hold(gate)`` is true, so a test decides by steps and events, not
    by how fast this CPU decodes. It records what each step produced.

    ``hold`` is re-evaluated whenever something changes: a step, a request
    submitted or cancelled, ``release()``, ``close()``. Take one from the
    ``generation_gate`` fixture (tests/serve/conftest.py): its teardown closes
    the gate (a failed test never leaves the shared server's loop held) and
    fails the test if a hold ever ran out of ``HOLD_S`` instead of ending::

        gate = generation_gate(hold=lambda g: not g.released)
    """

    HOLD_S = 60.0  # a guard against a hung test; never reached when the server works

    def __init__(self, monkeypatch, hold: Callable[["GenerationGate"], bool]):
        self.hold = hold
        self.submitted: list = []          # request ids, in submission order (known before the loop sees them)
        self.queued: list = []             # the same, once in the loop's inbox
        self.cancelled: list = []
        self.released = False
        self.closed = False                # the test is over: hold nothing any more
        self.timed_out = False             # a hold ran out of HOLD_S
        self.tokens: dict = {}             # request id -> tokens produced so far
        self.ended_at: dict = {}           # request id -> index of the step its last row ended in
        self.dropped_at: dict = {}         # request id -> index of the first step after the scheduler dropped it
        self.history: list[dict] = []      # per step: request id -> tokens produced in it
        self._rows_left: dict = {}
        self._cond = threading.Condition()
        gate = self
        submit, cancel, step = GenerationLoop.submit, GenerationLoop.cancel, GenerationScheduler.step
        drop = GenerationScheduler.cancel

        def gated_submit(loop, request, prompt_ids, params):
            with gate._cond:
                gate.submitted.append(request)  # before the loop can step it
                gate._rows_left[request] = len(prompt_ids)
            try:
                submit(loop, request, prompt_ids, params)
            except BaseException:
                with gate._cond:
                    gate.submitted.remove(request)
                raise
            with gate._cond:
                gate.queued.append(request)
                gate._cond.notify_all()

        def gated_cancel(loop, request):
            cancel(loop, request)
            with gate._cond:
                gate.cancelled.append(request)
                gate._cond.notify_all()

        def recorded_drop(sched, request):  # the loop's thread, between two steps
            drop(sched, request)
            with gate._cond:
                gate.dropped_at.setdefault(request, len(gate.history))
                gate._cond.notify_all()

        def gated_step(sched):
            with gate._cond:
                if not gate._cond.wait_for(lambda: gate.closed or not gate.hold(gate), gate.HOLD_S):
                    gate.timed_out = True
            events = step(sched)
            with gate._cond:
                produced: dict = {}
                for e in events:
                    if e.token_id >= 0:
                        produced[e.request] = produced.get(e.request, 0) + 1
                        gate.tokens[e.request] = gate.tokens.get(e.request, 0) + 1
                    if e.finish_reason is not None and e.request in gate._rows_left:
                        gate._rows_left[e.request] -= 1
                        if gate._rows_left[e.request] == 0:
                            gate.ended_at[e.request] = len(gate.history)
                gate.history.append(produced)
                gate._cond.notify_all()
            return events

        monkeypatch.setattr(GenerationLoop, "submit", gated_submit)
        monkeypatch.setattr(GenerationLoop, "cancel", gated_cancel)
        monkeypatch.setattr(GenerationScheduler, "step", gated_step)
        monkeypatch.setattr(GenerationScheduler, "cancel", recorded_drop)

    def release(self) -> None:
        with self._cond:
            self.released = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[["GenerationGate"], bool], timeout: float = HOLD_S) -> bool:
        """Blocks until ``predicate(gate)`` holds (checked at every change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)
