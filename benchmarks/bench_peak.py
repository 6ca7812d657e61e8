"""Register-only arithmetic peaks of this machine: what each kernel's
throughput is a fraction of.

Loops (tallow._C.peak_run, csrc/peak/): inline assembly with 8-16
independent accumulators and operands in registers, no memory traffic, so
the compiler cannot hoist or CSE them and the dependency chains hide the
instruction latency:

  fp32_fma_avx2       vfmadd231ps ymm                           2*8 FLOP / instr
  int8_maddubs_avx2   vpmaddubsw + vpmaddwd(ones) + vpaddd ymm  2*32 OP / 3 instr
                      (u8*s8 pairs into a saturating int16: the fast AVX2 mix)
  int16_maddwd_avx2   vpmaddwd + vpaddd ymm                     2*16 OP / 2 instr
                      (int8 sign-extended to int16: the exact AVX2 mix)
  fp32_fma_avx512     vfmadd231ps zmm                           2*16 FLOP / instr
  int8_vnni_avx512    vpdpbusd zmm                              2*64 OP / instr
  fp32_fma_neon       fmla v.4s                                 2*4 FLOP / instr (aarch64)
  int8_sdot_neon      sdot v.4s, v.16b, v.16b                   2*16 OP / instr  (aarch64)

Every loop the CPU supports up to the kernels' active ISA is run on 1 .. N
threads (N = tallow's thread count), all threads at once; throughput = total
operations / wall time. The rows carry the median like every suite; the peak
the other benches divide by (harness.peak_figure) is the best run (min_ms),
since other load on the machine only ever slows a register-only loop. On an AVX-512 machine, `TALLOW_ISA=avx2 python
benchmarks/bench_peak.py` stores the AVX2 figures in that configuration's
own result folder (<machine>-as-avx2), beside the AVX2 kernels' results.

    python benchmarks/bench_peak.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tallow  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Case, run_suite  # noqa: E402


def kinds() -> list[dict]:
    """The peak loops this CPU supports, at ISAs no higher than the active one."""
    mod = tallow.native()
    levels = list(mod.isa_levels())
    active = levels.index(mod.active_isa())
    return [k for k in mod.peak_kinds() if k["supported"] and levels.index(k["isa"]) <= active]


def _kind(name: str) -> dict:
    for k in tallow.native().peak_kinds():
        if k["name"] == name:
            return k
    raise ValueError(f"no peak loop named {name!r}")


def calibrate(kind: str, threads: int, seconds: float) -> int:
    """Iterations that take about `seconds` on `threads` threads."""
    run = tallow.native().peak_run
    iters = 20_000
    while True:
        t = min(run(kind, iters, threads) for _ in range(3))  # the fastest: load only slows it
        if t >= 0.02 or iters >= 1 << 34:
            return max(1, int(iters * seconds / t))
        iters *= 4


def measure(kind: str, threads: int, seconds: float = 0.1, reps: int = 5) -> float:
    """The best of `reps` runs, in G(FL)OP/s (used by the harness when this
    machine has no peak.json point)."""
    k = _kind(kind)
    iters = calibrate(kind, threads, seconds)
    best = min(tallow.native().peak_run(kind, iters, threads) for _ in range(reps))
    return iters * k["ops_per_iter"] * threads / best / 1e9


def cases(thread_counts: list[int], seconds: float) -> list[Case]:
    run = tallow.native().peak_run
    out = []
    for k in kinds():
        for threads in thread_counts:
            iters = calibrate(k["name"], threads, seconds)
            out.append(Case(
                name=f"{k['name']} {threads} thr",
                providers={"register-only": lambda name=k["name"], iters=iters, threads=threads: run(name, iters, threads)},
                work=iters * k["ops_per_iter"] * threads, unit=k["unit"],
                params={"kind": k["name"], "isa": k["isa"], "threads": threads, "instructions": k["instructions"],
                        "iters": iters, "ops_per_iter": k["ops_per_iter"]},
                warmup=1, min_reps=5))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter loops (smoke run)")
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default 1 .. tallow's threads)")
    args = ap.parse_args(argv)
    n = tallow.get_num_threads()
    thread_counts = args.threads or list(range(1, n + 1))
    seconds = 0.02 if args.quick else 0.1
    t0 = time.perf_counter()
    print(f"tallow {tallow.__version__}: isa {tallow.get_isa()} (best {tallow.native().best_isa()}), "
          f"peak loops {[k['name'] for k in kinds()]}, threads {thread_counts}")
    run_suite("peak", cases(thread_counts, seconds), min_time=0.05 if args.quick else 0.3, chart=False)
    print(f"peak: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
