"""Hostile guests: what a guest hands the host through a call is bounded
before it is copied and paid for before it is copied, the log cannot be
flooded or forged, and host calls end at the request's deadline."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading

import pytest

from fn_helpers import kv_body, spec

from tallow.functions import abi
from tallow.functions.limits import KVConfig, Limits
from tallow.functions.runtime import FnRequest, FunctionError, Host, Runtime

MiB = 1 << 20
NEVER_HANG_S = 30  # a guard against a hang, not a speed bound


def post(body: bytes = b"") -> FnRequest:
    return FnRequest("POST", "/", "", [], body)


def call_in_thread(fn, timeout_s: float = NEVER_HANG_S):
    """fn() in a thread; its result or exception, or AssertionError if it is still running after timeout_s."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"the call had not returned after {timeout_s} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- fd_write -----------------------------------------------------------------------------------

def test_fd_write_of_1024_iovecs_over_all_memory_is_a_short_write(make_runtime):
    """4 GiB asked for in one call (1,024 iovecs x 4 MiB): at most MAX_FD_WRITE_BYTES is taken
    and paid for; nwritten says so, as a POSIX short write does."""
    rt = make_runtime(spec("fdwrite_bomb"))
    out = call_in_thread(lambda: rt.call("fdwrite_bomb", post()))
    errno, nwritten = struct.unpack("<ii", out.body)
    assert errno == 0 and nwritten == abi.MAX_FD_WRITE_BYTES
    assert out.fuel_used < 4 * abi.MAX_FD_WRITE_BYTES  # paid for what was taken, not for 4 GiB


def test_fd_write_to_another_descriptor_or_too_many_iovecs(make_runtime):
    rt = make_runtime(spec("fdwrite_bomb"))
    EBADF, EINVAL = 8, 28
    assert struct.unpack("<ii", rt.call("fdwrite_bomb", post(struct.pack("<II", 4, 5))).body)[0] == EBADF
    assert struct.unpack("<ii", rt.call("fdwrite_bomb", post(struct.pack("<II", 1025, 1))).body)[0] == EINVAL


# -- response headers ---------------------------------------------------------------------------

def _header_results(rt, n: int, length: int) -> tuple[list[int], list]:
    out = rt.call("header_bomb", post(struct.pack("<II", n, length)))
    return list(struct.unpack(f"<{n}i", out.body)), out.headers


def test_headers_over_the_byte_cap_are_refused_before_they_are_copied(make_runtime):
    rt = make_runtime(spec("header_bomb"))
    out = call_in_thread(lambda: rt.call("header_bomb", post()))  # 16 headers of ~3.9 MiB
    assert list(struct.unpack("<16i", out.body)) == [abi.E_LIMIT] * 16 and out.headers == []
    assert out.fuel_used < 2 * 4128768  # its memory.fill, not 16 copies charged per byte: refused before


def test_header_bytes_are_capped_in_all(make_runtime):
    per = len("x-big") + 1000 + 4  # name, value, ": " and CRLF
    cap = Limits().max_response_header_bytes
    rt = make_runtime(spec("header_bomb"))
    rcs, headers = _header_results(rt, 64, 1000)
    fit = cap // per
    assert rcs == [0] * fit + [abi.E_LIMIT] * (64 - fit)
    assert len(headers) == fit and sum(len(k) + len(v) + 4 for k, v in headers) <= cap


def test_header_bytes_count_against_max_response_bytes(make_runtime):
    rt = make_runtime(spec("header_bomb", limits={"max_response_bytes": 5000}))
    rcs, _ = _header_results(rt, 8, 1000)
    assert rcs == [0] * 4 + [abi.E_LIMIT] * 4  # 4 x 1009 bytes fit in 5000, not 5 (the cap is 16 KiB)


# -- log ----------------------------------------------------------------------------------------

def _log_request(count: int, level: int, message: bytes) -> FnRequest:
    return post(struct.pack("<II", count, level) + message)


