"""ResNet-50 image features against ONNX Runtime (issue 27): tallow fp32 /
INT8 vs ONNX Runtime fp32 and static INT8, same weights, same preprocessed
images, each engine in its own process.

    python benchmarks/bench_vision.py              # full run (~10 min on 2 cores)
    python benchmarks/bench_vision.py --quick      # smoke run: 1 round, short timings
    python benchmarks/bench_vision.py --cases resnet50-b1 --providers tallow-fp32 "onnxruntime-*"

How it measures (as a new user would, as bench_encoders.py does):
- One subprocess per provider x case, the providers alternated over
  ``--rounds`` rounds (3), the order reversed every other round; torch is
  imported before tallow in tallow's processes; the same thread count
  everywhere (``--threads``, default 2: tallow ``set_num_threads``, ONNX
  Runtime ``intra_op_num_threads``, its other session options at their
  defaults, spinning included: each engine has its process to itself).
- Every timed call goes from a preprocessed float32 batch [B, 3, 224, 224]
  (``tallow.ops.preprocess_ref`` of photo-like JPEGs, bench_preprocess's
  generator) to the pooled 2048-d features: ``model.features(x)`` in tallow
  (its public API, so whatever path it takes is what is timed), the ONNX
  graph of transformers' ``ResNetModel`` pooler output in ONNX Runtime.
- Accuracy in the same run: per image, the cosine of each provider's features
  to transformers fp32; a provider beyond its tolerance (1 - cosine: fp32
  1e-4, INT8 0.05) fails the run and is never the "fastest peer". INT8
  providers also report their cosine to their own engine's fp32 (issue 27
  asks >= 0.999 of tallow's).

Model: transformers ``ResNetModel(ResNetConfig())`` (ResNet-50, v1.5,
random weights, seed 0; real weights are not obtainable offline), saved once
under ``--cache`` (build/bench-cache/vision). Providers:
- tallow-fp32: ``tallow.models.load(dir)`` (the native forward, csrc/vision/);
  tallow-fp32 per-op: the same with ``TALLOW_RESNET=ops`` (the torch
  convolution path it replaced: the before/after of issue 27's item 1);
  tallow-int8: ``load(dir, quantize="int8")`` (the native INT8 forward);
  tallow-int8 per-op: the same with ``TALLOW_RESNET=ops`` (item 2's before).
- onnxruntime-fp32: torch.onnx.export (TorchScript exporter, opset 17) of the
  pooled-features module; ORT applies its own graph optimisations at load
  (Conv+BN fusion, NCHWc layout on x86).
- onnxruntime-int8 qdq / qoperator: ``quantize_static`` after ORT's
  ``quant_pre_process``, per-channel int8 weights, uint8 activations, MinMax
  calibration on 8 other preprocessed photo-like JPEGs; QDQ and QOperator
  formats (issue 27: the faster of the two counts).

Results: benchmarks/results/<machine>/vision.{json,md} (median of the rounds'
medians, their min-max as the spread).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_encoders import _min_cosine, _stamp_ok, _versions, _write_stamp, select_providers  # noqa: E402
from harness import round_timings  # noqa: E402

SUITE = "vision"
DEFAULT_CACHE = ROOT / "build" / "bench-cache" / "vision"
FP32_TOL, INT8_TOL = 1e-4, 0.05


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: dict  # transformers ResNetConfig arguments
    size: int     # input height = width


MODELS = {
    "resnet50": ModelSpec("resnet50", {}, 224),
    # For the smoke test (tests/test_benchmarks.py): seconds, not minutes.
    "tiny": ModelSpec("tiny", {"embedding_size": 16, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1]}, 64),
}


@dataclass(frozen=True)
class CaseSpec:
    name: str
    model: str
    batch: int
    warmup: int = 2
    min_reps: int = 10


CASES = {c.name: c for c in (
    CaseSpec("resnet50-b1", "resnet50", 1),
    CaseSpec("resnet50-b8", "resnet50", 8, warmup=1, min_reps=4),
    CaseSpec("tiny-b2", "tiny", 2, warmup=1, min_reps=3),
)}
DEFAULT_CASES = ["resnet50-b1", "resnet50-b8"]


@dataclass(frozen=True)
class Provider:
    name: str
    engine: str  # tallow | onnxruntime
    precision: str  # fp32 | int8
    variant: str = ""  # tallow: "" | per-op; onnxruntime int8: qdq | qoperator


PROVIDERS = {p.name: p for p in (
    Provider("tallow-fp32", "tallow", "fp32"),
    Provider("tallow-fp32 per-op", "tallow", "fp32", "per-op"),
    Provider("tallow-int8", "tallow", "int8"),
    Provider("tallow-int8 per-op", "tallow", "int8", "per-op"),
    Provider("onnxruntime-fp32", "onnxruntime", "fp32"),
    Provider("onnxruntime-int8 qdq", "onnxruntime", "int8", "qdq"),
    Provider("onnxruntime-int8 qoperator", "onnxruntime", "int8", "qoperator"),
)}


def _tolerance(p: Provider) -> float:
    return INT8_TOL if p.precision == "int8" else FP32_TOL


# ------------------------------------------------------------------ preparation (own process)

def _images(spec: ModelSpec, n: int, seed: int):
    """n preprocessed images [n, 3, size, size] float32: photo-like JPEGs
    through tallow's exact (PIL-equivalent) pipeline; the tiny model gets
    them resized down."""
    import numpy as np
    import torch
    from bench_preprocess import photo_jpeg

    from tallow.ops import preprocess_ref

    rng = np.random.default_rng(seed)
    x = preprocess_ref([photo_jpeg(640, 480, rng) for _ in range(n)])
    if spec.size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True)
    return x.contiguous().numpy().astype(np.float32)


def prepare(cache: Path, case_names: list[str]) -> dict:
    """The HF directory, the ONNX graphs, each case's inputs and transformers'
    fp32 features, built once per model (stamped with the versions)."""
    import warnings

    import numpy as np
    import torch
    from transformers import ResNetConfig, ResNetModel

    info: dict = {"models": {}, "cases": {}}
    for mname in dict.fromkeys(CASES[c].model for c in case_names):
        spec = MODELS[mname]
        d = cache / mname
        key = {"config": spec.config, "size": spec.size, "seed": 0,
               **_versions("torch", "transformers", "onnxruntime", "onnx")}
        if not _stamp_ok(d, key):
            d.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            model = ResNetModel(ResNetConfig(**spec.config)).eval()
            model.save_pretrained(d / "hf")

            class Pooled(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, pixel_values):
                    return self.m(pixel_values=pixel_values).pooler_output.flatten(1)

            calib = _images(spec, 8, seed=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(Pooled(model).eval(), (torch.from_numpy(calib[:1]),), str(d / "fp32.onnx"),
                                  input_names=["pixel_values"], output_names=["features"], opset_version=17,
                                  dynamo=False, dynamic_axes={"pixel_values": {0: "b"}, "features": {0: "b"}})
                _quantize(d, calib)
            _write_stamp(d, key)
        info["models"][mname] = {"hf_dir": str(d / "hf"), "dir": str(d)}
    from transformers import ResNetModel

    for cname in case_names:
        case = CASES[cname]
        spec = MODELS[case.model]
        x = _images(spec, case.batch, seed=2)
        np.save(cache / f"{cname}.inputs.npy", x)
        model = ResNetModel.from_pretrained(info["models"][case.model]["hf_dir"]).eval()
        with torch.inference_mode():  # each image alone: no batch effects in the reference
            ref = torch.cat([model(pixel_values=torch.from_numpy(x[i:i + 1])).pooler_output.flatten(1)
                             for i in range(len(x))])
        np.save(cache / f"{cname}.ref.npy", ref.numpy())
        info["cases"][cname] = {"batch": case.batch, "size": spec.size, "model": case.model}
    return info


def _quantize(d: Path, calib) -> None:
    """int8.qdq.onnx and int8.qoperator.onnx: ORT's static quantization
    (per-channel int8 weights, uint8 activations, MinMax on `calib`)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixel_values": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    prep = d / "fp32.prep.onnx"
    quant_pre_process(str(d / "fp32.onnx"), str(prep), skip_symbolic_shape=True)
    for fmt, qf in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        quantize_static(str(prep), str(d / f"int8.{fmt}.onnx"), Reader(), quant_format=qf, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


# ------------------------------------------------------------------ one provider, one case (own process)

def _runner(p: Provider, model_dir: Path, x, threads: int):
    details: dict = {"threads": threads}
    if p.engine == "tallow":
        import torch  # before tallow, as most programs import them

        if p.variant == "per-op":
            os.environ["TALLOW_RESNET"] = "ops"
        import tallow
        from tallow.models import load

        tallow.set_num_threads(threads)
        torch.set_num_threads(threads)
        model = load(model_dir / "hf", quantize="int8" if p.precision == "int8" else None)
        t = torch.from_numpy(x)
        details.update(native=getattr(model, "native", None) is not None, isa=tallow.get_isa(), repr=repr(model))
        return (lambda: model.features(t)), details
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    path = model_dir / ("fp32.onnx" if p.precision == "fp32" else f"int8.{p.variant}.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    details.update(onnxruntime=ort.__version__, graph=path.name)
    return (lambda: sess.run(None, {"pixel_values": x})[0]), details


def worker(args) -> int:
    import numpy as np

    p, case = PROVIDERS[args.worker], CASES[args.case]
    x = np.load(Path(args.cache) / f"{case.name}.inputs.npy")
    t0 = time.perf_counter()
    run, details = _runner(p, Path(args.model_dir), x, args.threads)
    load_s = time.perf_counter() - t0
    from harness import time_calls

    times, out = time_calls(run, warmup=case.warmup if args.min_reps is None else 1,
                            min_reps=case.min_reps if args.min_reps is None else args.min_reps,
                            min_time=args.min_time, max_reps=args.max_reps)
    feats = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
    details.update(pid=os.getpid(), torch_loaded="torch" in sys.modules)
    out_path = Path(args.out)
    np.save(out_path.with_suffix(".npy"), feats.astype(np.float32))
    out_path.write_text(json.dumps({"times": times, "load_s": load_s, "details": details}))
    return 0


def _run_worker(p: Provider, case: CaseSpec, args, model_dir: str, tmp: Path) -> dict:
    import numpy as np

    out = tmp / f"{re.sub(r'[^a-z0-9]+', '_', p.name)}-{case.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", p.name, "--case", case.name,
           "--cache", str(args.cache), "--model-dir", model_dir, "--threads", str(args.threads),
           "--min-time", str(args.min_time), "--max-reps", str(args.max_reps), "--out", str(out)]
    if args.min_reps is not None:
        cmd += ["--min-reps", str(args.min_reps)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TALLOW_RESNET")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{p.name} on {case.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["feats"] = np.load(out.with_suffix(".npy"))
    return res


# ------------------------------------------------------------------ tables

def _ms(r: dict) -> str:
    if r["rounds"] < 2:
        return f"{r['median_ms']:.1f}"
    return f"{r['median_ms']:.1f} [{r['round_min_ms']:.1f}–{r['round_max_ms']:.1f}]"


def peer_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """Issue 27's comparisons per case: tallow fp32 vs ONNX Runtime fp32;
    tallow INT8 vs the faster of ONNX Runtime fp32 and its INT8 graphs
    (peers beyond their accuracy tolerance do not count)."""
    lines = ["| case | tallow provider | tallow ms [rounds min–max] | fastest peer | peer ms | tallow speed-up "
             "(> 1: tallow faster) |", "|---|---|---|---|---|---|"]
    records = []
    for case in dict.fromkeys(r["case"] for r in rows):
        at = {r["provider"]: r for r in rows if r["case"] == case}
        for ours_name, peer_names in (("tallow-fp32", ["onnxruntime-fp32"]),
                                      ("tallow-int8", ["onnxruntime-fp32", "onnxruntime-int8 qdq",
                                                       "onnxruntime-int8 qoperator"])):
            ours = at.get(ours_name)
            peers = [at[n] for n in peer_names if n in at and at[n]["accuracy_ok"]]
            if ours is None or not peers:
                continue
            best = min(peers, key=lambda r: r["median_ms"])
            speed = best["median_ms"] / ours["median_ms"]
            records.append({"case": case, "tallow": ours_name, "tallow_ms": ours["median_ms"],
                            "best_peer": best["provider"], "best_peer_ms": best["median_ms"], "speedup": speed})
            lines.append(f"| {case} | {ours_name} | {_ms(ours)} | {best['provider']} | {_ms(best)} | {speed:.2f}× |")
    return "\n".join(lines), records


def all_rows_table(rows: list[dict]) -> str:
    lines = ["| case | provider | median ms [rounds min–max] | images/s | min cosine to transformers fp32 "
             "| INT8: min cosine to its engine's fp32 | within tolerance |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        own = r.get("min_cosine_to_own_fp32")
        lines.append(f"| {r['case']} | {r['provider']} | {_ms(r)} | {r['throughput']:.1f} | {r['min_cosine']:.6f} | "
                     f"{'—' if own is None else f'{own:.6f}'} | "
                     f"{'yes' if r['accuracy_ok'] else 'NO (1 - cos > %g)' % r['agreement_tol']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ orchestration

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short timings")
    ap.add_argument("--cases", nargs="*", choices=sorted(CASES), help=f"default: {' '.join(DEFAULT_CASES)}")
    ap.add_argument("--providers", nargs="*", metavar="GLOB", help="provider names or globs (default: all)")
    ap.add_argument("--rounds", type=int, help="alternated rounds (default 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, help="seconds of timed calls per process (default 3; --quick: 0.2)")
    ap.add_argument("--max-reps", type=int, default=500)
    ap.add_argument("--min-reps", type=int, help="timed calls at least (default: per case; --quick: 3)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TALLOW_BENCH_CACHE_VISION") or DEFAULT_CACHE))
    ap.add_argument("--no-write", action="store_true", help="print only; no result files")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    args.cache = args.cache.resolve()
    if args.worker:
        return worker(args)
    if args.prepare_only is not None:
        spec = json.loads(args.prepare_only)
        info = prepare(args.cache, spec["cases"])
        (args.cache / "prepared.json").write_text(json.dumps(info, indent=1))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 3.0
    if args.quick and args.min_reps is None:
        args.min_reps = 3
    case_names = args.cases or DEFAULT_CASES
    providers, skipped = select_providers(ap, PROVIDERS, args.providers, lambda p: None)

    # Preparation in its own process: it loads torch, transformers and ORT's
    # quantizer, which must not stay in the process that waits for the timed ones.
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cache", str(args.cache), "--prepare-only",
           json.dumps({"cases": case_names})]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("preparation failed (see above)", file=sys.stderr)
        return 1
    print(f"prepared in {time.perf_counter() - t0:.0f} s (cache: {args.cache})", flush=True)
    info = json.loads((args.cache / "prepared.json").read_text())

    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tallow-bench-vision-") as tmp:
        for rnd in range(rounds):
            order = providers if rnd % 2 == 0 else providers[::-1]
            for cname in case_names:
                case = CASES[cname]
                for p in order:
                    res = _run_worker(p, case, args, info["models"][case.model]["dir"], Path(tmp))
                    results.setdefault((cname, p.name), []).append(res)
                    print(f"round {rnd + 1}/{rounds} [{cname}] {p.name}: {statistics.median(res['times']) * 1e3:.2f} ms "
                          f"({len(res['times'])} reps, load {res['load_s']:.1f} s)", flush=True)

    import numpy as np

    rows, failed = [], []
    for cname in case_names:
        case = CASES[cname]
        ref = np.load(args.cache / f"{cname}.ref.npy")
        for p in providers:
            runs = results[(cname, p.name)]
            timing = round_timings([r["times"] for r in runs])
            cos = min(_min_cosine(r["feats"], ref) for r in runs)
            tol = _tolerance(p)
            ok = 1 - cos <= tol
            if not ok:
                failed.append(f"[{cname}] {p.name}: 1 - min cosine {1 - cos:.3g} > tolerance {tol:g}")
            rows.append({
                "suite": SUITE, "case": cname, "provider": p.name, **timing,
                "throughput": case.batch / timing["median_ms"] * 1e3, "unit": "images/s", "tallow_speedup": 1.0,
                "param_model": case.model, "param_batch": case.batch, "param_engine": p.engine,
                "param_precision": p.precision, "param_variant": p.variant, "param_threads": args.threads,
                "details": runs[-1]["details"], "load_s": statistics.median(r["load_s"] for r in runs),
                "min_cosine": cos, "accuracy_ok": ok, "agreement_metric": "cosine",
                "agreement_error": 1 - cos, "agreement_tol": tol,
                "agreement_reference": "transformers fp32 pooled features, each image alone",
            })
        ours = {r["param_precision"]: r["median_ms"] for r in rows
                if r["case"] == cname and r["param_engine"] == "tallow" and not r["param_variant"]}
        for r in rows:
            if r["case"] == cname and r["param_engine"] != "tallow" and r["param_precision"] in ours:
                r["tallow_speedup"] = r["median_ms"] / ours[r["param_precision"]]
        for p in providers:  # INT8 against its own engine's fp32
            twin = "tallow-fp32" if p.engine == "tallow" else "onnxruntime-fp32"
            if p.precision == "int8" and (cname, twin) in results:
                row = next(r for r in rows if r["case"] == cname and r["provider"] == p.name)
                row["min_cosine_to_own_fp32"] = _min_cosine(results[(cname, p.name)][-1]["feats"],
                                                            results[(cname, twin)][-1]["feats"])
    table, records = peer_table(rows)
    md = (f"Each engine in its own process, {rounds} alternated round(s), {args.threads} threads, torch imported "
          f"before tallow. Median of the rounds' medians. "
          f"`{shlex.join(['python', 'benchmarks/bench_vision.py', *command])}`"
          f"{' (--quick: smoke-run timings, not results)' if args.quick else ''}\n\n"
          f"### tallow vs the fastest peer (issue 27)\n\n{table}\n\n### Every provider\n\n{all_rows_table(rows)}\n\n"
          + ("**Beyond the accuracy tolerance:**\n\n" + "\n".join(f"- {f}" for f in failed) + "\n" if failed else ""))
    print("\n" + md)
    if not args.no_write:
        import harness

        harness.write_results(SUITE, rows, chart=True, failed=failed, md=md,
                              extra={"peers": records, "cases": info["cases"], "rounds": rounds})
    if failed:
        print("providers beyond their accuracy tolerance:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
