"""The shared benchmark harness.

- Every provider of a case runs on the same inputs in the same process run,
  interleaved round by round so drift (thermal, the other core) hits all alike.
- Each timing: warmup, then repetitions until a time budget; median, p20, p80.
- Throughput from an analytic work count (FLOP, OP, images) given by the case.
- Ratio of the first provider (tallow) to each peer: peer median / our median.
- Before timing, every provider's answer is checked against a reference
  provider within the case's stated tolerance (``Agreement``); a case whose
  providers disagree is not timed, and the suite fails loudly.
- Results per machine (DESIGN convention 15): benchmarks/results/<machine>/
  <suite>.json and .csv (+ PNG), where <machine> is the CPU model name and its
  best ISA as a slug (``machine_tag``), e.g. ``amd-epyc-avx2``; every JSON
  carries that tag in env.machine, so a summary can refuse to mix machines.
- Each case may name the arithmetic peak its kernel is measured against
  (``peak="int8"`` or ``"fp32"``): the rows then carry the fraction of the
  register-only peak that bench_peak.py measured on this machine.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The root of the per-machine result folders; TALLOW_BENCH_RESULTS moves it
# (tests, smoke runs that must not touch the committed results).
RESULTS_ROOT = Path(os.environ.get("TALLOW_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


class AgreementError(RuntimeError):
    """Providers of a case gave different answers (beyond the stated tolerance)."""


class MixedMachinesError(RuntimeError):
    """Results of two machines were about to go into one summary."""


@dataclass
class Agreement:
    """How the providers of a case must agree before they are timed.

    Each provider's output (its timed callable's return value, or
    ``outputs[name]()`` where given) is compared with the ``reference``
    provider's (default: the first provider) by ``metric``:

    - ``"rel"``: max |x - ref| / max |ref| (elementwise, same shape);
    - ``"rel_fro"``: ||x - ref|| / ||ref|| (Frobenius: the INT8 layers' tested bound);
    - ``"cosine"``: 1 - the smallest cosine similarity between x[i] and ref[i]
      over the first axis (each item flattened);
    - ``"mismatch"``: the fraction of elements that differ (tokens, ids);
    - ``"recall"``: 1 - recall of the reference's ids (rows of ids, e.g.
      top-k neighbours; approximate search states how much it may miss).

    ``tol`` is the largest error allowed: one number for every provider or a
    dict per provider (providers missing from the dict must match exactly,
    error 0). ``why`` says where the tolerance comes from (INT8 vs fp32, a
    different resampler...). ``skip`` (a reason) states that outputs are not
    comparable elementwise and how the case checks them instead (e.g. recall).
    """

    tol: float | dict[str, float] = 0.0
    metric: str = "rel"
    reference: str | None = None
    outputs: dict[str, Callable[[], object]] | None = None
    why: str = ""
    skip: str | None = None

    def tolerance(self, provider: str) -> float:
        if isinstance(self.tol, dict):
            return float(self.tol.get(provider, 0.0))
        return float(self.tol)


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
    # Required when the case has more than one provider.
    agreement: Agreement | None = None
    # Providers after which the harness waits (untimed), in seconds: peers
    # whose threads keep spinning after a call (ONNX Runtime's default
    # settings) would otherwise take cores from whoever runs next.
    pause_after: dict[str, float] = field(default_factory=dict)
    # "int8" or "fp32": rows get the fraction of that register-only peak
    # (this machine, active ISA, the kernels' thread count). A dict gives
    # it per provider (e.g. fp32 F.linear against the fp32 peak).
    peak: str | dict[str, str] | None = None


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


def round_timings(rounds: list[list[float]]) -> dict:
    """A row's timing fields from each round's call times (seconds), as the
    process-per-provider benchmarks report them: the median of the rounds'
    medians, p20 / p80 / min over every call, the rounds' spread."""
    medians = [statistics.median(times) for times in rounds]
    every = [t for times in rounds for t in times]
    return {"median_ms": statistics.median(medians) * 1e3, "p20_ms": percentile(every, 0.2) * 1e3,
            "p80_ms": percentile(every, 0.8) * 1e3, "min_ms": min(every) * 1e3,
            "round_min_ms": min(medians) * 1e3, "round_max_ms": max(medians) * 1e3,
            "round_medians_ms": [round(m * 1e3, 4) for m in medians], "reps": len(every), "rounds": len(rounds)}


