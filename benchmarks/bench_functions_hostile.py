"""Hostile WebAssembly guests (issue 21, item 2): the server's peak RSS while
a 4 MiB guest tries to make it copy far more than its memory, and how soon a
host call bound by the deadline answers 504.

    python benchmarks/bench_functions_hostile.py [--quick]

Over HTTP: starts `tallow serve` (a subprocess of this script, as
bench_functions.py does, no demo corpus) with three test guests of
tests/functions/guests, then, one after another:

- fdwrite_bomb: one WASI fd_write of 1,024 iovecs that each cover the
  guest's whole 4 MiB memory (4 GiB asked for);
- header_bomb: 16 resp_header calls with values of ~3.9 MiB;
- sleeper: poll_oneoff for 60 s under a 200 ms deadline.

Peak RSS is the kernel's high-water mark (VmHWM) of the server process,
reset (``5 > /proc/PID/clear_refs``) after a warm-up request of each kind,
minus the RSS at that moment; a 5 ms sampler of VmRSS cross-checks it. The
time to 504 is measured by the client, from sending the request to the
answer; its overshoot is that minus the deadline.

In process (no HTTP, this process): the same sleep, and a key-value call on a
store the benchmark holds busy, timed around ``Runtime.call``.

These are bounds, not speeds: figures come with the machine they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "functions"))
from bench_functions import RawClient, rss_mb, run_over_http, serve  # noqa: E402
from harness import environment, percentile, results_dir  # noqa: E402

GUESTS = ROOT / "tests" / "functions" / "guests"
DEADLINE_MS = 200
GUEST_MIB = 4  # the memory of fdwrite_bomb.wat and header_bomb.wat

TOML = f"""
[server]
log_level = "warning"
[data]
demo_corpus = false

[[functions]]
name = "fdwrite_bomb"
route = "/fdwrite"
methods = ["POST"]
module = "{GUESTS}/fdwrite_bomb.wat"

[[functions]]
name = "header_bomb"
route = "/headers"
methods = ["POST"]
module = "{GUESTS}/header_bomb.wat"

