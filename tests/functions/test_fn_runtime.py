"""The runtime: the ABI's request and response calls, traps, limits, the
sandbox, isolation between requests, the compiled-module cache."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from fn_helpers import spec

from tallow.functions import FunctionConfigError, abi
from tallow.functions.runtime import FnRequest, FunctionError, ModuleCache


def test_hello_request_and_response(make_runtime):
    rt = make_runtime(spec("hello"))
    out = rt.call("hello", FnRequest("PUT", "/hello/world"))
    assert out.status == 200 and out.body == b"hello /hello/world"
    assert ("content-type", "text/plain") in out.headers and ("x-method", "PUT") in out.headers
    assert out.fuel_used > 0


def test_body_in_chunks_query_status_two_call(make_runtime):
    rt = make_runtime(spec("echo"))
    body = bytes(range(256)) * 41  # not a multiple of the guest's 7-byte reads
    out = rt.call("echo", FnRequest("POST", "/echo", "a=1&b=%20", [], body))
    assert out.status == 201 and out.body == body
    assert out.headers == [("x-query", "a=1&b=%20")]


def test_trap_is_500_naming_the_function(make_runtime):
    rt = make_runtime(spec("trap"))
    with pytest.raises(FunctionError) as e:
        rt.call("trap", FnRequest())
    assert e.value.status == 500 and e.value.kind == "trap" and "'trap'" in e.value.message
    assert "unreachable" in e.value.message


def test_infinite_loop_stops_at_the_deadline(make_runtime):
    rt = make_runtime(spec("loop", limits={"deadline_ms": 100}))
    t0 = time.monotonic()
    with pytest.raises(FunctionError) as e:
        rt.call("loop", FnRequest())
    took = time.monotonic() - t0
    # The deadline stopped it (with 2e9 units of fuel the loop would otherwise run on and end as
    # "fuel"), and not before the deadline; how soon after it is the benchmark's business
    # (benchmarks/bench_functions_hostile.py), not a test's on a shared machine.
    assert e.value.status == 504 and e.value.kind == "deadline" and "deadline" in e.value.message
    assert took >= 0.1  # never before its deadline, even after the epoch ticker caught up a lag


def test_fuel_runs_out(make_runtime):
    rt = make_runtime(spec("loop", limits={"fuel": 1_000_000, "deadline_ms": 10_000}))
    with pytest.raises(FunctionError) as e:
        rt.call("loop", FnRequest())
    assert e.value.status == 504 and e.value.kind == "fuel" and "fuel" in e.value.message


def test_memory_bomb_is_capped(make_runtime):
    rt = make_runtime(spec("bomb", limits={"memory_mib": 8}))
    with pytest.raises(FunctionError) as e:
        rt.call("bomb", FnRequest())
    assert e.value.status == 500 and e.value.kind == "trap"
    # the server keeps serving: the next call of another function works
    rt2 = make_runtime(spec("hello"))
    assert rt2.call("hello", FnRequest()).status == 200


def test_module_needing_more_memory_than_its_limit(make_runtime, tmp_path):
    big = tmp_path / "big.wat"
    big.write_text('(module (memory (export "memory") 200) (func (export "handle") (result i32) (i32.const 0)))')
    rt = make_runtime(spec("big", big, limits={"memory_mib": 4}))
    with pytest.raises(FunctionError) as e:
        rt.call("big", FnRequest())
    assert e.value.status == 500 and e.value.kind == "instantiate"


def test_sandbox_denies_files_sockets_environment(make_runtime, monkeypatch):
    monkeypatch.setenv("TALLOW_SECRET", "do-not-leak")
    rt = make_runtime(spec("sandbox"))
    open_passwd, prestat, env_count, arg_count, accept = struct.unpack("<5i", rt.call("sandbox", FnRequest()).body)
    EBADF = 8
    assert open_passwd == EBADF  # no preopened directory: no path can be opened
    assert prestat == EBADF      # fd 3 is not a preopen
    assert env_count == 0 and arg_count == 0
    assert accept != 0           # no socket to accept on


def test_1000_requests_to_a_stateful_guest_leak_nothing(make_runtime):
    rt = make_runtime(spec("counter"))
    answers = {rt.call("counter", FnRequest()).body for _ in range(1000)}
    assert answers == {b"g=1 m=1 t=0 k=0"}


def test_concurrent_calls_from_threads(make_runtime):
    rt = make_runtime(spec("echo"), spec("loop", limits={"deadline_ms": 150}))
    errors = []

    def worker(i):
        try:
            for j in range(50):
                body = f"{i}-{j}".encode()
                assert rt.call("echo", FnRequest("POST", "/", "", [], body)).body == body
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def looper():
        with pytest.raises(FunctionError):
            rt.call("loop", FnRequest())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)] + [threading.Thread(target=looper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_missing_export_and_ungranted_import_fail_at_load(make_runtime):
    with pytest.raises(FunctionConfigError, match=r"function 'noexport'.*does not export 'handle"):
        make_runtime(spec("noexport"))
    with pytest.raises(FunctionConfigError, match=r"function 'ungranted'.*embed_text.*not granted"):
        make_runtime(spec("ungranted"))
    make_runtime(spec("ungranted", host_functions=["embed_text"]))  # granted: loads


def test_unknown_import_and_invalid_module(make_runtime, tmp_path):
    bad = tmp_path / "sys.wat"
    bad.write_text('(module (import "env" "system" (func)) (memory (export "memory") 1) '
                   '(func (export "handle") (result i32) (i32.const 0)))')
    with pytest.raises(FunctionConfigError, match=r"env\.system"):
        make_runtime(spec("sys", bad))
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm\x01\0\0\0garbage")
    with pytest.raises(FunctionConfigError, match=r"function 'junk'.*not a valid module"):
        make_runtime(spec("junk", junk))


def test_compiled_cache_hit_tamper_and_mode(make_runtime, tmp_path):
    cache_dir = tmp_path / "c"
    rt = make_runtime(spec("hello"), cache_dir=cache_dir)
    assert not rt.functions["hello"].from_cache
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    rt2 = make_runtime(spec("hello"), cache_dir=cache_dir)
    assert rt2.functions["hello"].from_cache
    # a file tallow did not write (wrong HMAC) is never deserialised: recompiled instead
    cwasm = next(cache_dir.glob("*.cwasm"))
    data = bytearray(cwasm.read_bytes())
    data[-1] ^= 0xFF
    cwasm.write_bytes(bytes(data))
    rt3 = make_runtime(spec("hello"), cache_dir=cache_dir)
    assert not rt3.functions["hello"].from_cache
    assert rt3.call("hello", FnRequest()).status == 200
    # the key covers the module, the wasmtime version and the engine settings
    wasm = b"\0asm\x01\0\0\0"
    assert ModuleCache.key(wasm) != ModuleCache.key(wasm + b"\0")


def test_cache_dir_permissions_tightened(tmp_path):
    d = tmp_path / "loose"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ModuleCache(d)
    assert (d.stat().st_mode & 0o777) == 0o700
    assert ((d / "cache.key").stat().st_mode & 0o777) == 0o600


def test_error_codes_are_named():
    assert abi.ERRORS[abi.E_STORE_FULL] == "store_full" and len(set(abi.ERRORS.values())) == len(abi.ERRORS)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_bombs_do_not_accumulate(make_runtime):
    """A trapped guest's memory is released at once (not at the next cyclic GC)."""
    rt = make_runtime(spec("bomb", limits={"memory_mib": 32}))
    with pytest.raises(FunctionError):
        rt.call("bomb", FnRequest())
    before = _rss_mib()
    for _ in range(6):
        with pytest.raises(FunctionError):
            rt.call("bomb", FnRequest())
    assert _rss_mib() - before < 48  # 6 x 32 MiB touched; all of it given back