@pytest.mark.parametrize("level", [1, 4], ids=["log", "stdout"])
def test_a_guest_cannot_forge_a_log_line(make_runtime, caplog, level):
    rt = make_runtime(spec("logger"))
    forged = b"ok\nfunction admin: login accepted\r\x1b[1A\x1b[2K\xe2\x80\xa8fake\x00"
    with caplog.at_level(logging.DEBUG, logger="tallow.functions"):
        out = rt.call("logger", _log_request(1, level, forged))
    assert struct.unpack("<i", out.body)[0] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "tallow.functions"]
    text = "\n".join(lines)
    assert "login accepted" in text  # logged...
    assert not any(line.startswith("function admin") for line in text.split("\n"))  # ...never as its own line
    for line in lines:
        assert not any(c in line for c in "\r\x1b\x00\u2028"), repr(line)
    if level == 1:
        assert r"ok\x0afunction admin: login accepted\x0d\x1b[1A\x1b[2K\u2028fake\x00" in text


@pytest.mark.parametrize("level", [1, 4], ids=["log", "stdout"])
def test_log_bytes_are_capped_per_request(make_runtime, caplog, level):
    rt = make_runtime(spec("logger", limits={"max_log_bytes": 10_000}))
    message = b"x" * 999 + b"\n"
    with caplog.at_level(logging.DEBUG, logger="tallow.functions"):
        out = rt.call("logger", _log_request(100, level, message))
    rcs = struct.unpack("<100i", out.body)
    if level == 1:
        assert rcs == (0,) * 10 + (abi.E_LIMIT,) * 90  # the guest is told
    else:
        assert set(rcs) == {0}  # a full log drops stdout, as /dev/null would (libc must not retry forever)
    logged = sum(r.getMessage().count("x" * 999) for r in caplog.records if r.name == "tallow.functions")
    assert logged == 10
    assert sum("max_log_bytes" in r.getMessage() for r in caplog.records) == 1  # said once


# -- fuel before copying ------------------------------------------------------------------------

class RecordingHost(Host):
    def __init__(self):
        self.texts: list[int] = []

    def embed_text(self, text, timeout_s):
        import numpy as np

        self.texts.append(len(text))
        return np.zeros(4, dtype="<f4")


def test_a_copy_is_paid_for_before_it_happens(make_runtime):
    host = RecordingHost()
    text_bytes = MiB
    fuel = abi.FUEL_MODEL + 200_000  # the call's price, but not a MiB more
    rt = make_runtime(spec("embed_big", host_functions=["embed_text"], limits={"fuel": fuel}), host=host)
    with pytest.raises(FunctionError) as e:
        rt.call("embed_big", post(struct.pack("<I", text_bytes)))
    assert e.value.status == 504 and e.value.kind == "fuel"
    assert host.texts == []  # the text was never read, so never reached the model
    out = rt.call("embed_big", post(struct.pack("<I", 1000)))  # paid for: read and embedded
    assert struct.unpack("<i", out.body)[0] == 16 and host.texts == [1000]


def test_arguments_over_their_limit_are_refused_before_they_are_copied(make_runtime):
    host = RecordingHost()
    rt = make_runtime(spec("embed_big", host_functions=["embed_text"]), host=host)
    out = rt.call("embed_big", post(struct.pack("<I", abi.MAX_TEXT_BYTES + 1)))
    assert struct.unpack("<i", out.body)[0] == abi.E_LIMIT and host.texts == []
    assert out.fuel_used < abi.FUEL_MODEL + MiB


def test_kv_set_out_of_fuel_stores_nothing(make_runtime):
    kv_config = KVConfig(stores=["default"], max_value_bytes=100_000)
    rt = make_runtime(spec("kv", limits={"max_body_bytes": 4 * MiB}), kv_config=kv_config)
    small = rt.call("kv", post(kv_body("s", "default", b"k", b"v"))).fuel_used
    value = b"v" * 90_000
    # enough for everything up to kv_set's copy of the value (the body read included), not for the copy
    fuel = small + 1000 + len(value) * 3 // 2  # one more body read, then the value once: not twice
    rt2 = make_runtime(spec("kv", limits={"max_body_bytes": 4 * MiB, "fuel": fuel}),
                       kv_config=kv_config)
    with pytest.raises(FunctionError) as e:
        rt2.call("kv", post(kv_body("s", "default", b"big", value)))
    assert e.value.kind == "fuel"
    assert rt2.kv.get("default", b"big") is None


