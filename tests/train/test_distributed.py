"""Resume after SIGKILL and data parallelism under torchrun (gloo, two
processes through a loopback c10d rendezvous), in subprocesses bounded in time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("train_script.py")
sys.path.insert(0, str(SCRIPT.parent))
import train_script  # noqa: E402  (the uninterrupted / single-process runs go in-process: no second torch start-up)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(args, timeout=120, check=True):
    p = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _params(d: Path) -> dict:
    return load_file(str(d / "params.safetensors"))


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a: dict, b: dict, tol: float = 1e-6) -> float:
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"parameters differ by {worst}"
    return worst


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--epochs", "3", "--dropout", "0.2", "--grad-accum", "2"]  # dropout: the RNG state must be restored
    train_script.main(["--out", str(full), *common])
    # 7 micro-batches per epoch (203 / 32); killed at the 12th: epoch 2, mid-epoch, after a step-3k checkpoint
    p = _run([sys.executable, str(SCRIPT), "--out", str(cut), *common, "--kill-at", "12"], check=False)
    assert p.returncode == -signal.SIGKILL
    assert not (cut / "params.safetensors").exists()
    ckpts = sorted(x.name for x in (cut / "checkpoints").iterdir() if x.name.startswith("step-"))
    assert ckpts, "no checkpoint before the kill"
    _run([sys.executable, str(SCRIPT), "--out", str(cut), *common])  # resume="auto"
    diff = _assert_close(_params(full), _params(cut))
    print(f"resumed vs uninterrupted: max |param diff| {diff:.2e}")
    a, b = _records(full), _records(cut)
    assert [r["epoch"] for r in b if r["type"] == "epoch"] == [1, 2, 3]  # no epoch twice
    steps = [r["step"] for r in b if r["type"] == "step"]
    assert steps == sorted(set(steps))  # no step twice
    for ra, rb in zip(a, b):  # same learning rate at every step, same epoch metrics
        assert ra.get("lr") == rb.get("lr") and ra["step"] == rb["step"]
    assert [r["val_loss"] for r in a if r["type"] == "epoch"] == \
        [__import__("pytest").approx(r["val_loss"], abs=1e-6) for r in b if r["type"] == "epoch"]
    run = json.loads((cut / "run.json").read_text())
    assert len(run["resumes"]) == 1 and run["resumes"][0]["at"]["epoch"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--epochs", "2", "--optimizer", "sgd"]  # no dropout, no batch norm
    train_script.main(["--out", str(one), *common])
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0",
          str(SCRIPT), "--out", str(two), *common], timeout=180)
    diff = _assert_close(_params(one), _params(two))
    print(f"2 processes vs 1: max |param diff| {diff:.2e}")
    e1, e2 = (json.loads((d / "eval.json").read_text())["val"] for d in (one, two))
    assert e2["n"] == e1["n"] == 101  # validation once over the whole set: nothing duplicated or dropped
    assert e2["confusion_matrix"] == e1["confusion_matrix"]
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    assert [r["epoch"] for r in _records(two) if r["type"] == "epoch"] == [1, 2]  # rank 0 alone writes