def test_a_lagging_epoch_ticker_never_ends_a_request_before_its_deadline(make_runtime, monkeypatch):
    """The epoch ticker catches up a lag (it was starved: a busy machine, the
    GIL) with a burst of increments; a request that starts during the lag
    must not lose those epochs from its deadline. Simulated by holding the
    ticker for 300 ms, then starting a 100 ms request: its deadline counts
    from its own start, whatever the burst does."""
    from tallow.functions import engine

    rt = make_runtime(spec("loop", limits={"deadline_ms": 100}))
    held = threading.Event()
    real_sleep = engine.time.sleep

    class StarvedClock:  # the ticker's view of time: its sleeps stall until released
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(s):
            held.wait(10)
            real_sleep(s)

    monkeypatch.setattr(engine, "time", StarvedClock)
    real_sleep(0.3)  # the ticker is stuck in its next sleep: 60 epochs of lag build up
    monkeypatch.undo()
    release = threading.Timer(0.02, held.set)  # the burst comes 20 ms into the request
    t0 = time.monotonic()
    release.start()
    try:
        with pytest.raises(FunctionError) as e:
            rt.call("loop", FnRequest())
    finally:
        held.set()
        release.cancel()
    assert e.value.kind == "deadline" and time.monotonic() - t0 >= 0.1
