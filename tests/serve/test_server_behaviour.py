"""The server under load and in trouble: dynamic batching, 429 admission,
timeouts, clients that leave mid-stream, the official OpenAI client, the
Redis feature cache (and Redis going away), graceful shutdown, mounting."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_helpers import API_KEY, GenerationGate, ServerThread, free_port, make_config

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name) and (not labels or "{" + want + "}" in line or want in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_until(condition, guard_s: float = 30.0) -> None:
    """Polls until ``condition()`` holds; the guard only keeps a broken server from hanging the test."""
    deadline = time.monotonic() + guard_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


# -- dynamic batching --------------------------------------------------------------------------

def test_concurrent_requests_share_batches_and_get_their_own_answers(full_server):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'databases'}" for i in range(24)]
    before = httpx.get(full_server.url + "/metrics").text

    async def run():
        async with httpx.AsyncClient(base_url=full_server.url, timeout=60, headers=AUTH) as c:
            rs = await asyncio.gather(*[c.post("/v1/embeddings", json={"input": t}) for t in texts])
        return [np.array(r.json()["data"][0]["embedding"], dtype=np.float32) for r in rs]

    got = asyncio.run(run())
    want = full_server.services.models["embedder"].model.embed(texts).numpy()
    np.testing.assert_allclose(np.stack(got), want, atol=1e-5)  # nobody got another client's vector
    after = httpx.get(full_server.url + "/metrics").text
    batches = (_metric(after, "tallow_batch_size_count", lane="embeddings")
               - _metric(before, "tallow_batch_size_count", lane="embeddings"))
    inputs = (_metric(after, "tallow_batch_size_sum", lane="embeddings")
              - _metric(before, "tallow_batch_size_sum", lane="embeddings"))
    assert inputs == 24 and batches < 24  # some requests ran together


# -- overload, timeout, cancellation -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory, gpt2_long_dir):
    """GPT-2 only (no demo corpus), a generation queue of 2, a short timeout.
    Inline: its generation loop runs in this process, where a GenerationGate
    can hold it (tests/serve/test_workers.py covers worker processes)."""
    cfg = make_config(tmp_path_factory.mktemp("serve-small"), **{
        "models.generator": str(gpt2_long_dir), "data.demo_corpus": False, "workers.mode": "inline",
        "models.max_completion_tokens": 1000, "server.request_timeout_s": 20.0})
    cfg.batching["generate"].max_queue = 2
    server = ServerThread(cfg).start()
    yield server
    server.stop()


def test_overload_gets_429_with_retry_after_and_server_stays_healthy(small_server, generation_gate):
    # The loop is held until the refusals are in: the two admitted requests cannot
    # finish (and free the queue) first, however fast this CPU decodes.
    gate = generation_gate(hold=lambda g: not g.released)
    long = {"prompt": "Tell me a long story", "max_tokens": 600, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=60) as c:
            tasks = [asyncio.create_task(c.post("/v1/completions", json=long)) for _ in range(6)]
            refused = []
            for next_done in asyncio.as_completed(tasks):
                refused.append(await next_done)
                if len(refused) == 4:
                    break
            gate.release()
            return refused, await asyncio.gather(*tasks)

    refused_first, rs = asyncio.run(run())
    assert [r.status_code for r in refused_first] == [429] * 4  # answered while the queue was full
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    refused = next(r for r in rs if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and "queue is full" in refused.json()["error"]["message"]
    assert httpx.get(small_server.url + "/health").status_code == 200
    text = httpx.get(small_server.url + "/metrics").text
    assert _metric(text, "tallow_rejected_total", lane="generate") >= 1
    assert _metric(text, "tallow_queue_depth", lane="generate") == 0  # nothing left behind


def test_request_timeout_is_504(small_server, generation_gate):
    gate = generation_gate(hold=lambda g: not g.released)  # the request cannot finish in time
    lane = small_server.services.config.server
    old = lane.request_timeout_s
    lane.request_timeout_s = 0.2
    try:
        r = httpx.post(small_server.url + "/v1/completions", timeout=60,
                       json={"prompt": "slow", "max_tokens": 900, "temperature": 0})
    finally:
        lane.request_timeout_s = old
        gate.release()
    assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
    # the timed-out request was cancelled in the loop: it stops producing tokens
    assert gate.wait_for(lambda g: g.submitted and g.submitted[-1] in g.cancelled)


def test_client_leaving_mid_stream_stops_its_generation(small_server, generation_gate):
    # After its third token the request is held until its cancellation reaches the
    # loop: it cannot run to max_tokens before the server notices the client left.
    def hold(g):
        return bool(g.submitted) and g.tokens.get(g.submitted[-1], 0) >= 3 and g.submitted[-1] not in g.cancelled

    gate = generation_gate(hold)

    def cancelled() -> float:
        return _metric(httpx.get(small_server.url + "/metrics").text, "tallow_generations_cancelled_total")

    c0 = cancelled()
    # Only the client's leaving may cancel it: the request timeout (which would cancel
    # it too) is set beyond the gate's guard for this test.
    cfg = small_server.services.config.server
    old, cfg.request_timeout_s = cfg.request_timeout_s, 10 * GenerationGate.HOLD_S
    try:
        with httpx.Client(base_url=small_server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Stream forever", "max_tokens": 1000,
                                                           "temperature": 0, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen == 3:
                            break  # leave: the response is closed here
        request = gate.submitted[-1]
        assert gate.wait_for(lambda g: request in g.cancelled), "the server never cancelled the generation"
    finally:
        cfg.request_timeout_s = old
    # The scheduler drops the request between two steps; the loop always runs a step
    # after that: from that step on, the request makes no token.
    assert gate.wait_for(lambda g: request in g.dropped_at and len(g.history) > g.dropped_at[request])
    k = gate.dropped_at[request]
    assert gate.tokens[request] < 1000
    assert not any(request in step for step in gate.history[k:])  # stopped, and stays stopped
    _wait_until(lambda: cancelled() == c0 + 1)


# -- the official OpenAI client -----------------------------------------------------------------

def test_openai_client_embeddings_and_completions(full_server):
    import openai

    client = openai.OpenAI(base_url=full_server.url + "/v1", api_key=API_KEY, max_retries=0)  # sent as Bearer
    emb = client.embeddings.create(model="tallow-embed", input=["hello world", "goodbye"])
    want = full_server.services.models["embedder"].model.embed(["hello world", "goodbye"]).numpy()
    np.testing.assert_allclose(np.array([d.embedding for d in emb.data]), want, atol=1e-5)
    done = client.completions.create(model="tallow-gpt2", prompt="Once", max_tokens=6, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tallow-gpt2", prompt="Once", max_tokens=6, temperature=0, stream=True))
    assert streamed == done.choices[0].text and done.usage.completion_tokens >= 1
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="tallow-gpt2", prompt="x", max_tokens=10_000)


# -- Redis feature cache -------------------------------------------------------------------------

def _png(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_redis_feature_cache_and_redis_going_away(tmp_path, resnet_dir, redis_server_factory):
    redis = redis_server_factory()
    cfg = make_config(tmp_path, **{"models.image": str(resnet_dir), "data.demo_corpus": False,
                                   "cache.url": redis.url, "cache.ttl_s": 60.0})
    server = ServerThread(cfg).start()
    try:
        search = lambda seed: httpx.post(server.url + "/v1/images/search", timeout=60,  # noqa: E731
                                         json={"image": _png(seed), "k": 1})
        assert httpx.post(server.url + "/v1/images", json={"id": "a", "image": _png(1)}, timeout=60).status_code == 200
        first, second = search(1), search(1)
        assert first.status_code == second.status_code == 200
        assert second.json()["cached"] is True and second.json()["hits"][0]["id"] == "a"
        text = httpx.get(server.url + "/metrics").text
        assert _metric(text, "tallow_cache_hits_total", backend="redis") >= 1
        redis.stop()
        down = search(2)  # not cached: computed, and Redis's absence is not an error
        assert down.status_code == 200, down.text
        assert search(2).status_code == 200
        assert _metric(httpx.get(server.url + "/metrics").text, "tallow_cache_errors_total", backend="redis") >= 1
    finally:
        server.stop()


# -- graceful shutdown of `tallow serve` ----------------------------------------------------------

def test_tallow_serve_finishes_in_flight_requests_and_flushes_on_sigterm(tmp_path, gpt2_long_dir):
    port = free_port()
    (tmp_path / "tallow.toml").write_text(
        f'[server]\nport = {port}\napi_key = "{API_KEY}"\n[data]\ndir = "{tmp_path / "data"}"\n'
        f'demo_corpus = false\n[models]\ngenerator = "{gpt2_long_dir}"\nmax_completion_tokens = 1000\n')
    proc = subprocess.Popen([sys.executable, "-m", "tallow", "serve", "--config", str(tmp_path / "tallow.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "not ready"
            time.sleep(0.3)
        doc = {"id": "kept", "text": "A document written just before the server was stopped."}
        r = httpx.post(url + "/v1/documents", json={"documents": [doc]}, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200, r.text
        # A streamed request in flight when SIGTERM comes, by construction: its worker is
        # frozen (SIGSTOP) before the request is sent, and thawed once the server has begun
        # shutting down; the server answers the headers without the worker.
        worker_pid = httpx.get(url + "/ready", timeout=10).json()["models"]["generator"]["workers"]["pids"][0]
        output: list[str] = []
        shutting_down = threading.Event()

        def read_output():
            for line in proc.stdout:
                output.append(line)
                if "Shutting down" in line:
                    shutting_down.set()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        body = {"prompt": "in flight", "max_tokens": 1000, "temperature": 0, "stream": True}
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
                assert r.status_code == 200
                proc.send_signal(signal.SIGTERM)
                assert shutting_down.wait(60), "".join(output)
                os.kill(worker_pid, signal.SIGCONT)
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
        finally:
            os.kill(worker_pid, signal.SIGCONT)
        assert events[-1] == "data: [DONE]" and not any('"error"' in line for line in events), events[-3:]
        assert len(events) > 1  # it generated after the signal: none of its tokens existed before
        assert proc.wait(120) is not None
        reader.join(30)
        out = "".join(output)
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "index and metadata flushed" in out and "Application shutdown complete" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # The HNSW snapshot was written at shutdown: it holds the document's chunk.
    from tallow.index import HnswIndex

    assert HnswIndex.load(tmp_path / "data" / "index").count() >= 1


# -- mounted inside another ASGI app ---------------------------------------------------------------

def test_create_app_mounts_inside_a_host_app(tmp_path, bert_classifier_dir):
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from tallow.serve import create_app

    from tallow.engine import Engine

    engine = Engine(tmp_path / "host-data")  # the host's engine, served as it is
    engine.ingest([{"id": "h1", "text": "The host application indexed this document about lighthouses."}],
                  progress=False)
    inner = create_app(engine=engine, config=make_config(tmp_path, **{"models.classifier": str(bert_classifier_dir),
                                                                      "data.demo_corpus": False}))

    @contextlib.asynccontextmanager
    async def lifespan(host):
        async with inner.router.lifespan_context(inner):
            yield

    host = FastAPI(lifespan=lifespan)
    host.mount("/ai", inner)

    @host.get("/")
    def root():
        return {"host": True}

    with TestClient(host) as c:
        deadline = time.monotonic() + 120
        while c.get("/ai/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert c.get("/").json() == {"host": True}
        r = c.post("/ai/v1/classify", json={"input": ["great", "awful"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert c.post("/ai/v1/completions", json={"prompt": "x"}).status_code == 503  # no generator configured
        assert "models.generator" in c.post("/ai/v1/completions", json={"prompt": "x"}).json()["error"]["message"]
        hits = c.post("/ai/v1/search", json={"query": "lighthouse", "k": 1}).json()["hits"]
        assert hits[0]["doc_id"] == "h1"
        # no generator: /v1/rag answers with the closest retrieved sentences (issue 14)
        r = c.post("/ai/v1/rag", json={"question": "lighthouse", "k": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "extractive" and body["sources"][0]["doc_id"] == "h1"
        assert body["answer"] and body["answer"] in " ".join(body["sources"][0]["sentences"])
        group = inner.state.services.models["embedder"].group
        assert group.mode == "inline" and group.workers[0].host.model is engine.embedder  # one copy, the engine's
    assert engine.stats()["documents"] == 1  # still open: the host owns its engine
    engine.close()


# -- configuration -----------------------------------------------------------------------------------

def test_config_errors_name_the_setting(tmp_path):
    from tallow.serve import ConfigError, load_config

    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 8080\n")
    with pytest.raises(ConfigError, match="server.prot"):
        load_config(bad)
    bad.write_text("[batching.embeddings]\nmax_batch_size = 0\n")
    with pytest.raises(ConfigError, match="batching.embeddings.max_batch_size"):
        load_config(bad)
    bad.write_text("[models]\nquantize = 'int4'\n")
    with pytest.raises(ConfigError, match="models.quantize"):
        load_config(bad)
    r = subprocess.run([sys.executable, "-m", "tallow", "serve", "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_concurrent_image_searches_share_a_resnet_batch(full_server, auth):
    imgs = [_png(100 + i) for i in range(6)]
    for i, img in enumerate(imgs):
        assert httpx.post(full_server.url + "/v1/images", headers=auth, timeout=60,
                          json={"id": f"batch-{i}", "image": img}).status_code == 200

    async def run():
        async with httpx.AsyncClient(base_url=full_server.url, timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*[c.post("/v1/images/search", json={"image": img, "k": 1})
                                          for img in imgs])

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert [r.json()["hits"][0]["id"] for r in rs] == [f"batch-{i}" for i in range(6)]
    assert max(r.json()["timing_ms"].get("batch_size", 1) for r in rs) > 1


def test_a_stream_that_times_out_stops_its_generation(small_server, generation_gate):
    # After its first token the request is held until it is cancelled: it times out
    # mid-stream on any CPU, and its rows must then stop.
    def hold(g):
        return bool(g.submitted) and g.tokens.get(g.submitted[-1], 0) >= 1 and g.submitted[-1] not in g.cancelled

    gate = generation_gate(hold)

    def metric(name: str) -> float:
        return _metric(httpx.get(small_server.url + "/metrics").text, name)

    c0 = metric("tallow_generations_cancelled_total")
    cfg = small_server.services.config.server
    old, cfg.request_timeout_s = cfg.request_timeout_s, 0.3
    try:
        with httpx.Client(base_url=small_server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Never ending", "max_tokens": 1000,
                                                           "temperature": 0, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        cfg.request_timeout_s = old
    assert lines[-1] == "data: [DONE]" and "timeout_error" in lines[-2]
    request = gate.submitted[-1]
    assert gate.wait_for(lambda g: request in g.dropped_at and len(g.history) > g.dropped_at[request])
    assert not any(request in step for step in gate.history[gate.dropped_at[request]:])
    _wait_until(lambda: metric("tallow_generations_cancelled_total") == c0 + 1)


def test_serve_reads_tallow_toml_from_the_working_directory_and_a_busy_port_fails_before_loading(tmp_path):
    """`tallow serve` with no --config reads ./tallow.toml (as `make run` does in
    the checkout) and logs which file it read; a port that is taken is reported
    at once, with the flag to change it, before any model loads."""
    import socket

    from tallow.serve.config import find_config_file

    (tmp_path / "tallow.toml").write_text(f'[data]\ndir = "{tmp_path / "data"}"\ndemo_corpus = false\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "TALLOW_CONFIG"}
        r = subprocess.run([sys.executable, "-m", "tallow", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"configuration: {tmp_path / 'tallow.toml'} (found in the working directory)" in r.stderr
    assert f"127.0.0.1:{port} is already in use" in r.stderr and "--port" in r.stderr
    assert "tallow is ready" not in r.stderr and "Application startup" not in r.stderr  # nothing was loaded
    assert not (tmp_path / "data").exists()

    assert find_config_file("x.toml", cwd=tmp_path) == ("x.toml", "--config")
    assert find_config_file(None, no_config=True, cwd=tmp_path)[0] is None
    assert find_config_file(None, cwd=tmp_path / "data")[0] is None  # no file there: the embedded defaults


def test_the_embedded_defaults_are_the_shipped_tallow_toml():
    """One set of defaults: every setting tallow.toml (make run's file) writes
    down is the value the server has without any file — a pip-installed
    `tallow serve` serves what `make run` serves (the functions aside: their
    modules live in the checkout)."""
    import tomllib
    from pathlib import Path

    from tallow.serve import load_config

    toml = Path(__file__).resolve().parents[2] / "tallow.toml"
    defaults, written = load_config(), tomllib.loads(toml.read_text())
    differ = []
    for section, values in written.items():
        if section in ("functions", "kv"):
            continue
        for key, value in values.items():
            if section == "batching":
                differ += [f"batching.{key}.{k}" for k, v in value.items()
                           if getattr(defaults.batching[key], k) != v]
            elif getattr(getattr(defaults, section), key) != value:
                differ.append(f"{section}.{key}")
    assert not differ, f"tallow.toml and the embedded defaults disagree on {differ}"
    assert defaults.models.classifier == "tallow:sentiment"