# -- the deadline reaches host calls ------------------------------------------------------------

def _sleep(rt, seconds: float, absolute: bool = False):
    return rt.call("sleeper", post(struct.pack("<IQ", int(absolute), int(seconds * 1e9))))


def test_a_sleep_past_the_deadline_answers_504(make_runtime):
    rt = make_runtime(spec("sleeper", limits={"deadline_ms": 200}))
    with pytest.raises(FunctionError) as e:
        call_in_thread(lambda: _sleep(rt, 60))
    assert e.value.status == 504 and e.value.kind == "deadline"


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_a_sleep_within_the_deadline_sleeps(make_runtime, absolute):
    rt = make_runtime(spec("sleeper", limits={"deadline_ms": 10_000}))
    body = _sleep(rt, 0.02, absolute).body
    errno, nevents = struct.unpack("<ii", body[:8])
    userdata, error, kind = struct.unpack("<QHB", body[8:19])
    before, after = struct.unpack("<QQ", body[40:56])
    assert (errno, nevents, userdata, error, kind) == (0, 1, 0x1234, 0, 0)
    assert after - before >= 20_000_000  # never wakes early, by the guest's own clock


class GatedStore:
    """A metadata store whose reads wait for a gate the test holds (a store held by a long write)."""

    def __init__(self):
        self.gate = threading.Event()

    def kv_get(self, store, key):
        self.gate.wait(4 * NEVER_HANG_S)
        return None

    def close(self):
        pass


def test_a_kv_call_on_a_busy_store_answers_504_at_the_deadline(tmp_path):
    from tallow.functions.kv import KV

    store = GatedStore()
    kv = KV(config=KVConfig(stores=["default"]), store=store)
    rt = Runtime(kv=kv, cache_dir=tmp_path / "cache")
    rt.load(spec("kv", limits={"deadline_ms": 200}))
    try:
        with pytest.raises(FunctionError) as e:
            call_in_thread(lambda: rt.call("kv", post(kv_body("g", "default", b"k"))))
        assert e.value.status == 504 and e.value.kind == "deadline"
        # Answered while the store was still busy (its operation queued or running: a loaded
        # machine may not have started it by the deadline; both must end in the 504).
        assert not store.gate.is_set()
    finally:
        store.gate.set()
        kv.close()


# -- memory: the server's peak RSS stays near the guest's own memory ----------------------------

_PEAK_RSS_CHILD = textwrap.dedent("""
    import struct, sys
    sys.path.insert(0, sys.argv[1])
    from fn_helpers import spec
    from tallow.functions.runtime import FnRequest, Runtime
    rt = Runtime(cache_dir=sys.argv[2])
    for name in ("fdwrite_bomb", "header_bomb", "logger"):
        rt.load(spec(name))
    def post(body=b""):
        return FnRequest("POST", "/", "", [], body)
    rt.call("fdwrite_bomb", post(struct.pack("<II", 1, 1)))  # every path warmed up once
    rt.call("header_bomb", post(struct.pack("<II", 1, 10)))
    def status(field):  # this process's own (ru_maxrss would start from the parent's peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    before = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark starts again from now
    except OSError:
        print("no-reset")  # VmHWM would hold the peaks of compiling and warming up
        sys.exit(0)
    for _ in range(3):
        rt.call("fdwrite_bomb", post())                    # 1,024 iovecs x 4 MiB
        rt.call("header_bomb", post())                     # 16 headers x ~4 MiB
        rt.call("logger", post(struct.pack("<II", 1, 1) + b"y" * 900_000))
    print(status("VmHWM") - before)
""")


def test_hostile_copies_keep_peak_rss_near_the_guest_memory(tmp_path):
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, os.path.dirname(__file__), str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.split()[-1] == "no-reset":
        pytest.skip("this kernel does not let a process reset its RSS high-water mark (/proc/self/clear_refs)")
    growth_kib = int(r.stdout.split()[-1])
    assert growth_kib < (4 + 32) * 1024, f"peak RSS grew by {growth_kib / 1024:.1f} MiB for a 4 MiB guest"
