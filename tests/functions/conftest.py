"""Fixtures for tallow.functions: a runtime with its own compiled cache and
key-value file; every test compiles into a temporary cache, never ~/.cache.
Helpers and the guests' paths are in fn_helpers.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _wasm_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TALLOW_WASM_CACHE", str(tmp_path_factory.getbasetemp() / "wasm-cache"))


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