def time_calls(run: Callable[[], object], *, warmup: int, min_reps: int, min_time: float,
               max_reps: int) -> tuple[list[float], object]:
    """Seconds per call of `run` after `warmup` calls: at least `min_reps`
    calls, and more until `min_time` seconds passed (at most `max_reps`);
    and the last call's result (for the accuracy check)."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    out = None
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    return times, out


def time_providers(providers: dict[str, Callable[[], object]], *, warmup: int = 2,
                   min_time: float = 0.6, min_reps: int = 5, max_reps: int = 200,
                   pause_after: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Times every provider, interleaved: one call of each per round."""
    pause_after = pause_after or {}
    for name, fn in providers.items():
        for _ in range(warmup):
            fn()
        if pause_after.get(name):
            time.sleep(pause_after[name])
    times: dict[str, list[float]] = {name: [] for name in providers}
    start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - start < min_time * len(providers)):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if pause_after.get(name):
                time.sleep(pause_after[name])
        reps += 1
    return times


# ----------------------------------------------------------------- agreement

def _as_float64(x):
    import numpy as np
    import torch

    if hasattr(x, "logits"):  # transformers ModelOutput
        x = x.logits
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return torch.stack([t.detach().to(torch.float64) for t in x])
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def disagreement(x, ref, metric: str) -> float:
    """The error of output x against ref by metric (see Agreement); inf for a
    shape mismatch, NaN/inf where the reference is finite, or an unknown metric."""
    import torch

    if metric == "recall":  # rows of ids, possibly ragged: 1 - |x_i & ref_i| / |ref_i| summed
        xs, rs = [list(map(int, row)) for row in x], [list(map(int, row)) for row in ref]
        if len(xs) != len(rs):
            return math.inf
        total = sum(len(row) for row in rs)
        hits = sum(len(set(a) & set(b)) for a, b in zip(xs, rs))
        return 1.0 - hits / total if total else 0.0
    a, r = _as_float64(x), _as_float64(ref)
    if a.shape != r.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    if not bool(torch.equal(torch.isfinite(a), torch.isfinite(r))):
        return math.inf
    fin = torch.isfinite(r)
    a, r = torch.where(fin, a, 0.0), torch.where(fin, r, 0.0)
    if metric == "rel":
        scale = r.abs().max().item()
        diff = (a - r).abs().max().item()
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if metric == "rel_fro":
        scale = r.norm().item()
        diff = (a - r).norm().item()
        return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    if metric == "cosine":
        a2, r2 = a.reshape(a.shape[0] if a.dim() > 1 else 1, -1), r.reshape(r.shape[0] if r.dim() > 1 else 1, -1)
        cos = torch.nn.functional.cosine_similarity(a2, r2, dim=1, eps=1e-30)
        return float(1.0 - cos.min().item())
    if metric == "mismatch":
        return float((a != r).double().mean().item())
    return math.inf


def check_agreement(case: Case) -> dict[str, float]:
    """Errors of every provider's output vs the reference provider's; raises
    AgreementError naming each provider beyond its tolerance."""
    ag = case.agreement
    if ag is None:
        if len(case.providers) > 1:
            raise AgreementError(f"[{case.name}] has {len(case.providers)} providers but no Agreement: "
                                 "state the tolerance their answers must agree within")
        return {}
    if ag.skip:
        return {}
    ref_name = ag.reference or next(iter(case.providers))
    if ref_name not in case.providers:
        raise AgreementError(f"[{case.name}] reference provider {ref_name!r} is not one of {list(case.providers)}")
    run = {name: (ag.outputs or {}).get(name, fn) for name, fn in case.providers.items()}
    ref = run[ref_name]()
    errors, bad = {}, []
    for name, fn in run.items():
        if name == ref_name:
            errors[name] = 0.0
            continue
        err = disagreement(fn(), ref, ag.metric)
        errors[name] = err
        if not err <= ag.tolerance(name):
            bad.append(f"{name}: {ag.metric} error {err:.3g} > tolerance {ag.tolerance(name):.3g}")
    if bad:
        raise AgreementError(f"[{case.name}] providers disagree with {ref_name!r} "
                             f"({ag.why or 'no reason stated'}): " + "; ".join(bad))
    return errors


# ------------------------------------------------------------------ machines

