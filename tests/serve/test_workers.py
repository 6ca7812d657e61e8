"""Models in worker processes (workers.mode = "process"): the forward passes
run outside the server's process, a killed worker's requests are answered
503 as soon as its death is noticed (never left to a timeout) and it is
restarted, nothing in the store is lost; load
shedding refuses before the body is read."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from server_helpers import ServerThread, make_config

from tallow.serve.batching import DrainRate


@pytest.fixture(scope="module")
def process_server(tmp_path_factory, gpt2_long_dir):
    data = tmp_path_factory.mktemp("workers-data")
    cfg = make_config(data, **{"workers.mode": "process", "data.demo_corpus": False,
                               "models.generator": str(gpt2_long_dir), "models.max_completion_tokens": 900})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


def _ready_models(server) -> dict:
    return httpx.get(server.url + "/ready", timeout=10).json()["models"]


def _wait_ready(server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(server.url + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, _ready_models(server)
        time.sleep(0.1)


def test_the_models_run_in_processes_of_their_own(process_server):
    models = _ready_models(process_server)
    for slot in ("embedder", "generator"):
        workers = models[slot]["workers"]
        assert workers["mode"] == "process"
        assert workers["pids"] and os.getpid() not in workers["pids"]
    r = httpx.post(process_server.url + "/v1/embeddings", json={"input": ["one", "two"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"][1]["embedding"]) == 384


def test_embeddings_match_the_model_in_this_process(process_server):
    import numpy as np

    from tallow.models import load, minilm_path

    want = load(minilm_path(), task="embed").embed(["a served sentence"]).numpy()[0]
    r = httpx.post(process_server.url + "/v1/embeddings", json={"input": "a served sentence"}, timeout=60)
    np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"]), want, atol=1e-5)


def _kill_during(server, slot: str, send) -> tuple[httpx.Response, int]:
    """Starts ``send()`` in a thread and SIGKILLs the slot's worker while it
    runs; returns the response and the status /ready gave after the kill.

    Decided by what happened, not by how fast this CPU is: once the request is
    in the worker, the worker is frozen (SIGSTOP) so it cannot finish the
    request before the kill, whatever the machine."""
    pid = _ready_models(server)[slot]["workers"]["pids"][0]
    out: dict = {}

    def run():
        out["response"] = send()

    t = threading.Thread(target=run)
    t.start()
    worker = server.services.models[slot].group.workers[0]
    deadline = time.monotonic() + 30  # a guard against a hang, not a speed bound
    while worker.inflight == 0:  # wait until the request is in the worker, not on its way there
        assert time.monotonic() < deadline and t.is_alive(), "the request never reached the worker"
        time.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)
    assert t.is_alive(), "the request finished before the kill: make it longer"
    os.kill(pid, signal.SIGKILL)
    ready_status = 200
    deadline = time.monotonic() + 30
    while ready_status == 200 and time.monotonic() < deadline:  # the slot turns "restarting"
        ready_status = httpx.get(server.url + "/ready", timeout=10).status_code
    t.join(60)
    assert "response" in out, "no answer: the death of the worker was not noticed"
    return out["response"], ready_status


def test_a_killed_worker_fails_its_requests_with_503_and_comes_back(process_server):
    url = process_server.url
    r = httpx.post(url + "/v1/documents", json={"documents": [{"id": "kept", "text": "a red fox in the snow"}]},
                   timeout=60)
    assert r.status_code == 200
    long_batch = [f"sentence number {i} about foxes, snow and the long winter" for i in range(2000)]
    response, ready_status = _kill_during(
        process_server, "embedder", lambda: httpx.post(url + "/v1/embeddings", json={"input": long_batch, "encoding_format": "base64"},
                           timeout=60))
    assert response.status_code == 503, response.text
    assert "worker" in response.json()["error"]["message"]  # the death, noticed: not a timeout
    assert ready_status == 503
    _wait_ready(process_server)
    assert _ready_models(process_server)["embedder"]["workers"]["restarts"] >= 1
    assert httpx.post(url + "/v1/embeddings", json={"input": "after"}, timeout=60).status_code == 200
    hits = httpx.post(url + "/v1/search", json={"query": "fox in snow", "k": 1}, timeout=60).json()["hits"]
    assert hits[0]["doc_id"] == "kept"  # the store lives in the server process: nothing lost
    if os.path.isdir("/dev/shm"):  # shared-memory arenas are unlinked once mapped: none left behind
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"tallow-{os.getpid()}-")]


def test_a_killed_generator_ends_streams_with_a_503_event(process_server):
    url = process_server.url

    def stream():
        body = {"prompt": "once upon a time", "max_tokens": 900, "temperature": 0.0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            return httpx.Response(r.status_code, content=r.read())

    response, ready_status = _kill_during(process_server, "generator", stream)
    assert response.status_code == 200  # the stream had started
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "worker" in error["message"]  # the death, noticed: not a timeout
    assert ready_status == 503
    _wait_ready(process_server)
    r = httpx.post(url + "/v1/completions", json={"prompt": "again", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_with_two_workers_the_other_keeps_serving_while_one_restarts(tmp_path):
    cfg = make_config(tmp_path, **{"workers.mode": "process", "workers.embedder": 2, "workers.threads": 1,
                                   "data.demo_corpus": False})
    server = ServerThread(cfg).start()
    try:
        pids = _ready_models(server)["embedder"]["workers"]["pids"]
        assert len(set(pids)) == 2
        os.kill(pids[0], signal.SIGKILL)
        group = server.services.models["embedder"].group
        deadline = time.monotonic() + 30  # a guard against a hang, not a speed bound
        while any(w.pid == pids[0] and not getattr(w, "_dead", False) for w in group.workers):
            assert time.monotonic() < deadline, "the server never noticed the death"  # its socket closed
            time.sleep(0.01)
        with server.client() as c:
            assert c.post("/v1/embeddings", json={"input": "still here"}).status_code == 200
            assert c.get("/ready").status_code == 200
        deadline = time.monotonic() + 120
        while _ready_models(server)["embedder"]["workers"]["restarts"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(set(_ready_models(server)["embedder"]["workers"]["pids"]) - {pids[0]}) == 2
    finally:
        server.stop()


# -- load shedding -------------------------------------------------------------------------

@pytest.fixture
def tiny_queue_server(tmp_path):
    cfg = make_config(tmp_path, **{"workers.mode": "inline", "data.demo_corpus": False})
    cfg.batching["embeddings"].max_queue = 1
    server = ServerThread(cfg).start()
    yield server
    server.stop()


def test_a_full_queue_is_refused_before_the_body_is_read(tiny_queue_server):
    services = tiny_queue_server.services
    lane = services.lanes["embeddings"]
    gate = threading.Event()
    real = lane._run_batch
    lane._run_batch = lambda jobs: (gate.wait(30), real(jobs))[1]
    try:
        holder = threading.Thread(target=lambda: httpx.post(tiny_queue_server.url + "/v1/embeddings",
                                                            json={"input": "hold"}, timeout=60))
        holder.start()
        deadline = time.monotonic() + 10
        while lane.depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Headers promise a body that never comes: only an answer that does not read it can arrive.
        with socket.create_connection(("127.0.0.1", tiny_queue_server.port), timeout=5) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n")
            head = s.recv(4096).decode("latin-1")
        assert head.startswith("HTTP/1.1 429"), head
        assert "retry-after: " in head.lower()
        assert json.loads(head.split("\r\n\r\n", 1)[1])["error"]["code"] == 429
    finally:
        gate.set()
        lane._run_batch = real
        holder.join(30)
    assert httpx.post(tiny_queue_server.url + "/v1/embeddings", json={"input": "free"}, timeout=60).status_code == 200


def test_retry_after_is_the_backlog_over_the_measured_drain_rate():
    rate = DrainRate(window_s=10.0)
    assert rate.retry_after(10) == 5  # nothing finished yet: a long job holds the queue
    for _ in range(20):
        rate.record(1)
    # 20 completions within a second count as 20/s at most (the window is at least 1 s)
    assert rate.per_second() == pytest.approx(20.0, rel=0.05)
    assert rate.retry_after(100) == 5
    assert rate.retry_after(1) == 1
    assert rate.retry_after(10**6) == 60  # capped


# -- supervision -----------------------------------------------------------------------------

def _worker_children() -> set[int]:
    """Live worker processes started by this process (the servers under test
    run in it): /proc, no psutil. Zombies do not count: nothing runs there."""
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # it ended while we looked
            continue
        if ppid == me and state != "Z" and b"tallow.worker" in cmdline:
            out.add(int(entry))
    return out


def _restart_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tallow-restart-")]


def test_a_worker_whose_model_disappeared_fails_its_slot_after_bounded_restarts(tmp_path, minilm_dir,
                                                                                 monkeypatch):
    from tallow.serve import workers

    monkeypatch.setattr(workers.WorkerGroup, "RESTART_BACKOFF_S", (0.0, 0.05, 0.05))
    starts = []
    real_start = workers.ProcessWorker.start

    def counted_start(self, *args, **kwargs):
        starts.append(self)
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(workers.ProcessWorker, "start", counted_start)
    others = _worker_children()  # another server of this module keeps its workers
    model = tmp_path / "embedder"
    model.symlink_to(minilm_dir, target_is_directory=True)
    cfg = make_config(tmp_path / "data", **{"workers.mode": "process", "workers.threads": 1,
                                            "models.embedder": str(model), "models.warmup": False,
                                            "models.classifier": "",
                                            "data.demo_corpus": False})
    server = ServerThread(cfg).start()
    try:
        [pid] = _ready_models(server)["embedder"]["workers"]["pids"]
        model.unlink()  # the model is gone before the restart
        os.kill(pid, signal.SIGKILL)
        most = 0
        deadline = time.monotonic() + 180
        while (slot := _ready_models(server)["embedder"])["status"] != "failed":
            most = max(most, len(_worker_children() - others))
            assert time.monotonic() < deadline, slot
            time.sleep(0.02)
        assert len(starts) == 1 + 3  # the first start, then one per attempt: no second chain
        assert most <= 1  # one restart at a time, never a storm
        for t in _restart_threads():  # "failed" is reported as the restart thread's last act
            t.join(30)
        assert not _restart_threads() and not (_worker_children() - others)
        r = httpx.get(server.url + "/ready", timeout=10)
        assert r.status_code == 503
        error = r.json()["models"]["embedder"]["error"]
        assert "3 attempts" in error and str(model) in error, error  # says why: the load error
        with server.client() as c:
            assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 503
    finally:
        server.stop()


@pytest.mark.parametrize("phase", ["backoff", "loading"])
def test_stop_during_a_restart_leaves_no_process_behind(phase, minilm_dir, monkeypatch):
    from tallow.serve import workers
    from tallow.worker import WorkerSpec

    others = _worker_children()
    reports: list = []
    restarting = threading.Event()

    def on_state(slot, status, error):
        reports.append(status)
        if status == "restarting":
            restarting.set()

    spec = WorkerSpec("embedder", str(minilm_dir), task="embed", warmup=False, threads=1)
    group = workers.WorkerGroup(spec, 1, "process", on_state)
    group.start(timeout=120)
    leftovers: set = set()
    try:
        if phase == "backoff":  # the restart sleeps before its first attempt
            monkeypatch.setattr(workers.WorkerGroup, "RESTART_BACKOFF_S", (3600.0,))
        else:  # the restart's process never finishes loading
            monkeypatch.setattr(workers, "_WORKER_MAIN", "import time; time.sleep(3600)  # tallow.worker")
        [pid] = group.pids
        os.kill(pid, signal.SIGKILL)
        assert restarting.wait(60)
        if phase == "loading":
            deadline = time.monotonic() + 60
            while not (_worker_children() - others - {pid}):
                assert time.monotonic() < deadline, "the restart never started its process"
                time.sleep(0.01)
        group.stop()
        leftovers = _worker_children() - others
        assert not leftovers
        for t in _restart_threads():
            t.join(10)  # a never-hang guard: a cancelled restart ends at once
        assert not _restart_threads()
        assert "ready" not in reports[reports.index("restarting"):]
    finally:
        for p in leftovers:
            os.kill(p, signal.SIGKILL)


def test_a_sink_that_raises_fails_only_its_own_request(process_server):
    from tallow.models.generation import SamplingParams

    served = process_server.services.models["generator"].model
    prompt_ids = served.tokenizer.encode_ids(["once upon a time"])
    params = [SamplingParams(max_new_tokens=8, temperature=0.0)]
    told_bad: list = []
    good: list = []
    done = threading.Event()

    def bad(item):
        told_bad.append(item)
        if not isinstance(item, BaseException):
            raise RuntimeError("a bug in this request's consumer")

    def ok(item):
        good.append(item)
        if isinstance(item, BaseException) or any(e.finish_reason for e in item):
            done.set()

    worker = served.start_generation("sink-raises", prompt_ids, params, bad)
    pid = worker.pid
    assert served.start_generation("sink-fine", prompt_ids, params, ok) is worker  # same worker, same batch
    assert done.wait(60)
    worker.finished("sink-fine")
    assert not [i for i in good if isinstance(i, BaseException)], good
    events = [e for batch in good for e in batch]
    assert len(events) == 8 and events[-1].finish_reason == "length"
    assert isinstance(told_bad[-1], BaseException)  # the failing request was told it failed
    assert worker.pid == pid and not worker._dead and worker.inflight == 0
    assert httpx.get(process_server.url + "/ready", timeout=10).status_code == 200


def test_a_worker_process_uses_workers_threads(minilm_dir):
    from tallow.serve.workers import ProcessWorker
    from tallow.worker import WorkerSpec

    worker = ProcessWorker(WorkerSpec("embedder", str(minilm_dir), task="embed", warmup=False, threads=1),
                           lambda w, reason: None)
    try:
        info = worker.start(120)
    finally:
        worker.stop()
    assert info["threads"] == {"tallow": 1, "torch": 1}


def test_a_stream_client_that_leaves_before_the_first_byte_gives_its_slot_back(process_server, monkeypatch):
    """An ASGI 2.4 server raises OSError from send() once the client has
    gone: Starlette then gives up on the response before its body is ever
    iterated, so no ``finally`` in the body runs. The slot must come back
    anyway, and the rows must stop."""
    import asyncio
    import contextlib

    gate = process_server.services.generation_slots
    monkeypatch.setattr(gate, "max_queue", 1)
    body = json.dumps({"prompt": "once upon a time", "max_tokens": 900, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent: list = []
    admitted: list = []
    real_enter = gate.enter
    monkeypatch.setattr(gate, "enter", lambda: (real_enter(), admitted.append(gate.depth)))

    async def leave_before_the_first_byte():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message["type"])
            raise OSError("the client has gone")

        with contextlib.suppress(Exception):
            await process_server.app(scope, receive, send)

    asyncio.run(leave_before_the_first_byte())
    assert admitted == [1] and sent[0] == "http.response.start"  # it was admitted, then its client left
    assert gate.depth == 0
    r = httpx.post(process_server.url + "/v1/completions", json={"prompt": "next", "max_tokens": 2, "stream": True},
                   timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert process_server.services.models["generator"].group.workers[0].inflight == 0  # its rows were cancelled


def test_a_generative_rag_answer_that_never_comes_times_out_and_is_cancelled(process_server, monkeypatch):
    url = process_server.url
    r = httpx.post(url + "/v1/documents", json={"documents": [{"id": "owl", "text": "owls hunt at night"}]},
                   timeout=60)
    assert r.status_code == 200
    served = process_server.services.models["generator"].model
    real_start = served.start_generation
    cancelled: list = []

    def start_unheard(request_id, prompt_ids, params, sink):
        worker = real_start(request_id, prompt_ids, params, lambda item: None)  # its answer never arrives
        real_cancel = worker.cancel
        monkeypatch.setattr(worker, "cancel", lambda rid: (cancelled.append(rid), real_cancel(rid)))
        return worker

    monkeypatch.setattr(served, "start_generation", start_unheard)
    monkeypatch.setattr(served, "generation_timeout_s", 1.0)
    r = httpx.post(url + "/v1/rag", json={"question": "when do owls hunt?", "k": 1, "max_tokens": 900},
                   timeout=60)
    assert r.status_code == 504, r.text
    assert "request_timeout_s" in r.json()["error"]["message"]
    assert len(cancelled) == 1  # its rows stop in the worker
    worker = process_server.services.models["generator"].group.workers[0]
    assert cancelled[0] not in worker._sinks
