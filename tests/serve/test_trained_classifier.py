"""A head trained by tallow.train, served by /v1/classify: the probabilities
equal the trainer's (mean pooling honoured by the server's model)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from server_helpers import ServerThread, make_config

from tallow.models import load


def test_classify_serves_the_trained_head(tmp_path, trained_head_dir, bert_classifier_dir):
    server = ServerThread(make_config(tmp_path / "data", **{"models.classifier": str(trained_head_dir),
                                                            "data.demo_corpus": False})).start()
    try:
        texts = ["I love it today", "terrible service again", "a so-so afternoon"]
        with server.client() as c:
            r = c.post("/v1/classify", json={"input": texts})
        assert r.status_code == 200, r.text
        served = torch.tensor([[row["probabilities"][lab] for lab in ("negative", "positive")]
                               for row in r.json()["data"]])
    finally:
        server.stop()
    feats = load(bert_classifier_dir, task="embed").embed(texts, pooling="mean", normalize=False)
    sd = load_file(str(trained_head_dir / "model.safetensors"))
    trainer = torch.softmax(feats @ sd["classifier.weight"].T + sd["classifier.bias"], -1)
    assert (served - trainer).abs().max() <= 1e-5


def _worker_pids(server) -> dict:
    import httpx

    models = httpx.get(server.url + "/ready", timeout=10).json()["models"]
    return {slot: models[slot].get("workers", {}).get("pids") for slot in ("embedder", "classifier")}, models


def test_the_shipped_sentiment_head_shares_the_embedders_encoder(tmp_path, monkeypatch):
    """tallow:sentiment is MiniLM with fine-tuned top layers, trained on the
    default embedder: the server serves it from the embedder's worker (one
    process, not a second one with its own torch and MiniLM), and its answers
    are those of the classifier loaded on its own."""
    import os

    def worker_processes() -> set:
        return {p for p in os.listdir("/proc") if p.isdigit()
                and _parent(int(p)) == os.getpid() and b"tallow.worker" in _cmdline(int(p))}

    others = worker_processes()  # servers of other modules (session fixtures) keep theirs
    server = ServerThread(make_config(tmp_path / "data", **{"models.classifier": "tallow:sentiment",
                                                            "data.demo_corpus": False,
                                                            "workers.mode": "process"})).start()
    try:
        pids, models = _worker_pids(server)
        assert pids["classifier"] == pids["embedder"] and len(pids["embedder"]) == 1
        assert models["classifier"]["served_by"] == "embedder" and models["classifier"]["status"] == "ready"
        children = worker_processes() - others
        assert len(children) == 1, children  # no second worker process
        texts = ["What a wonderful day, I loved every minute", "the service was slow and the food cold"]
        with server.client() as c:
            r = c.post("/v1/classify", json={"input": texts})
            e = c.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200 and e.status_code == 200, (r.text, e.text)
        served = [row["probabilities"]["positive"] for row in r.json()["data"]]
        _the_head_follows_its_workers_through_a_restart(server, pids["embedder"][0], texts, monkeypatch)
    finally:
        server.stop()
    alone = load("tallow:sentiment").classify(texts)
    assert [row["label"] for row in r.json()["data"]] == [row["label"] for row in alone] == ["positive", "negative"]
    assert max(abs(a - b["probabilities"]["positive"]) for a, b in zip(served, alone)) <= 1e-5


def _the_head_follows_its_workers_through_a_restart(server, pid: int, texts: list, monkeypatch) -> None:
    """The embedder's worker is killed; its restart is held on a gate until the
    test has seen the classifier restarting with it (and answering 503), then
    both are ready again and /v1/classify answers."""
    import os
    import signal
    import threading
    import time

    import httpx

    from tallow.serve import workers

    gate = threading.Event()
    start = workers.ProcessWorker.start

    def held_start(self, *args, **kwargs):
        gate.wait(60)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(workers.ProcessWorker, "start", held_start)  # only the restart starts now
    os.kill(pid, signal.SIGKILL)

    def states() -> tuple[str, str]:
        models = httpx.get(server.url + "/ready", timeout=10).json()["models"]
        return models["embedder"]["status"], models["classifier"]["status"]

    deadline = time.monotonic() + 60  # a guard against a hang, not a speed bound
    while states()[1] == "ready":
        assert time.monotonic() < deadline, "the classifier never noticed its worker died"
        time.sleep(0.02)
    try:
        assert states() == ("restarting", "restarting")
        with server.client() as c:
            assert c.post("/v1/classify", json={"input": texts}).status_code == 503
    finally:
        gate.set()
    while states() != ("ready", "ready"):
        assert time.monotonic() < deadline + 120, states()
        time.sleep(0.05)
    with server.client() as c:
        assert c.post("/v1/classify", json={"input": texts}).status_code == 200


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
