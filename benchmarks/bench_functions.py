"""WebAssembly functions benchmark (issue 13): cold start, cache speed-up,
added latency over a native route, throughput, and the sandbox's limits.

    python benchmarks/bench_functions.py [--quick]

In process: compiling the Todo example (C, 37 KB) vs loading it from the
compiled cache, and the cold start from the cache to the first response
(a fresh Runtime: cache lookup, HMAC check, deserialise, InstancePre,
Store, instantiate, handle()).

Over HTTP: starts `tallow serve` (a subprocess of this script, no demo
corpus) with the test guests mounted as functions, plus a native Python
route doing the same work as guests/hello.wat ("hello <path>", two
headers) through the same app, middlewares and uvicorn. Requests to the two
routes are interleaved one by one on one keep-alive connection, so the p50
difference is the function route's added cost. Then 8 concurrent clients
on each route, an infinite loop against its deadline while the native route
is timed, a memory bomb while the server's RSS is sampled, the sandbox
probes, every KV limit, and 1,000 requests to a stateful guest.

Client and server share this machine's (2) cores; the machine is shared
with other work, so read the ratios and differences, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from harness import environment, percentile, results_dir  # noqa: E402
from fastapi import Request  # noqa: E402  (module level: the native route's annotation must resolve)

GUESTS = ROOT / "tests" / "functions" / "guests"
TODO = ROOT / "examples" / "functions" / "todo" / "todo.wasm"
DEADLINE_MS = 200
KV_MAX_KEYS = 8

TOML = f"""
[server]
log_level = "warning"
[data]
demo_corpus = false
[kv]
stores = ["default", "other"]
max_keys = {KV_MAX_KEYS}

[[functions]]
name = "hello"
route = "/hello/..."
methods = ["GET"]
module = "{GUESTS}/hello.wat"

[[functions]]
name = "loop"
route = "/loop"
module = "{GUESTS}/loop.wat"
limits = {{ deadline_ms = {DEADLINE_MS} }}

[[functions]]
name = "bomb"
route = "/bomb"
module = "{GUESTS}/bomb.wat"
limits = {{ memory_mib = 64 }}

[[functions]]
name = "sandbox"
route = "/sandbox"
module = "{GUESTS}/sandbox.wat"

[[functions]]
name = "counter"
route = "/counter"
module = "{GUESTS}/counter.wat"

[[functions]]
name = "kv"
route = "/kv"
methods = ["POST"]
module = "{GUESTS}/kv.wat"
kv_stores = ["default"]
limits = {{ max_body_bytes = 2097152 }}