[[functions]]
name = "sleeper"
route = "/sleep"
methods = ["POST"]
module = "{GUESTS}/sleeper.wat"
limits = {{ deadline_ms = {DEADLINE_MS} }}
"""

SLEEP_60S = struct.pack("<IQ", 0, 60 * 10**9)


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ms_stats(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5), "max_ms": max(xs), "min_ms": min(xs)}


async def peak_rss(port: int, pid: int, path: str, body: bytes, n: int) -> dict:
    c = RawClient(port)
    status, answer = await c.request("POST", path, body)  # warm-up: code paths, allocator arenas
    first = (status, answer[:64].hex())
    rss0 = rss_mb(pid)
    reset = reset_hwm(pid)
    samples = [rss0]
    done = asyncio.Event()

    async def sampler():
        while not done.is_set():
            samples.append(rss_mb(pid))
            await asyncio.sleep(0.005)

    task = asyncio.create_task(sampler())
    statuses, took = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        status, answer = await c.request("POST", path, body)
        took.append((time.perf_counter() - t0) * 1000)
        statuses.append(status)
    done.set()
    await task
    await c.close()
    hwm = hwm_mb(pid)
    return {"path": path, "requests": n, "statuses": sorted(set(statuses)), "first_answer": first,
            "answer_hex": answer[:16].hex(), "answer_ms": ms_stats(took), "rss_mb_before": rss0,
            "hwm_reset": reset, "peak_growth_mb": (hwm - rss0) if reset else float("nan"),
            "sampled_growth_mb": max(samples) - rss0}


async def deadline_504(port: int, n: int) -> dict:
    c = RawClient(port)
    took, statuses = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = await c.request("POST", "/sleep", SLEEP_60S)
        took.append((time.perf_counter() - t0) * 1000)
        statuses.append(status)
    await c.close()
    over = [t - DEADLINE_MS for t in took]
    return {"deadline_ms": DEADLINE_MS, "statuses": sorted(set(statuses)), "answer_ms": ms_stats(took),
            "overshoot_ms_max": max(over), "overshoot_ms_p50": percentile(over, 0.5)}


async def over_http(port: int, pid: int, quick: bool) -> dict:
    n = 3 if quick else 10
    return {"fd_write": await peak_rss(port, pid, "/fdwrite", b"", n),
            "headers": await peak_rss(port, pid, "/headers", b"", n),
            "sleep_504": await deadline_504(port, n)}


class _BusyStore:
    """A metadata store whose reads wait until released (a store held by a long write)."""

    def __init__(self):
        self.free = threading.Event()

    def kv_get(self, store, key):
        self.free.wait(60)
        return None


def in_process(quick: bool) -> dict:
    from fn_helpers import kv_body, spec

    from tallow.functions.kv import KV
    from tallow.functions.limits import KVConfig
    from tallow.functions.runtime import FnRequest, FunctionError, Runtime

    n = 5 if quick else 20
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        busy = _BusyStore()
        kv = KV(config=KVConfig(stores=["default"]), store=busy)
        rt = Runtime(kv=kv, cache_dir=Path(tmp) / "cache")
        rt.load(spec("sleeper", limits={"deadline_ms": DEADLINE_MS}))
        rt.load(spec("kv", limits={"deadline_ms": DEADLINE_MS}))
        for name, fn, body in (("sleep_60s", "sleeper", SLEEP_60S),
                               ("kv_get_on_a_busy_store", "kv", kv_body("g", "default", b"k"))):
            took, kinds = [], set()
            for _ in range(n):
                t0 = time.perf_counter()
                try:
                    rt.call(fn, FnRequest("POST", "/", "", [], body))
                    kinds.add("answered")
                except FunctionError as exc:
                    kinds.add(f"{exc.status} {exc.kind}")
                took.append((time.perf_counter() - t0) * 1000)
            over = [t - DEADLINE_MS for t in took]
            out[name] = {"outcome": sorted(kinds), "answer_ms": ms_stats(took), "overshoot_ms_max": max(over),
                         "overshoot_ms_p50": percentile(over, 0.5)}
        busy.free.set()
        kv.close()
    return out


def markdown(res: dict) -> str:
    h, ip = res["http"], res["in_process"]
    lines = ["| measure | figure |", "|---|---|"]
    for key, what in (("fd_write", "fd_write of 1,024 iovecs × all memory (4 GiB asked)"),
                      ("headers", "16 resp_header of ~3.9 MiB")):
        r = h[key]
        lines.append(f"| {GUEST_MIB} MiB guest, {what}, ×{r['requests']} | {r['statuses']}; server peak RSS "
                     f"**+{r['peak_growth_mb']:.1f} MB** (VmHWM; sampled +{r['sampled_growth_mb']:.1f}) over "
                     f"{r['rss_mb_before']:.0f} MB; {r['answer_ms']['p50_ms']:.1f} ms p50 |")
    s = h["sleep_504"]
    lines.append(f"| poll_oneoff 60 s, deadline {s['deadline_ms']} ms, over HTTP | {s['statuses']} in "
                 f"{s['answer_ms']['p50_ms']:.1f} ms p50; **overshoot ≤ {s['overshoot_ms_max']:.1f} ms** "
                 f"(p50 {s['overshoot_ms_p50']:.1f}, n={s['answer_ms']['n']}) |")
    for key, what in (("sleep_60s", "poll_oneoff 60 s"), ("kv_get_on_a_busy_store", "kv_get on a busy store")):
        r = ip[key]
        lines.append(f"| {what}, deadline {DEADLINE_MS} ms, in process | {r['outcome']}; overshoot ≤ "
                     f"{r['overshoot_ms_max']:.1f} ms (p50 {r['overshoot_ms_p50']:.1f}, n={r['answer_ms']['n']}) |")
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
    out = results_dir(res["env"]["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "functions_hostile.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "functions_hostile.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
