"""Fixtures for tallow.functions: WAT guests (guests/), a runtime with its
own compiled cache and key-value file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"
EXAMPLES = Path(__file__).parents[2] / "examples" / "functions"


@pytest.fixture(autouse=True)
def _wasm_cache(tmp_path_factory, monkeypatch):
    """Every test compiles into a session-wide temporary cache, never ~/.cache."""
    monkeypatch.setenv("TALLOW_WASM_CACHE", str(tmp_path_factory.getbasetemp() / "wasm-cache"))


def spec(name: str, module: str | Path | None = None, **entry):
    from tallow.functions import KVConfig, parse_functions

    module = module or GUESTS / f"{name}.wat"
    return parse_functions([{"name": name, "route": f"/{name}", "module": str(module), **entry}], ".",
                           KVConfig(stores=["default", "other"]))[0]


@pytest.fixture
def make_runtime(tmp_path):
    from tallow.functions.kv import KV
    from tallow.functions.limits import KVConfig
    from tallow.functions.runtime import Runtime

    made = []

    def make(*specs, kv_config: KVConfig | None = None, host=None, **kw):
        kv = KV(tmp_path / "kv.db", kv_config or KVConfig(stores=["default", "other"]))
        rt = Runtime(kv=kv, host=host, cache_dir=kw.pop("cache_dir", tmp_path / "cache"), **kw)
        for s in specs:
            rt.load(s)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.kv.close()


def kv_body(op: str, store: str, key: bytes = b"", value: bytes = b"") -> bytes:
    """A request for guests/kv.wat."""
    return op.encode() + bytes([len(store)]) + store.encode() + struct.pack("<H", len(key)) + key + value


def kv_answer(body: bytes) -> tuple[int, bytes]:
    return struct.unpack("<i", body[:4])[0], body[4:]