def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo 'model name', lscpu's 'Model name',
    or platform.processor() as a last resort)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slugify(text: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor'."""
    text = re.sub(r"\((r|tm|c)\)", " ", text.lower())
    text = re.sub(r"\bcpu\b|@.*$", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown-cpu"


def machine_tag(cpu: str, best_isa: str, active_isa: str | None = None, amx: bool = False) -> str:
    """The name of a machine's result folder: the CPU model and its best ISA
    (tallow's tiers; '-amx' where AMX-INT8 is usable), plus '-as-<isa>' when
    the kernels were forced lower (TALLOW_ISA=avx2 on an AVX-512 machine), so
    those figures never replace the machine's native ones."""
    tag = f"{slugify(cpu)}-{best_isa}" + ("-amx" if amx else "")
    if active_isa and active_isa != best_isa:
        tag += f"-as-{active_isa}"
    return tag


def machine_of(env: dict) -> str:
    """The machine tag a result file was made on: env['machine'], or for files
    older than the tag, derived from their CPU name and tallow ISA (no ISA was
    forced then: the active ISA was the best one)."""
    if env.get("machine"):
        return env["machine"]
    if "cpu" not in env:
        raise MixedMachinesError("result file has no machine tag and no CPU name: cannot tell which machine made it")
    return machine_tag(env["cpu"], env.get("tallow_best_isa") or env.get("tallow_isa", "unknown-isa"))


def this_machine() -> dict:
    """CPU model, ISAs and the machine tag of the machine running now."""
    info = {"cpu": cpu_model(), "best_isa": "unknown-isa", "active_isa": None, "amx": False}
    try:
        from tallow import native

        mod = native()
        info["best_isa"], info["active_isa"] = mod.best_isa(), mod.active_isa()
        amx_usable = getattr(mod, "int8_amx_usable", None)
        amx_enabled = getattr(mod, "int8_amx_enabled", None)
        info["amx"] = bool(amx_usable and amx_usable())
        if info["amx"] and amx_enabled is not None and not amx_enabled():
            info["active_isa"] = info["best_isa"]  # AMX switched off: the VNNI kernels run
            info["amx_disabled"] = True
    except Exception as exc:  # no native module: tag by the CPU name alone
        info["error"] = str(exc)
    tag = machine_tag(info["cpu"], info["best_isa"], info["active_isa"], info["amx"])
    if info.get("amx_disabled"):
        tag += "-as-avx512_vnni"
    info["machine"] = tag
    return info


def results_dir(machine: str | None = None) -> Path:
    """The result folder of a machine (default: this one)."""
    return RESULTS_ROOT / (machine or this_machine()["machine"])


def environment() -> dict:
    import torch

    mach = this_machine()
    cpu = mach["cpu"]
    env = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": mach["machine"],
        "tallow_best_isa": mach["best_isa"],
        "amx_int8": mach["amx"],
        "argv": sys.argv[1:],
    }
    try:
        import tallow

        env["tallow"] = tallow.__version__
        env["tallow_isa"] = tallow.get_isa()
        env["tallow_threads"] = tallow.get_num_threads()
    except Exception as exc:  # report, never fail the run for metadata
        env["tallow_error"] = str(exc)
    return env


# ---------------------------------------------------------------------- peak

PEAK_KINDS = {  # (family, active ISA) -> the register-only loop of that mix
    ("fp32", "avx512_vnni"): "fp32_fma_avx512",
    ("int8", "avx512_vnni"): "int8_vnni_avx512",
    ("fp32", "avx2"): "fp32_fma_avx2",
    # The faster of the two AVX2 int8 mixes (u8*s8 with int16 saturation);
    # the exact int16 mix (int16_maddwd_avx2) is in peak.json beside it.
    ("int8", "avx2"): "int8_maddubs_avx2",
    ("fp32", "neon"): "fp32_fma_neon",
    ("int8", "neon"): "int8_sdot_neon",
}
_peak_cache: dict[tuple[str, int], tuple[float, str]] = {}


def peak_figure(family: str, threads: int | None = None) -> tuple[float, str, str] | None:
    """(throughput in G(FL)OP/s, kind, source) of the register-only peak for
    the kernels' active ISA at `threads` threads: from this machine's
    peak.json (bench_peak.py) when it has the point, else measured now
    (short, noisier). None where the ISA has no peak loop (scalar)."""
    try:
        import tallow

        isa = tallow.get_isa()
        threads = threads or tallow.get_num_threads()
    except Exception:
        return None
    kind = PEAK_KINDS.get((family, isa))
    if kind is None:
        return None
    if (kind, threads) in _peak_cache:
        value, source = _peak_cache[(kind, threads)]
        return value, kind, source
    path = results_dir() / "peak.json"
    value, source = None, ""
    if path.exists():
        try:
            data = json.loads(path.read_text())
            for r in data["rows"]:
                if r.get("param_kind") == kind and r.get("param_threads") == threads:
                    # The best run: other load only ever slows a register-only loop.
                    value = r["throughput"] * r["median_ms"] / r.get("min_ms", r["median_ms"])
                    source = f"peak.json ({data['env']['time']}, best run)"
        except (ValueError, KeyError):
            value = None
    if value is None:
        from bench_peak import measure

        value, source = measure(kind, threads, seconds=0.1), "measured in this run (no peak.json point)"
    _peak_cache[(kind, threads)] = (value, source)
    return value, kind, source


def _peak_columns(case: Case, provider: str, throughput: float) -> dict:
    family = case.peak.get(provider) if isinstance(case.peak, dict) else case.peak
    if not family:
        return {}
    found = peak_figure(family)
    if found is None:
        return {}
    value, kind, source = found
    return {"peak_kind": kind, "peak_throughput": value, "peak_fraction": throughput / value, "peak_source": source}


def run_suite(suite: str, cases: list[Case], *, min_time: float = 0.6, chart: bool = True) -> list[dict]:
    """Checks each case's providers agree, times them, writes
    results/<machine>/<suite>.{json,csv,png} and prints a table. Cases whose
    providers disagree are not timed; after writing the others, raises
    AgreementError naming them."""
    rows: list[dict] = []
    failed: list[str] = []
    for case in cases:
        try:
            errors = check_agreement(case)
        except AgreementError as exc:
            print(f"\n!!! AGREEMENT CHECK FAILED, case not timed: {exc}\n", file=sys.stderr, flush=True)
            failed.append(str(exc))
            continue
        times = time_providers(case.providers, warmup=case.warmup, min_time=min_time, min_reps=case.min_reps,
                               pause_after=case.pause_after)
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
                "min_ms": min(ts) * 1e3,
                "reps": len(ts),
                "throughput": case.work / med / _scale(case.unit),
                "unit": case.unit,
                # > 1 means tallow is faster than this provider.
                "tallow_speedup": med / ours_median if name != ours else 1.0,
                **{f"param_{k}": v for k, v in case.params.items()},
            }
            ag = case.agreement
            if ag is not None and not ag.skip and name in errors:
                row.update({"agreement_metric": ag.metric, "agreement_error": errors[name],
                            "agreement_tol": ag.tolerance(name),
                            "agreement_reference": ag.reference or ours})
            elif ag is not None and ag.skip:
                row["agreement_skipped"] = ag.skip
            row.update(_peak_columns(case, name, row["throughput"]))
            rows.append(row)
        print(format_case(rows[-len(times):]), flush=True)
    write_results(suite, rows, chart=chart, failed=failed)
    if failed:
        raise AgreementError(f"{suite}: {len(failed)} case(s) failed the agreement check:\n" + "\n".join(failed))
    return rows


