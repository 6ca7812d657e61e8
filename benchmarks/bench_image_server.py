"""/v1/images/search under concurrent load, INT8 ResNet-50, against the code
before issue 27 (issue 27, item 3's measure).

    python benchmarks/bench_image_server.py                     # full run (~6 min on 2 cores)
    python benchmarks/bench_image_server.py --quick             # smoke run (~2 min)
    python benchmarks/bench_image_server.py --baseline-rev REV --clients 10 --seconds 30

Two servers, started the same way as bench_server.py starts them (its
``CodeTree``, ``Server`` and ``RawClient``): **baseline** is a git worktree of
``--baseline-rev`` (default: main before issue 27's first commit) with the
installed native module grafted in — so the baseline's Python (per-op INT8
ResNet, torch glue between the kernels) runs on today's kernels and is, if
anything, faster than it was —, **current** the installed package. Both load
the same model: bench_vision's random-weight transformers ``ResNetModel``
(ResNet-50, build/bench-cache/vision) as ``[models] image`` with
``quantize = "int8"``; no classifier or generator; the feature cache off
(``[cache] url = "none"``).

Per server: 8 images stored through POST /v1/images, a warm-up, then
``--clients`` (10) closed-loop clients POST /v1/images/search (k 5) for
``--seconds``, every request a different photo-like 640x480 JPEG (base64 in
JSON), so no request's features can come from another's. Rounds alternate the
servers' order. Reported: requests/s (successful searches / window), p50 / p90
latency, and current / baseline requests/s — the issue's target is >= 2x.

The load generator is bench_server's RawClient (asyncio, a few tens of µs
per request) in this process, sharing the two cores with the server, the same
way for both sides: read the ratio, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_server import CodeTree, RawClient, Side, serving  # noqa: E402
from harness import percentile, write_results  # noqa: E402

BASELINE_REV = "f537c0f^"  # main before issue 27 (the per-op INT8 ResNet)
TARGET_RATIO = 2.0
K = 5


def images_base(model_dir: Path) -> dict:
    return {"models": {"quantize": "int8", "classifier": "", "generator": "", "image": str(model_dir)},
            "cache": {"url": "none"}}


def make_images(n: int, seed: int) -> list[str]:
    import numpy as np
    from bench_preprocess import photo_jpeg

    rng = np.random.default_rng(seed)
    return [base64.b64encode(photo_jpeg(640, 480, rng)).decode() for _ in range(n)]


async def store(url: str, images: list[str]) -> None:
    conn = RawClient(url)
    try:
        for i, img in enumerate(images):
            status, body = await conn.post("/v1/images", {"id": f"img-{i}", "image": img, "payload": {"n": i}})
            if status != 200:
                raise RuntimeError(f"POST /v1/images answered {status}: {body[:300].decode('utf-8', 'replace')}")
    finally:
        await conn.close()


async def search_load(url: str, images: list[str], clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients for ``seconds``; client c sends images
    c, c + clients, ... (each request its own image while the pool lasts)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds

    async def client(c: int) -> None:
        conn = RawClient(url)
        i = c
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    status, body = await conn.post("/v1/images/search", {"image": images[i % len(images)], "k": K})
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, body = -1, b""
                    await conn.close()
                i += clients
                if status == 200 and json.loads(body).get("hits"):
                    latencies.append(time.perf_counter() - t0)
                else:
                    key = str(status) if status != 200 else "no hits"
                    errors[key] = errors.get(key, 0) + 1
        finally:
            await conn.close()

    t_start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t_start
    ms = lambda q: round(percentile(latencies, q) * 1000, 1) if latencies else None  # noqa: E731
    return {"ok": len(latencies), "seconds": round(wall, 2), "throughput_rps": len(latencies) / wall,
            "p20_ms": ms(0.2), "p50_ms": ms(0.5), "p80_ms": ms(0.8), "p90_ms": ms(0.9), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 8 s")
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=None, help="window per server and round (default 30; quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="default 2; quick 1")
    ap.add_argument("--cache", type=Path, default=HERE.parent / "build" / "bench-cache" / "vision")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    seconds = args.seconds or (8.0 if args.quick else 30.0)
    rounds = args.rounds or (1 if args.quick else 2)

    from bench_vision import prepare

    model_dir = Path(prepare(args.cache, ["resnet50-b1"])["models"]["resnet50"]["hf_dir"])
    stored = make_images(8, seed=10)
    pool = make_images(max(64, args.clients * 12), seed=11)
    with tempfile.TemporaryDirectory(prefix="bench_image_server-") as tmp:
        work = Path(tmp)
        trees = [CodeTree("baseline", args.baseline_rev, work), CodeTree("current", None, work)]
        try:
            sides = [Side("baseline", trees[0]), Side("current", trees[1])]
            per_side: dict = {sd.name: [] for sd in sides}
            for r in range(rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    with serving(side, work, f"images-{r}", images_base(model_dir)) as server:
                        asyncio.run(store(server.url, stored))
                        warm = asyncio.run(search_load(server.url, stored, 2, 3.0))
                        if warm["errors"]:
                            raise RuntimeError(f"{side.name}: warm-up errors {warm['errors']}")
                        res = asyncio.run(search_load(server.url, pool, args.clients, seconds))
                        per_side[side.name].append(res)
                        print(f"  {side.name:8s} round {r + 1}: {res['throughput_rps']:6.1f} req/s  p50 "
                              f"{res['p50_ms']} ms  p90 {res['p90_ms']} ms  errors {res['errors']}", flush=True)
            servers = {sd.name: sd.tree.summary() for sd in sides}
        finally:
            for t in trees:
                t.close()
    rows, summary = [], {}
    for name, runs in per_side.items():
        rps = statistics.median(x["throughput_rps"] for x in runs)
        lat = {q: statistics.median(x[q] for x in runs if x[q] is not None) for q in ("p20_ms", "p50_ms", "p80_ms")}
        summary[name] = {"throughput_rps": rps, "rounds_rps": [round(x["throughput_rps"], 2) for x in runs], **lat,
                         "errors": [x["errors"] for x in runs]}
        # request latency percentiles (median over rounds) in the harness's row shape
        rows.append({"suite": "image_server", "case": f"images-search int8 {args.clients} clients", "provider": name,
                     "median_ms": lat["p50_ms"], "p20_ms": lat["p20_ms"], "p80_ms": lat["p80_ms"],
                     "reps": sum(x["ok"] for x in runs), "throughput": rps, "unit": "requests/s"})
    ratio = summary["current"]["throughput_rps"] / summary["baseline"]["throughput_rps"]
    quick = " — **smoke run (--quick): not the machine's figures**" if args.quick else ""
    md = "\n".join([
        f"/v1/images/search, INT8 ResNet-50, {args.clients} closed-loop clients, distinct 640x480 JPEGs, "
        f"{rounds} round(s) of {seconds:.0f} s per server{quick}", "",
        "| server | code | requests/s (median of rounds) [rounds] | p50 ms |", "|---|---|---|---|",
        *(f"| {n} | {servers[n]['describe']} | {s['throughput_rps']:.1f} {s['rounds_rps']} | {s['p50_ms']} |"
          for n, s in summary.items()),
        "", f"current / baseline requests/s: **{ratio:.2f}x** (target >= {TARGET_RATIO:g}x: "
            f"{'met' if ratio >= TARGET_RATIO else 'not met'})"])
    print(md)
    if not args.no_write:
        write_results("image_server", rows, chart=False, md=md,
                      extra={"servers": servers, "summary": summary, "ratio": ratio, "target_ratio": TARGET_RATIO,
                             "clients": args.clients, "seconds": seconds, "rounds": rounds, "quick": args.quick,
                             "baseline_rev": args.baseline_rev})
    return 0


if __name__ == "__main__":
    sys.exit(main())
