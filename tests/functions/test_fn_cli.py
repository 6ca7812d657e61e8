"""tallow fn run / tallow fn compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fn_helpers import EXAMPLES, GUESTS


def tallow(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tallow", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_fn_run_and_compile(tmp_path):
    env = {"TALLOW_WASM_CACHE": str(tmp_path / "cache")}
    r = tallow("fn", "compile", str(GUESTS / "echo.wat"), env=env)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr
    assert "already cached" in tallow("fn", "compile", str(GUESTS / "echo.wat"), env=env).stdout
    root = EXAMPLES.parents[1]
    r = tallow("fn", "compile", "--config", str(root / "tallow.toml"), env=env)  # the repository's examples
    assert r.returncode == 0 and "todo.wasm" in r.stdout and "image.wasm" in r.stdout, r.stderr
    req = {"method": "POST", "path": "/e", "query": "a=1", "body": "hello"}
    r = tallow("fn", "run", str(GUESTS / "echo.wat"), "--request", json.dumps(req), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == 201 and out["body"] == "hello" and out["headers"] == {"x-query": "a=1"}
    r = tallow("fn", "run", str(GUESTS / "loop.wat"), "--deadline-ms", "50", env=env)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == 504
    # the C example, with a KV file kept between runs; printf goes to the log (stderr)
    kv = str(tmp_path / "todo.db")
    post = {"method": "POST", "path": "/todos", "body": json.dumps({"title": "t"})}
    r = tallow("fn", "run", str(EXAMPLES / "todo" / "todo.wasm"), "--kv", kv, "--request", json.dumps(post), env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == 201, r.stderr
    assert "created todo 1" in r.stderr and "panicked" not in r.stderr
    r = tallow("fn", "run", str(EXAMPLES / "todo" / "todo.wasm"), "--kv", kv, "--raw",
               "--request", json.dumps({"path": "/todos"}), env=env)
    assert json.loads(r.stdout) == [{"id": 1, "title": "t", "done": False}]