[[functions]]
name = "todo"
route = "/todos/..."
methods = ["GET", "POST", "PUT", "DELETE"]
module = "{TODO}"
"""


# -- the server (this script, run with --serve) --------------------------------------------

def serve(config: str, port: int) -> None:
    import uvicorn
    from fastapi import Request
    from fastapi.responses import Response

    from tallow.serve import create_app, load_config

    app = create_app(config=load_config(config, **{"server.port": port}))

    async def native(request: Request) -> Response:
        """What guests/hello.wat does, in Python."""
        await request.body()
        resp = Response(content=b"hello " + request.url.path.encode(), status_code=200)
        resp.raw_headers.extend([(b"content-type", b"text/plain"), (b"x-method", request.method.encode())])
        return resp

    app.add_api_route("/native/{path:path}", native, methods=["GET"], response_class=Response)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def run_over_http(script: str, toml: str, measure, quick: bool):
    """``measure(port, server_pid, quick)`` (a coroutine function) against a
    server serving ``toml`` (its [data] dir set to a temporary one) from a
    subprocess of ``script`` (its hidden --serve mode), with a fresh module
    cache; the measurement starts once /ready answers, so the embedder's
    loading does not share the measurements' cores."""
    import os

    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "tallow.toml"
        cfg.write_text(toml.replace("[data]\n", f"[data]\ndir = \"{tmp}/data\"\n"))
        port = free_port()
        proc = subprocess.Popen([sys.executable, script, "--serve", str(cfg), str(port)],
                                env={**os.environ, "TALLOW_WASM_CACHE": f"{tmp}/cache"}, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, "the server exited"
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.3)
            return asyncio.run(measure(port, proc.pid, quick))
        finally:
            proc.terminate()
            proc.wait(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RawClient:
    """A minimal keep-alive HTTP/1.1 client (httpx costs ~1 ms of CPU per request)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
                          .encode() + body)
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head[9:12])
        length = int(head.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in head else 0
        data = await self.reader.readexactly(length)
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5) * 1000, "p90_ms": percentile(xs, 0.9) * 1000,
            "p99_ms": percentile(xs, 0.99) * 1000}


# -- in process ------------------------------------------------------------------------------

def in_process(quick: bool) -> dict:
    from tallow.functions import parse_functions
    from tallow.functions.runtime import (FnRequest, ModuleCache, Runtime, describe_module, read_module,
                                         shared_engine)

    engine, _ = shared_engine()  # the server's engine exists before any function loads
    wasm = read_module(TODO)
    reps = 5 if quick else 15
    compile_s, load_s, cold_s, warm_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = ModuleCache(Path(tmp) / "cache")
        key = ModuleCache.key(wasm)
        from wasmtime import Module

        first = Module(engine, wasm)
        cache.store(key, first, describe_module(first))
        for _ in range(reps):  # interleaved: one compile, one cache load per round
            t0 = time.perf_counter()
            Module(engine, wasm)
            compile_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert cache.load(engine, key) is not None
            load_s.append(time.perf_counter() - t0)
        spec = parse_functions([{"name": "todo", "route": "/todos/...", "module": str(TODO)}], ".")[0]
        req = FnRequest("GET", "/todos/1")  # a KV lookup that answers 404
        from tallow.functions.kv import KV

        kv = KV(":memory:")
        kv.store  # the server opens its metadata store once, at start
        for _ in range(10 if quick else 40):
            t0 = time.perf_counter()
            rt = Runtime(kv=kv, cache_dir=Path(tmp) / "cache")
            fn = rt.load(spec)
            out = rt.call("todo", req)
            cold_s.append(time.perf_counter() - t0)
            assert fn.from_cache and out.status == 404, out
        for _ in range(200 if quick else 1000):
            t0 = time.perf_counter()
            rt.call("todo", req)
            warm_s.append(time.perf_counter() - t0)
    c, l_ = statistics.median(compile_s), statistics.median(load_s)
    return {"module": "examples/functions/todo/todo.wasm", "module_bytes": len(wasm),
            "compile_ms": stats(compile_s), "cache_load_ms": stats(load_s), "cache_speedup": c / l_,
            "cold_start_from_cache_ms": stats(cold_s), "warm_call_ms": stats(warm_s)}


# -- over HTTP ---------------------------------------------------------------------------------

async def interleaved(port: int, n: int) -> dict:
    a, b = RawClient(port), RawClient(port)
    fn, native = [], []
    for i in range(n + 50):
        for client, path, out in ((a, "/hello/x", fn), (b, "/native/x", native)) if i % 2 else \
                ((b, "/native/x", native), (a, "/hello/x", fn)):
            t0 = time.perf_counter()
            status, body = await client.request("GET", path)
            dt = time.perf_counter() - t0
            assert status == 200 and body.startswith(b"hello /"), (status, body)
            if i >= 50:
                out.append(dt)
    await a.close()
    await b.close()
    diffs = stats(fn)["p50_ms"] - stats(native)["p50_ms"]
    return {"function": stats(fn), "native": stats(native), "added_p50_ms": diffs}


async def throughput(port: int, path: str, clients: int, requests: int) -> dict:
    lat: list[float] = []
    left = [requests]
    bad = [0]

    async def one():
        c = RawClient(port)
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            status, _ = await c.request("GET", path)
            lat.append(time.perf_counter() - t0)
            bad[0] += status != 200
        await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"path": path, "clients": clients, "requests": requests, "errors": bad[0], "rps": requests / wall,
            **stats(lat)}


async def native_latencies(port: int, n: int) -> list[float]:
    c, out = RawClient(port), []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await c.request("GET", "/native/x")
        out.append(time.perf_counter() - t0)
        assert status == 200
    await c.close()
    return out


async def deadline_run(port: int, loops: int, probes: int) -> dict:
    baseline = await native_latencies(port, probes)
    loop_times: list[float] = []
    statuses: list[int] = []
    done = asyncio.Event()

    async def looper():
        c = RawClient(port)
        for _ in range(loops):
            t0 = time.perf_counter()
            status, body = await c.request("GET", "/loop")
            loop_times.append(time.perf_counter() - t0)
            statuses.append(status)
        await c.close()
        done.set()

    task = asyncio.create_task(looper())
    during: list[float] = []
    while not done.is_set():
        during += await native_latencies(port, 20)
    await task
    over = [t * 1000 - DEADLINE_MS for t in loop_times]
    return {"deadline_ms": DEADLINE_MS, "statuses": sorted(set(statuses)), "loops": loops,
            "answer_ms": stats(loop_times), "overshoot_ms_max": max(over), "overshoot_ms_p50": percentile(over, 0.5),
            "other_route_baseline": stats(baseline), "other_route_during_loops": stats(during)}


async def bomb_run(port: int, pid: int, n: int) -> dict:
    rss = [rss_mb(pid)]
    statuses = []
    done = asyncio.Event()

    async def sampler():
        while not done.is_set():
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.005)

    task = asyncio.create_task(sampler())

    async def one():
        c = RawClient(port)
        for _ in range(n // 2):
            status, body = await c.request("GET", "/bomb")
            statuses.append((status, json.loads(body)["error"]["message"]))
        await c.close()

    await asyncio.gather(one(), one())
    done.set()
    await task
    return {"requests": len(statuses), "statuses": sorted({s for s, _ in statuses}), "message": statuses[0][1],
            "memory_mib_limit": 64, "concurrent": 2, "rss_mb_before": rss[0], "rss_mb_max": max(rss),
            "rss_mb_after": rss_mb(pid)}


def kv_body(op: str, store: str, key: bytes = b"", value: bytes = b"") -> bytes:
    return op.encode() + bytes([len(store)]) + store.encode() + struct.pack("<H", len(key)) + key + value


async def kv_limits(port: int) -> dict:
    from tallow.functions.abi import ERRORS

    c = RawClient(port)

    async def call(*a) -> str:
        status, body = await c.request("POST", "/kv", kv_body(*a))
        code = struct.unpack("<i", body[:4])[0]
        return ERRORS.get(code, str(code))

    out = {"no such store": await call("o", "nope"),
           "access denied": await call("o", "other"),
           "key too large (257 B)": await call("s", "default", b"k" * 257, b"v"),
           "value too large (1 MiB + 1)": await call("s", "default", b"big", b"v" * ((1 << 20) + 1))}
    for i in range(KV_MAX_KEYS):
        await call("s", "default", f"key{i}".encode(), b"")
    out[f"store full ({KV_MAX_KEYS} keys)"] = await call("s", "default", b"one-more", b"")
    await c.close()
    return out


async def sandbox_probe(port: int) -> dict:
    c = RawClient(port)
    status, body = await c.request("GET", "/sandbox")
    await c.close()
    open_passwd, prestat, env, args, accept = struct.unpack("<5i", body)
    return {"open /etc/passwd (errno)": open_passwd, "fd 3 preopen (errno)": prestat, "environment variables": env,
            "arguments": args, "sock_accept (errno)": accept,
            "denied": open_passwd != 0 and prestat != 0 and env == 0 and args == 0 and accept != 0}


async def stateful(port: int, n: int) -> dict:
    c = RawClient(port)
    answers = {}
    for _ in range(n):
        status, body = await c.request("GET", "/counter")
        answers[body] = answers.get(body, 0) + 1
    await c.close()
    return {"requests": n, "distinct_answers": {k.decode(): v for k, v in answers.items()},
            "leaks": n - answers.get(b"g=1 m=1 t=0 k=0", 0)}


async def over_http(port: int, pid: int, quick: bool) -> dict:
    out = {"interleaved": await interleaved(port, 300 if quick else 3000)}
    out["throughput_8_clients"] = [await throughput(port, p, 8, 500 if quick else 4000)
                                   for p in ("/hello/x", "/native/x")]
    out["deadline"] = await deadline_run(port, 3 if quick else 10, 200 if quick else 1000)
    out["memory_bomb"] = await bomb_run(port, pid, 4 if quick else 20)
    out["sandbox"] = await sandbox_probe(port)
    out["kv_limits"] = await kv_limits(port)
    out["stateful"] = await stateful(port, 1000)
    return out


def markdown(res: dict) -> str:
    ip, h = res["in_process"], res["http"]
    il, dl, bomb = h["interleaved"], h["deadline"], h["memory_bomb"]
    tp = {t["path"]: t for t in h["throughput_8_clients"]}
    lines = ["| measure | figure |", "|---|---|",
             f"| compile todo.wasm ({ip['module_bytes'] // 1024} KB, Cranelift) | {ip['compile_ms']['p50_ms']:.2f} ms p50 |",
             f"| load it from the compiled cache (read, HMAC, deserialise, manifest) | {ip['cache_load_ms']['p50_ms']:.3f} ms p50 "
             f"→ **{ip['cache_speedup']:.0f}×** faster |",
             f"| cold start from the cache to the first response, in process | **{ip['cold_start_from_cache_ms']['p50_ms']:.3f} ms** "
             f"p50 ({ip['cold_start_from_cache_ms']['p90_ms']:.3f} p90) |",
             f"| warm call (fresh Store + instance per request), in process | {ip['warm_call_ms']['p50_ms']:.3f} ms p50 |",
             f"| GET through HTTP, function route vs native Python route (interleaved, n={il['function']['n']}) | "
             f"{il['function']['p50_ms']:.3f} vs {il['native']['p50_ms']:.3f} ms p50 → **+{il['added_p50_ms']:.3f} ms** |",
             f"| 8 clients, function route | {tp['/hello/x']['rps']:.0f} req/s (p50 {tp['/hello/x']['p50_ms']:.2f} ms, "
             f"p99 {tp['/hello/x']['p99_ms']:.2f} ms, {tp['/hello/x']['errors']} errors) |",
             f"| 8 clients, native route | {tp['/native/x']['rps']:.0f} req/s (p50 {tp['/native/x']['p50_ms']:.2f} ms, "
             f"p99 {tp['/native/x']['p99_ms']:.2f} ms) |",
             f"| infinite loop, deadline {dl['deadline_ms']} ms | {dl['statuses']} in {dl['answer_ms']['p50_ms']:.1f} ms p50; "
             f"**overshoot ≤ {dl['overshoot_ms_max']:.1f} ms** (n={dl['loops']}) |",
             f"| other route while the loops run | p99 {dl['other_route_during_loops']['p99_ms']:.2f} ms vs "
             f"{dl['other_route_baseline']['p99_ms']:.2f} ms without (p50 {dl['other_route_during_loops']['p50_ms']:.2f} "
             f"vs {dl['other_route_baseline']['p50_ms']:.2f}) |",
             f"| memory bomb, 64 MiB limit, 2 at a time | {bomb['statuses']} ×{bomb['requests']}; server RSS "
             f"{bomb['rss_mb_before']:.0f} → max {bomb['rss_mb_max']:.0f} MB |",
             f"| sandbox: /etc/passwd, preopens, env, args, sockets | "
             f"{'denied' if h['sandbox']['denied'] else 'NOT DENIED'} (errno {h['sandbox']['open /etc/passwd (errno)']}, "
             f"{h['sandbox']['fd 3 preopen (errno)']}, 0 vars, 0 args, errno {h['sandbox']['sock_accept (errno)']}) |",
             "| KV limits | " + ", ".join(f"{k} → `{v}`" for k, v in h["kv_limits"].items()) + " |",
             f"| 1,000 requests to a stateful guest | {h['stateful']['leaks']} leaked "
             f"({len(h['stateful']['distinct_answers'])} distinct answer) |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    res = {"env": environment(), "in_process": in_process(args.quick)}
    print(json.dumps(res["in_process"], indent=1), flush=True)
    res["http"] = run_over_http(__file__, TOML, over_http, args.quick)
    ip, h = res["in_process"], res["http"]
    res["targets"] = {
        "cold_start_ms": {"value": ip["cold_start_from_cache_ms"]["p50_ms"], "target": 2.0,
                          "met": ip["cold_start_from_cache_ms"]["p50_ms"] <= 2.0},
        "cache_speedup": {"value": ip["cache_speedup"], "target": 50.0, "met": ip["cache_speedup"] >= 50.0},
        "added_latency_p50_ms": {"value": h["interleaved"]["added_p50_ms"], "target": 1.0,
                                 "met": h["interleaved"]["added_p50_ms"] <= 1.0},
        "deadline_overshoot_ms": {"value": h["deadline"]["overshoot_ms_max"], "target": 50.0,
                                  "met": h["deadline"]["overshoot_ms_max"] <= 50.0 and h["deadline"]["statuses"] == [504]},
        "memory_bomb": {"value": h["memory_bomb"]["rss_mb_max"] - h["memory_bomb"]["rss_mb_before"],
                        "met": h["memory_bomb"]["statuses"] == [500]},
        "sandbox_denied": {"met": h["sandbox"]["denied"]},
        "kv_named_errors": {"met": list(h["kv_limits"].values()) == ["no_such_store", "access_denied", "key_too_large",
                                                                     "value_too_large", "store_full"]},
        "stateful_leaks": {"value": h["stateful"]["leaks"], "met": h["stateful"]["leaks"] == 0},
    }
    out = results_dir(res["env"]["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "functions.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "functions.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
