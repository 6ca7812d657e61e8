"""Models in worker processes (workers.mode = "process"): the forward passes
run outside the server's process, a killed worker answers its requests 503
within a second and is restarted, nothing in the store is lost; load
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


def _kill_during(server, slot: str, send) -> tuple[httpx.Response, float, int]:
    """Starts ``send()`` in a thread, SIGKILLs the slot's worker while it runs;
    returns the response, the seconds from the kill to the answer, and the
    status /ready gave right after the kill."""
    pid = _ready_models(server)[slot]["workers"]["pids"][0]
    out: dict = {}

    def run():
        out["response"] = send()
        out["answered"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    worker = server.services.models[slot].group.workers[0]
    deadline = time.monotonic() + 30
    while worker.inflight == 0:  # wait until the request is in the worker, not on its way there
        assert time.monotonic() < deadline and t.is_alive(), "the request never reached the worker"
        time.sleep(0.01)
    time.sleep(0.2)
    assert t.is_alive(), "the request finished before the kill: make it longer"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    ready_status = 200
    while ready_status == 200 and time.monotonic() < killed + 1.0:  # noticed within a second
        ready_status = httpx.get(server.url + "/ready", timeout=10).status_code
    t.join(30)
    return out["response"], out["answered"] - killed, ready_status


def test_a_killed_worker_fails_its_requests_with_503_and_comes_back(process_server):
    url = process_server.url
    r = httpx.post(url + "/v1/documents", json={"documents": [{"id": "kept", "text": "a red fox in the snow"}]},
                   timeout=60)
    assert r.status_code == 200
    long_batch = [f"sentence number {i} about foxes, snow and the long winter" for i in range(2000)]
    response, seconds, ready_status = _kill_during(
        process_server, "embedder", lambda: httpx.post(url + "/v1/embeddings", json={"input": long_batch, "encoding_format": "base64"},
                           timeout=60))
    assert response.status_code == 503, response.text
    assert "worker" in response.json()["error"]["message"]
    assert seconds < 1.0
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

    response, seconds, ready_status = _kill_during(process_server, "generator", stream)
    assert response.status_code == 200  # the stream had started
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "worker" in error["message"]
    assert seconds < 1.0
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
        time.sleep(0.3)  # the server has noticed
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
