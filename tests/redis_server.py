"""Real Redis servers for the tests (a pytest plugin, registered by
tests/conftest.py): ``redis-server`` from the Debian package of that name,
which ``make tools`` (run by ``make test``) installs when it is missing.
Each server listens on a free loopback port, persists nothing, and is
stopped by PID. Without the binary the fixtures skip, saying to run
``make tools``.

Fixtures:

* ``redis_url`` (session): ``redis://127.0.0.1:<port>/0`` of one shared server.
  Tests sharing it should use their own key prefix.
* ``redis_server_factory`` (function): ``start(port=None)`` starts a fresh
  server (on ``port``, e.g. a stopped server's, or a free one) and returns a
  ``RedisServer`` with ``.url``, ``.port``, ``.pid`` and ``.stop()``; every
  server it started is stopped after the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

_REDIS_CANDIDATES = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def redis_server_binary() -> str | None:
    """``$TALLOW_REDIS_SERVER``, else redis-server on PATH or in the usual places."""
    env = os.environ.get("TALLOW_REDIS_SERVER")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in _REDIS_CANDIDATES if os.access(p, os.X_OK)), None)


def _skip_without_redis() -> str:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server not found: run `make tools` (installs the Debian package redis-server) "
                    "or set TALLOW_REDIS_SERVER")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``."""

    def __init__(self, binary: str, port: int, workdir: Path):
        self.binary, self.port, self.workdir = binary, port, workdir
        self.log_path = workdir / f"redis-{port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.proc is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited with {code}; "
                                   f"log: {self.log_path.read_text(errors='replace')[-2000:]}")
            if _pings(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout} s")

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 10 s) and waits for it.
        Idempotent."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"


def _start(binary: str, workdir: Path, port: int | None) -> RedisServer:
    if port is not None:
        return RedisServer(binary, port, workdir).start()
    # a free port can be taken between _free_port() and redis binding it
    for attempt in range(3):
        try:
            return RedisServer(binary, _free_port(), workdir).start()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of one redis-server shared by the whole session."""
    binary = _skip_without_redis()
    server = _start(binary, tmp_path_factory.mktemp("redis"), None)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(tmp_path):
    """``start(port=None) -> RedisServer``: fresh servers, all stopped after the test."""
    binary = _skip_without_redis()
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        server = _start(binary, tmp_path / "redis", port)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