def format_case(rows: list[dict]) -> str:
    parts = [f"{r['provider']}: {r['median_ms']:.3f} ms ({r['throughput']:.1f} {r['unit']}"
             + (f", tallow x{r['tallow_speedup']:.2f}" if r["tallow_speedup"] != 1.0 else "") + ")"
             for r in rows]
    return f"[{rows[0]['case']}] " + " | ".join(parts)


def _of_peak(row: dict) -> str:
    if row.get("peak_fraction") is None:
        return ""
    return f" ({row['peak_fraction']:.0%} of {row['peak_kind']} peak)"


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
            f"| {r['throughput']:.1f} {r['unit']}{_of_peak(r)} | {speed} |"
        )
    return "\n".join(lines)


def write_results(suite: str, rows: list[dict], *, chart: bool = True, failed: list[str] | None = None,
                  extra: dict | None = None, md: str | None = None) -> None:
    """<suite>.json (env, rows, failed, and the suite's `extra` fields), .csv,
    .png (chart) and, given `md`, <suite>.md, in this machine's folder."""
    env = environment()
    out = results_dir(env["machine"])
    out.mkdir(parents=True, exist_ok=True)
    data = {"env": env, "rows": rows}
    if failed:
        data["failed"] = failed
    data.update(extra or {})
    (out / f"{suite}.json").write_text(json.dumps(data, indent=2))
    if md is not None:
        (out / f"{suite}.md").write_text(md)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out / f"{suite}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["cpu", "machine", "time", "torch", "tallow_threads"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": env["cpu"], "machine": env["machine"], "time": env["time"],
                        "torch": env["torch"], "tallow_threads": env.get("tallow_threads")})
    if chart:
        _chart(suite, rows, env, out)
    print(f"\n{suite}: results in {out}/{suite}.json, .csv" + (", .png" if chart else "") + (", .md" if md else ""))
    print(markdown_table(rows))


def _chart(suite: str, rows: list[dict], env: dict, out: Path) -> None:
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
    fig.savefig(out / f"{suite}.png", dpi=110)
    plt.close(fig)
