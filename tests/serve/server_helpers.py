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

import httpx
import uvicorn

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
    return load_config(**{"data.dir": str(data_dir), **overrides})
