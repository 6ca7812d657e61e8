"""The shared benchmark harness.

- Every provider of a case runs on the same inputs in the same process run,
  interleaved round by round so drift (thermal, the other core) hits all alike.
- Each timing: warmup, then repetitions until a time budget; median, p20, p80.
- Throughput from an analytic work count (FLOP, OP, images) given by the case.
- Ratio of the first provider (tallow) to each peer: peer median / our median.
- Results to benchmarks/results/<suite>.json and .csv, tagged with CPU,
  versions, threads and time, plus a PNG bar chart; a markdown table printed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    """One benchmark point: a name, the work it does and its providers.

    ``providers`` maps a provider name to a zero-argument callable; the first
    one is ours (tallow), the rest are peers. ``work`` is the analytic count
    (FLOP, OP, images, tokens) one call performs, ``unit`` its rate unit.
    """

    name: str
    providers: dict[str, Callable[[], object]]
    work: float
    unit: str  # "GFLOP/s", "GOP/s", "images/s", "tokens/s", ...
    params: dict = field(default_factory=dict)
    warmup: int = 2
    min_reps: int = 5  # heavy end-to-end cases lower it


def _scale(unit: str) -> float:
    return 1e9 if unit.startswith("G") else (1e12 if unit.startswith("T") else 1.0)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_providers(providers: dict[str, Callable[[], object]], *, warmup: int = 2,
                   min_time: float = 0.6, min_reps: int = 5, max_reps: int = 200) -> dict[str, list[float]]:
    """Times every provider, interleaved: one call of each per round."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < min_time * len(providers)):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        reps += 1
    return times


def environment() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import tallow

        env["tallow"] = tallow.__version__
        env["tallow_isa"] = tallow.get_isa()
        env["tallow_threads"] = tallow.get_num_threads()
    except Exception as exc:  # report, never fail the run for metadata
        env["tallow_error"] = str(exc)
    return env


def run_suite(suite: str, cases: list[Case], *, min_time: float = 0.6, chart: bool = True) -> list[dict]:
    """Runs every case, writes results/<suite>.{json,csv,png}, prints a table."""
    rows: list[dict] = []
    for case in cases:
        times = time_providers(case.providers, warmup=case.warmup, min_time=min_time, min_reps=case.min_reps)
        ours = next(iter(case.providers))
        ours_median = statistics.median(times[ours])
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {
                "suite": suite,
                "case": case.name,
                "provider": name,
                "median_ms": med * 1e3,
                "p20_ms": percentile(ts, 0.2) * 1e3,
                "p80_ms": percentile(ts, 0.8) * 1e3,
                "reps": len(ts),
                "throughput": case.work / med / _scale(case.unit),
                "unit": case.unit,
                # > 1 means tallow is faster than this provider.
                "tallow_speedup": med / ours_median if name != ours else 1.0,
                **{f"param_{k}": v for k, v in case.params.items()},
            }
            rows.append(row)
        print(format_case(rows[-len(times):]), flush=True)
    write_results(suite, rows, chart=chart)
    return rows


def format_case(rows: list[dict]) -> str:
    parts = [f"{r['provider']}: {r['median_ms']:.3f} ms ({r['throughput']:.1f} {r['unit']}"
             + (f", tallow x{r['tallow_speedup']:.2f}" if r["tallow_speedup"] != 1.0 else "") + ")"
             for r in rows]
    return f"[{rows[0]['case']}] " + " | ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """Case | provider | median ms (p20-p80) | throughput | speed of each
    tallow provider (names starting with "tallow") over this row's provider."""
    lines = ["| case | provider | median ms (p20–p80) | throughput | tallow speedup over this provider |",
             "|---|---|---|---|---|"]
    for r in rows:
        ours = [o for o in rows if o["case"] == r["case"] and o["provider"].startswith("tallow")]
        if r["provider"].startswith("tallow") and len(ours) == 1:
            speed = "—"
        else:
            speed = ", ".join(f"{o['provider']} {r['median_ms'] / o['median_ms']:.2f}×"
                              for o in ours if o is not r) or "—"
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f}) "
            f"| {r['throughput']:.1f} {r['unit']} | {speed} |"
        )
    return "\n".join(lines)


def write_results(suite: str, rows: list[dict], *, chart: bool = True) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    (RESULTS_DIR / f"{suite}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(RESULTS_DIR / f"{suite}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["cpu", "time", "torch", "tallow_threads"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": env["cpu"], "time": env["time"], "torch": env["torch"],
                        "tallow_threads": env.get("tallow_threads")})
    if chart:
        _chart(suite, rows, env)
    print(f"\n{suite}: results in {RESULTS_DIR}/{suite}.json, .csv" + (", .png" if chart else ""))
    print(markdown_table(rows))


def _chart(suite: str, rows: list[dict], env: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        # Speed relative to the slowest provider of each case keeps cases of
        # different units on one axis.
        vals = []
        for c in cases:
            case_rows = [r for r in rows if r["case"] == c]
            slowest = max(r["median_ms"] for r in case_rows)
            mine = [r for r in case_rows if r["provider"] == p]
            vals.append(slowest / mine[0]["median_ms"] if mine else 0.0)
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=p)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speed vs slowest provider (×)")
    ax.set_title(f"{suite} — {env['cpu']}, {env.get('tallow_threads', '?')} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / f"{suite}.png", dpi=110)
    plt.close(fig)
