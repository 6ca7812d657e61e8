"""Server fixtures: real uvicorn servers on free loopback ports, run in a
background thread of the test process (uvicorn installs no signal handlers
off the main thread), each with its own data directory."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from tallow.serve import create_app, load_config

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``uvicorn`` serving ``create_app(config=...)`` until ``stop()``."""

    def __init__(self, config, engine=None):
        self.port = free_port()
        self.app = create_app(engine=engine, config=config)
        self.services = self.app.state.services
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
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


@pytest.fixture(scope="session")
def gpt2_long_dir(tmp_path_factory) -> Path:
    """A random GPT-2 with a 1024-token context (for long streams to cancel)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.testing import train_byte_level_bpe

    out = tmp_path_factory.mktemp("gpt2-long")
    vocab = train_byte_level_bpe(out / "tokenizer.json")
    torch.manual_seed(4)
    cfg = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def full_server(tmp_path_factory, bert_classifier_dir, gpt2_dir, resnet_dir):
    """Every model loaded, the demo corpus indexed, an API key on writes,
    a small body limit (1 MiB) for the 413 tests."""
    data = tmp_path_factory.mktemp("serve-data")
    cfg = make_config(data, **{"models.classifier": str(bert_classifier_dir), "models.generator": str(gpt2_dir),
                               "models.image": str(resnet_dir), "server.api_key": API_KEY,
                               "server.max_body_bytes": 1 << 20, "images.max_megapixels": 2.0,
                               "models.max_completion_tokens": 64})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


@pytest.fixture
def client(full_server):
    with full_server.client() as c:
        yield c


@pytest.fixture
def auth():
    return {"Authorization": f"Bearer {API_KEY}"}
