"""HTTP server load benchmark (bounded: a fixed request count per run and a
time cap; it stops by itself).

    python benchmarks/bench_server.py [--quick]

Starts `tallow serve` (a subprocess, MiniLM embeddings in fp32 and in INT8,
no demo corpus) on a free loopback port with dynamic batching on
(max_batch_size 32, max_wait_ms 5) and off (max_batch_size 1), and drives POST /v1/embeddings
with 1, 8 and 32 concurrent clients (closed loops on a minimal asyncio
HTTP/1.1 client, one real sentence per request). Reports throughput, p50/p99 latency and errors. Then an overload
run: a queue of 32 and 128 clients sending 8 sentences each; it counts 429s,
probes /health during the storm and samples the server's resident memory.

Client and server share this machine's cores, the same way in both
configurations, so the ratio is what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import environment, percentile, results_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, workdir: Path, name: str, lane: dict, quantize: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = workdir / f"{name}.toml"
        lines = [f"[server]\nport = {self.port}\nlog_level = \"warning\"\n",
                 f"[data]\ndir = \"{workdir / name}\"\ndemo_corpus = false\n",
                 f"[models]\nquantize = \"{'int8' if quantize else ''}\"\n", "[batching.embeddings]"]
        lines += [f"{k} = {v}" for k, v in lane.items()]
        cfg.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "tallow", "serve", "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tallow serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("tallow serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams. The load
    generator shares the 2 cores with the server; httpx costs ~1-2 ms of CPU
    per request, this a few tens of µs (the role wrk plays elsewhere)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head[9:12])
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        data = await self.reader.readexactly(length)
        if "connection: close" in head:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def load(url: str, clients: int, requests: int, texts: list[str], *, per_request: int = 1,
               max_seconds: float = 60.0) -> dict:
    """``clients`` closed loops (each waits for its answer) share a budget of ``requests``."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_i = 0
    stop_at = time.monotonic() + max_seconds

    async def client():
        nonlocal next_i
        conn = RawClient(url)
        try:
            while next_i < requests and time.monotonic() < stop_at:
                i = next_i
                next_i += 1
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                t0 = time.perf_counter()
                try:
                    code, _ = await conn.post("/v1/embeddings", {"input": batch if per_request > 1 else batch[0]})
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    code = -1
                    await conn.close()
                dt = time.perf_counter() - t0
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(dt)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {"clients": clients, "requests": sum(statuses.values()), "ok": ok, "seconds": wall,
            "throughput_rps": ok / wall, "p50_ms": percentile(latencies, 0.5) * 1000 if latencies else None,
            "p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
            "errors": {str(k): v for k, v in statuses.items() if k != 200}}


async def overload(server: Server, texts: list[str], seconds: float) -> dict:
    """128 clients against a queue of 32, while /health is probed and memory sampled."""
    health: list[tuple[int, float]] = []
    rss: list[float] = [rss_mb(server.proc.pid)]
    depth: list[float] = []
    done = asyncio.Event()

    async def probe():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                r = await c.get("/health")
                health.append((r.status_code, (time.perf_counter() - t0) * 1000))
                m = await c.get("/metrics")
                for line in m.text.splitlines():
                    if line.startswith('tallow_queue_depth{lane="embeddings"}'):
                        depth.append(float(line.rsplit(" ", 1)[1]))
                rss.append(rss_mb(server.proc.pid))
                await asyncio.sleep(0.25)

    prober = asyncio.create_task(probe())
    result = await load(server.url, 128, 10**9, texts, per_request=8, max_seconds=seconds)
    done.set()
    await prober
    rss.append(rss_mb(server.proc.pid))
    return {**result, "health_ok": sum(1 for s, _ in health if s == 200), "health_probes": len(health),
            "health_p99_ms": percentile([ms for _, ms in health], 0.99) if health else None,
            "max_queue_depth_seen": max(depth) if depth else None,
            "rss_mb_start": rss[0], "rss_mb_max": max(rss), "rss_mb_end": rss[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from tallow.corpus import docstring_sentences

    texts = [s for s in docstring_sentences(4000) if 20 <= len(s) <= 200][:2000]
    plan = [(1, 40 if args.quick else 150), (8, 80 if args.quick else 400), (32, 160 if args.quick else 800)]
    configs = {"batching on (max_batch_size=32, max_wait_ms=5)": {"max_batch_size": 32, "max_wait_ms": 5.0},
               "batching off (max_batch_size=1)": {"max_batch_size": 1, "max_wait_ms": 0.0}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for precision in ("fp32", "int8"):
            for name, lane in configs.items():
                tag = f"{precision}-{'on' if 'on' in name else 'off'}"
                server = Server(work, tag, lane, quantize=precision == "int8")
                try:
                    server.wait_ready()
                    asyncio.run(load(server.url, 4, 40, texts))  # warm the connection path
                    for clients, n in plan:
                        r = asyncio.run(load(server.url, clients, n, texts))
                        rows.append({"precision": precision, "config": name, **r})
                        print(f"{precision} {name:48s} clients={clients:3d}: {r['throughput_rps']:7.1f} req/s  "
                              f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  errors {r['errors']}",
                              flush=True)
                finally:
                    server.stop()
        server = Server(work, "overload", {"max_batch_size": 32, "max_wait_ms": 5.0, "max_queue": 32})
        try:
            server.wait_ready()
            over = asyncio.run(overload(server, texts, 4.0 if args.quick else 12.0))
        finally:
            server.stop()
        print(f"overload: {json.dumps(over)}", flush=True)

    def speedups(precision: str) -> dict:
        on = {r["clients"]: r for r in rows if r["precision"] == precision and r["config"].startswith("batching on")}
        off = {r["clients"]: r for r in rows if r["precision"] == precision and r["config"].startswith("batching off")}
        return {c: on[c]["throughput_rps"] / off[c]["throughput_rps"] for c in on if c in off}

    speedup = {p: speedups(p) for p in ("fp32", "int8")}
    env = environment()
    out = results_dir(env["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(
        {"env": env, "rows": rows, "batching_speedup": speedup["fp32"],
         "batching_speedup_int8": speedup["int8"], "overload": over}, indent=2))
    lines = ["| model | clients | config | throughput (req/s) | p50 ms | p99 ms | errors | batching speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{speedup[r['precision']][r['clients']]:.2f}×" if r["config"].startswith("batching on") else "—"
        lines.append(f"| MiniLM {r['precision']} | {r['clients']} | {r['config']} | {r['throughput_rps']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {sum(r['errors'].values())} | {sp} |")
    o = over
    lines.append("")
    lines.append(f"Overload (fp32, queue 32, 128 clients × 8 sentences, {o['seconds']:.0f} s): {o['ok']} answered, "
                 f"{o['errors'].get('429', 0)} refused with 429, other errors "
                 f"{sum(v for k, v in o['errors'].items() if k != '429')}; /health {o['health_ok']}/"
                 f"{o['health_probes']} OK (p99 {o['health_p99_ms']:.1f} ms); queue depth ≤ "
                 f"{o['max_queue_depth_seen']:.0f}; server RSS {o['rss_mb_start']:.0f} → max "
                 f"{o['rss_mb_max']:.0f} → {o['rss_mb_end']:.0f} MB.")
    (out / "server.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
