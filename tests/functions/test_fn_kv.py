"""Key-value stores: Spin's semantics and limits, through the kv.wat guest."""

from __future__ import annotations

import struct
import threading

import pytest

from fn_helpers import kv_answer, kv_body, spec

from tallow.functions import abi
from tallow.functions.limits import KVConfig
from tallow.functions.runtime import FnRequest


@pytest.fixture
def kv(make_runtime):
    rt = make_runtime(spec("kv", limits={"max_body_bytes": 4 << 20}),
                      kv_config=KVConfig(stores=["default", "other"], max_keys=4, max_key_bytes=16,
                                         max_value_bytes=1000))

    def call(op, store="default", key=b"", value=b""):
        return kv_answer(rt.call("kv", FnRequest("POST", "/kv", "", [], kv_body(op, store, key, value))).body)

    call.runtime = rt
    return call


def test_get_set_delete_exists_keys(kv):
    assert kv("g", key=b"a") == (abi.E_NOT_FOUND, b"")   # missing ...
    assert kv("s", key=b"a", value=b"") == (0, b"")
    assert kv("g", key=b"a") == (0, b"")                 # ... is not the empty value
    assert kv("s", key=b"a", value=b"xyz") == (0, b"")   # set overwrites
    assert kv("g", key=b"a") == (3, b"xyz")
    assert kv("e", key=b"a") == (1, b"") and kv("e", key=b"b") == (0, b"")
    assert kv("s", key=b"b\x00\xff", value=bytes(range(256))[:200]) == (0, b"")
    n, keys = kv("k")
    assert n == len(keys) and keys == struct.pack("<I", 1) + b"a" + struct.pack("<I", 3) + b"b\x00\xff"
    assert kv("d", key=b"a") == (0, b"") and kv("d", key=b"a") == (0, b"")  # delete of a missing key succeeds
    assert kv("e", key=b"a") == (0, b"")


def test_increment_is_atomic(kv):
    assert kv("i", key=b"n") == (0, struct.pack("<q", 1))
    threads = [threading.Thread(target=lambda: [kv("i", key=b"n") for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kv("g", key=b"n") == (3, b"101")
    kv("s", key=b"t", value=b"text")
    assert kv("i", key=b"t")[0] == abi.E_NOT_INTEGER


def test_every_limit_has_its_named_error(kv):
    assert kv("o", store="nope")[0] == abi.E_NO_SUCH_STORE
    assert kv("g", key=b"k" * 17)[0] == abi.E_KEY_TOO_LARGE
    assert kv("s", key=b"k" * 17, value=b"v")[0] == abi.E_KEY_TOO_LARGE
    assert kv("s", key=b"big", value=b"v" * 1001)[0] == abi.E_VALUE_TOO_LARGE
    assert kv("s", key=b"ok", value=b"v" * 1000)[0] == 0
    for k in (b"2", b"3", b"4"):
        assert kv("s", key=k, value=b"")[0] == 0
    assert kv("s", key=b"5", value=b"")[0] == abi.E_STORE_FULL
    assert kv("i", key=b"5")[0] == abi.E_STORE_FULL
    assert kv("s", key=b"4", value=b"overwrite")[0] == 0  # an existing key still takes a new value
    assert [abi.ERRORS[c] for c in (abi.E_NO_SUCH_STORE, abi.E_ACCESS_DENIED, abi.E_STORE_FULL,
                                    abi.E_KEY_TOO_LARGE, abi.E_VALUE_TOO_LARGE)] == \
        ["no_such_store", "access_denied", "store_full", "key_too_large", "value_too_large"]


def test_access_denied_and_store_isolation(make_runtime):
    rt = make_runtime(spec("kv", kv_stores=["default"]))
    call = lambda op, store, key=b"", value=b"": kv_answer(  # noqa: E731
        rt.call("kv", FnRequest("POST", "/", "", [], kv_body(op, store, key, value))).body)
    assert call("o", "other")[0] == abi.E_ACCESS_DENIED  # exists, not granted
    assert call("s", "default", b"k", b"v")[0] == 0
    rt2 = make_runtime(spec("kv", kv_stores=["other"]))
    call2 = lambda op, store, key=b"": kv_answer(  # noqa: E731
        rt2.call("kv", FnRequest("POST", "/", "", [], kv_body(op, store, key))).body)
    assert call2("g", "other", b"k")[0] == abi.E_NOT_FOUND  # stores do not share keys


def test_durable_when_the_call_returns(kv, tmp_path):
    assert kv("s", key=b"d", value=b"kept")[0] == 0
    from tallow.store import MetadataStore

    with MetadataStore(tmp_path / "kv.db") as other:  # another connection sees it at once
        assert other.kv_get("default", b"d") == b"kept"
