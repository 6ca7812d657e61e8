"""GPT-2 124M decode end to end against CTranslate2's ``Generator`` (issue 22,
item 4): tallow fp32 / INT8 (the native decode step, and the per-op step it
replaced) vs CTranslate2 float32 / int8, same weights, same token ids.

    python benchmarks/bench_gpt2_decode.py               # full run (~15 min on 2 cores)
    python benchmarks/bench_gpt2_decode.py --quick       # smoke run: 1 round, 16 new tokens, short timings
    python benchmarks/bench_gpt2_decode.py --cases gpt2-124m-b1 --providers "tallow-int8*" ctranslate2-int8

How it measures (the machinery and the rules of bench_encoders.py, whose
helpers it imports):
- Each engine in its own process: one subprocess per provider x case, the
  providers alternated over ``--rounds`` rounds (3), the order reversed every
  other round. In tallow's processes ``torch`` is imported before ``tallow``
  (the order most programs have); CTranslate2's never import torch. The
  engines' processes get this environment without OMP_WAIT_POLICY (as in a
  fresh shell; a parent that imported tallow first has it PASSIVE).
- The same threads everywhere (``--threads``, 2): ``tallow.set_num_threads``
  and ``torch.set_num_threads`` (and TALLOW_NUM_THREADS) for tallow,
  ``intra_threads`` (``inter_threads`` 1) for CTranslate2.
- Every call: a batch of B prompts of P token ids (random ids, seed 0; no
  tokenizer on either side: ids in, ids out), N new tokens each, greedy, the
  end-of-sequence token an ordinary token on both sides so every row
  generates all N (checked). tallow: its public API, ``model.generate_ids(
  prompts, SamplingParams(max_new_tokens=N, temperature=0, stop_at_eos=
  False))``, i.e. the continuous-batching scheduler (prefill on the per-op
  path, then one decode step per token; tallow.models.decoder_native's
  native step unless ``TALLOW_DECODER=ops``). CTranslate2: ``generate_batch(
  tokens, max_length=N, end_token=[], include_prompt_in_result=False,
  sampling_topk=1)`` on the converted vocabulary's token strings (the prompt
  forwarded at once, as tallow's prefill does), ``sequences_ids`` read back.
- Three figures per call, from the time of the call's start, of its first
  generated token and of its last (tallow: the scheduler's events as
  ``generate_ids`` yields them; CTranslate2: its per-token ``callback``, a
  Python call per row and step, microseconds against milliseconds):
  ``generate`` = the whole call (B*N tokens); ``first token`` = start to the
  first token (the P-token prefill and one sampling: B*P prompt tokens/s);
  ``decode step`` = (last - first) / (N - 1), the decode steps only, at
  positions P..P+N-1 (B tokens per step). Issue 22's target is on the decode
  step: tallow-int8 >= 1.2x ctranslate2-int8 in tokens/s at b1 and b8.
- Accuracy in the same run, not timed: the logits after each prompt's last
  token (tallow: ``model(ids)``; CTranslate2: ``forward_batch``) against
  transformers fp32, ||x - ref|| / ||ref|| over the batch (fp32 1e-4, INT8
  0.1: a bound that catches wrong weights or a broken conversion, not INT8
  rounding; on the random 124M model CTranslate2 int8 measured 0.056,
  tallow INT8 0.029, and 0.12 / 0.03 as max |x - ref| / max |ref|); a
  provider beyond it fails the run (its figures kept and marked). Reported
  beside it: how many of the N greedy tokens equal transformers fp32's
  greedy tokens (the shortest common prefix over the rows; random weights
  have near-ties, so INT8 may part early).

Model: ``transformers.GPT2Config()`` (its defaults are GPT-2 124M: 12 layers,
768 wide, 12 heads, vocabulary 50257, 1024 positions) with random weights
(seed 0): GPT-2's weights are not obtainable offline. Built once under
``--cache`` (build/bench-cache/gpt2_decode, or $TALLOW_BENCH_CACHE/gpt2_decode;
not in git), rebuilt when a version it depends on changes. tallow loads the
checkpoint directory (``tallow.models.load(dir[, quantize="int8"])``: INT8
linears, bf16 KV cache by default); CTranslate2 converts it
(``ctranslate2.converters.TransformersConverter``, float32 weights, next to a
word-level tokenizer made only to give the converter the 50257 token
strings), and quantizes at load (``compute_type`` "float32" / "int8").
CTranslate2 is optional: without it its providers are skipped and say why.

Results: benchmarks/results/<machine>/gpt2_decode.{json,csv,png} (harness
conventions; the median of the rounds' medians, their min-max as the spread,
p20 and p80 over every call) and gpt2_decode.md: tallow / CTranslate2 at the
same precision (> 1: tallow faster) and the time per step split.
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

# bench_encoders' process machinery: the same Provider record, the cache
# stamps, the engines' environment and the spread cell (it imports nothing heavy).
from bench_encoders import (Provider, _available, _ms, _stamp_ok, _versions,  # noqa: E402
                            _worker_env, _write_stamp, select_providers)
from harness import round_timings  # noqa: E402

SUITE = "gpt2_decode"
DEFAULT_CACHE = ROOT / "build" / "bench-cache" / SUITE
# ||logits - transformers fp32|| / ||transformers fp32|| allowed (see the module docstring).
FP32_TOL, INT8_TOL = 1e-4, 0.2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: dict  # GPT2Config keyword arguments: {} = GPT2Config()'s defaults, GPT-2 124M


MODELS = {
    "gpt2-124m": ModelSpec("gpt2-124m", {}),
    # For the smoke test (tests/test_benchmarks.py): seconds, not minutes.
    "tiny": ModelSpec("tiny", {"n_embd": 128, "n_layer": 2, "n_head": 2, "vocab_size": 1000, "n_positions": 64,
                               "bos_token_id": 999, "eos_token_id": 999}),
}


@dataclass(frozen=True)
class CaseSpec:
    name: str
    model: str
    batch: int
    prompt: int = 32
    new: int = 128
    warmup: int = 1
    min_reps: int = 3


CASES = {c.name: c for c in (
    CaseSpec("gpt2-124m-b1", "gpt2-124m", 1),
    CaseSpec("gpt2-124m-b8", "gpt2-124m", 8),
    CaseSpec("tiny-b2", "tiny", 2, prompt=8, new=6),
)}
DEFAULT_CASES = ["gpt2-124m-b1", "gpt2-124m-b8"]
QUICK_NEW = 16  # --quick: new tokens per row (the case names carry P+N)

PROVIDERS = {p.name: p for p in (
    Provider("tallow-fp32", "tallow", "fp32"), Provider("tallow-int8", "tallow", "int8"),
    # The per-op decode step (TALLOW_DECODER=ops): what the native step gains.
    Provider("tallow-fp32 per-op", "tallow", "fp32", "per-op"),
    Provider("tallow-int8 per-op", "tallow", "int8", "per-op"),
    Provider("ctranslate2-fp32", "ctranslate2", "fp32"), Provider("ctranslate2-int8", "ctranslate2", "int8"),
)}
FIGURES = ("generate", "first token", "decode step")


def _tolerance(p: Provider) -> float:
    return INT8_TOL if p.precision == "int8" else FP32_TOL


def _case_key(case: CaseSpec, prompt: int, new: int) -> str:
    return f"{case.name} {prompt}+{new}"


# ------------------------------------------------------------------ preparation (own process)

def _hf_dir(spec: ModelSpec, cache: Path) -> Path:
    """The random checkpoint tallow loads (weights and config only: ids in, ids out)."""
    d = cache / spec.name / "hf"
    key = {"config": spec.config, "seed": 0, **_versions("torch", "transformers")}
    if _stamp_ok(d, key):
        return d
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(GPT2Config(**spec.config)).eval().save_pretrained(d)
    _write_stamp(d, key)
    return d


def _convert_ct2(hf_dir: Path, work: Path, out: Path) -> None:
    """CTranslate2's converter reads the vocabulary from a tokenizer (its size
    must equal the model's): a word-level one with a token string per id, the
    last id GPT-2's <|endoftext|>, beside links to the checkpoint's files."""
    import ctranslate2
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, PreTrainedTokenizerFast

    cfg = AutoConfig.from_pretrained(hf_dir)
    eos = "<|endoftext|>"
    vocab = {f"<{i}>": i for i in range(cfg.vocab_size)}
    vocab[eos] = cfg.eos_token_id
    del vocab[f"<{cfg.eos_token_id}>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=eos)),
                                  bos_token=eos, eos_token=eos, unk_token=eos)
    work.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.name != "stamp.json":
            (work / f.name).unlink(missing_ok=True)
            (work / f.name).symlink_to(f.resolve())
    tok.save_pretrained(work)
    ctranslate2.converters.TransformersConverter(str(work)).convert(str(out), force=True)


def _reference(hf_dir: Path, prompts: list[list[int]], new: int) -> tuple:
    """transformers fp32: the logits after each prompt's last token [B, V] and
    its greedy tokens [B, new], eos an ordinary token."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        logits = hf(input_ids=ids).logits[:, -1].float().numpy()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return logits, out[:, ids.shape[1]:].tolist()


def prepare(cache: Path, cases: list[dict], providers: list[Provider]) -> dict:
    """Builds (or finds in the cache) the checkpoints, the CTranslate2
    conversion, each case's prompts and the transformers reference."""
    import numpy as np
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    info: dict = {"models": {}, "cases": {}}
    need_ct2 = any(p.engine == "ctranslate2" for p in providers)
    for model in dict.fromkeys(CASES[c["case"]].model for c in cases):
        spec = MODELS[model]
        hf_dir = _hf_dir(spec, cache)
        cfg = json.loads((hf_dir / "config.json").read_text())
        minfo = info["models"][model] = {"hf_dir": str(hf_dir), "vocab": cfg["vocab_size"],
                                         "layers": cfg["n_layer"], "hidden": cfg["n_embd"], "heads": cfg["n_head"]}
        if need_ct2:
            d = cache / model / "ct2"
            key = {"hf_dir": str(hf_dir), "model": json.loads((hf_dir / "stamp.json").read_text()),
                   **_versions("ctranslate2", "transformers", "tokenizers")}
            if not _stamp_ok(d, key):
                t0 = time.perf_counter()
                _convert_ct2(hf_dir, cache / model / "ct2-src", d)
                _write_stamp(d, key)
                print(f"[{model}] CTranslate2 conversion: {time.perf_counter() - t0:.0f} s", flush=True)
            minfo["ct2_dir"] = str(d)
    d = cache / "cases"
    d.mkdir(parents=True, exist_ok=True)
    for c in cases:
        case, key = CASES[c["case"]], c["key"]
        m = info["models"][case.model]
        # Random ids below the eos id: no prompt holds the token that could end a row.
        prompts = np.random.default_rng(0).integers(0, m["vocab"] - 1, (case.batch, c["prompt"])).tolist()
        fname = re.sub(r"[^a-z0-9]+", "_", key)
        # The checkpoint's own stamp (its config and seed): a rebuilt model gets a new reference.
        ref_key = {"prompts": prompts, "new": c["new"], "hf_dir": m["hf_dir"],
                   "model": json.loads((Path(m["hf_dir"]) / "stamp.json").read_text())}
        stamp = d / f"{fname}.stamp.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == ref_key):
            t0 = time.perf_counter()
            logits, tokens = _reference(Path(m["hf_dir"]), prompts, c["new"])
            np.save(d / f"{fname}.ref_logits.npy", logits)
            (d / f"{fname}.ref_tokens.json").write_text(json.dumps(tokens))
            stamp.write_text(json.dumps(ref_key))
            print(f"[{key}] transformers reference: {time.perf_counter() - t0:.0f} s", flush=True)
        (d / f"{fname}.json").write_text(json.dumps(prompts))
        info["cases"][key] = {"case": case.name, "model": case.model, "batch": case.batch, "prompt": c["prompt"],
                              "new": c["new"], "file": fname}
    return info


# ------------------------------------------------------------------ workers (one process each)

class _Tallow:
    def __init__(self, p: Provider, hf_dir: str, threads: int):
        if p.variant == "per-op":  # read when the model is built (decoder_native.native_decoder_wanted)
            os.environ["TALLOW_DECODER"] = "ops"
        import torch  # before tallow: the order most programs have

        import tallow
        from tallow.models import SamplingParams, load

        torch.set_num_threads(threads)
        tallow.set_num_threads(threads)
        self.torch, self.params = torch, SamplingParams
        self.model = load(hf_dir, quantize="int8" if p.precision == "int8" else None)
        self.details = {"isa": tallow.get_isa(), "threads": tallow.get_num_threads(),
                        "torch_threads": torch.get_num_threads(), "native_decoder": self.model.native is not None,
                        "kv_cache_dtype": self.model.kv_cache_dtype, "TALLOW_DECODER": os.environ.get("TALLOW_DECODER")}

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[float]]:
        """Tokens per row and the times of the call's start, first and last token."""
        rows: list[list[int]] = [[] for _ in prompts]
        sp = self.params(max_new_tokens=new, temperature=0, stop_at_eos=False)
        start = time.perf_counter()
        first = None
        for ev in self.model.generate_ids(prompts, sp):
            rows[ev.index].append(ev.token_id)
            if first is None:
                first = time.perf_counter()
        return rows, [start, first, time.perf_counter()]

    def last_logits(self, prompts: list[list[int]]):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor(prompts))[:, -1].float().numpy()


class _CTranslate2:
    def __init__(self, p: Provider, ct2_dir: str, threads: int):
        import ctranslate2

        self.gen = ctranslate2.Generator(ct2_dir, device="cpu", intra_threads=threads, inter_threads=1,
                                         compute_type="int8" if p.precision == "int8" else "float32")
        self.vocab = json.loads((Path(ct2_dir) / "vocabulary.json").read_text())
        self.details = {"compute_type": self.gen.compute_type, "version": ctranslate2.__version__,
                        "intra_threads": threads, "inter_threads": 1}

    def generate(self, prompts: list[list[int]], new: int) -> tuple[list[list[int]], list[float]]:
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        stamps: list[float] = []

        def callback(step) -> bool:  # per generated token and row (greedy): the times of the first and last
            if step.step == 0 and not stamps or step.step == new - 1:
                stamps.append(time.perf_counter())
            return False

        start = time.perf_counter()
        res = self.gen.generate_batch(tokens, max_length=new, end_token=[], include_prompt_in_result=False,
                                      sampling_topk=1, beam_size=1, callback=callback)
        end = time.perf_counter()
        return [list(r.sequences_ids[0]) for r in res], [start, stamps[0], stamps[-1] if len(stamps) > 1 else end]

    def last_logits(self, prompts: list[list[int]]):
        import numpy as np

        tokens = [[self.vocab[i] for i in p] for p in prompts]
        return np.asarray(self.gen.forward_batch(tokens))[:, -1].astype(np.float32)


def worker(args) -> int:
    """One provider on one case: load, check, warm up, time; per call the
    whole time, the time to the first token and the decode time per step."""
    import numpy as np

    p = PROVIDERS[args.worker]
    c = json.loads(args.case)
    cache = Path(args.cache)
    prompts = json.loads((cache / "cases" / f"{c['file']}.json").read_text())
    new = c["new"]
    t0 = time.perf_counter()
    eng = _Tallow(p, c["hf_dir"], args.threads) if p.engine == "tallow" else _CTranslate2(p, c["ct2_dir"], args.threads)
    load_s = time.perf_counter() - t0
    logits = eng.last_logits(prompts)

    def once() -> dict:
        rows, (start, first, last) = eng.generate(prompts, new)
        if [len(r) for r in rows] != [new] * len(prompts):
            raise RuntimeError(f"{p.name} generated {[len(r) for r in rows]} tokens per row, {new} were asked for")
        return {"total": last - start, "first": first - start, "step": (last - first) / max(new - 1, 1), "tokens": rows}

    for _ in range(args.warmup):
        once()
    runs: list[dict] = []
    start = time.perf_counter()
    while len(runs) < args.max_reps and (len(runs) < args.min_reps or time.perf_counter() - start < args.min_time):
        runs.append(once())
    details = dict(eng.details, pid=os.getpid(), torch_loaded="torch" in sys.modules,
                   torch_imported_first=p.engine == "tallow", OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))
    out = Path(args.out)
    np.save(out.with_suffix(".npy"), logits)
    times = {"generate": [r["total"] for r in runs], "first token": [r["first"] for r in runs],
             "decode step": [r["step"] for r in runs]}
    out.write_text(json.dumps({"times": times,
                               "tokens": runs[-1]["tokens"], "load_s": load_s, "details": details}))
    return 0


# ------------------------------------------------------------------ orchestration

def _run_worker(p: Provider, key: str, cinfo: dict, minfo: dict, args, tmp: Path) -> dict:
    out = tmp / f"{re.sub(r'[^a-z0-9]+', '_', p.name)}-{cinfo['file']}.json"
    case = {**cinfo, "hf_dir": minfo["hf_dir"], "ct2_dir": minfo.get("ct2_dir")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", p.name, "--case", json.dumps(case),
           "--cache", str(args.cache), "--threads", str(args.threads), "--warmup", str(args.warmup_reps),
           "--min-time", str(args.min_time), "--min-reps", str(args.min_reps), "--max-reps", str(args.max_reps),
           "--out", str(out)]
    env = dict(_worker_env(args), TALLOW_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{p.name} on {key} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    import numpy as np

    res = json.loads(out.read_text())
    res["logits"] = np.load(out.with_suffix(".npy"))
    return res


def _rel_error(x, ref) -> float:
    import numpy as np

    if x.shape != ref.shape or not np.isfinite(x).all():
        return float("inf")
    return float(np.linalg.norm(x.astype(np.float64) - ref) / np.linalg.norm(ref))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _work(figure: str, c: dict) -> tuple[float, str]:
    """(work per call, unit) of a figure: tokens generated, prompt tokens, tokens per step."""
    return {"generate": (c["batch"] * c["new"], "tokens/s"), "decode step": (c["batch"], "tokens/s"),
            "first token": (c["batch"] * c["prompt"], "prompt tokens/s")}[figure]


def build_rows(results: dict, providers: list[Provider], cases: dict, cache: Path, threads: int) -> tuple[list, list]:
    import numpy as np

    rows, failed = [], []
    for key, c in cases.items():
        ref = np.load(cache / "cases" / f"{c['file']}.ref_logits.npy").astype(np.float64)
        ref_tokens = json.loads((cache / "cases" / f"{c['file']}.ref_tokens.json").read_text())
        for p in providers:
            runs = results[(key, p.name)]
            err = max(_rel_error(r["logits"], ref) for r in runs)
            tol = _tolerance(p)
            ok = err <= tol
            if not ok:
                failed.append(f"[{key}] {p.name}: logits error {err:.3g} > tolerance {tol:g}")
            equal = min(_common_prefix(a, b) for r in runs for a, b in zip(r["tokens"], ref_tokens))
            for fig in FIGURES:
                timing = round_timings([r["times"][fig] for r in runs])
                work, unit = _work(fig, c)
                rows.append({
                    "suite": SUITE, "case": f"{key} {fig}", "provider": p.name, **timing,
                    "throughput": work / timing["median_ms"] * 1e3, "unit": unit, "tallow_speedup": 1.0,
                    "param_model": c["model"], "param_batch": c["batch"], "param_prompt": c["prompt"],
                    "param_new": c["new"], "param_figure": fig, "param_engine": p.engine,
                    "param_precision": p.precision, "param_variant": p.variant, "param_threads": threads,
                    "details": runs[-1]["details"], "load_s": statistics.median(r["load_s"] for r in runs),
                    "greedy_tokens_equal_to_reference": equal, "accuracy_ok": ok,
                    "agreement_metric": "rel_fro", "agreement_error": err, "agreement_tol": tol,
                    "agreement_reference": "transformers fp32, logits after each prompt's last token",
                })
    for r in rows:  # > 1: tallow (native step, same precision) faster than this row's provider
        ours = [o for o in rows if o["case"] == r["case"] and o["provider"] == f"tallow-{r['param_precision']}"]
        if ours and r is not ours[0]:
            r["tallow_speedup"] = r["median_ms"] / ours[0]["median_ms"]
    return rows, failed


def _at(rows: list[dict], key: str, fig: str, provider: str) -> dict | None:
    return next((r for r in rows if r["case"] == f"{key} {fig}" and r["provider"] == provider), None)


def peer_table(rows: list[dict], cases: dict) -> tuple[str, list[dict]]:
    """tallow (native step) vs CTranslate2 at the same precision: tokens/s of
    the decode steps and of the whole call, and their ratios."""
    lines = ["| case | precision | tallow decode tokens/s | CTranslate2 decode tokens/s | decode: tallow / CTranslate2 "
             "| tallow generate tokens/s | CTranslate2 generate tokens/s | generate: tallow / CTranslate2 |",
             "|---|---|---|---|---|---|---|---|"]
    records = []
    for key in cases:
        for prec in ("fp32", "int8"):
            cells, rec = [], {"case": key, "precision": prec}
            for fig in ("decode step", "generate"):
                ours, theirs = _at(rows, key, fig, f"tallow-{prec}"), _at(rows, key, fig, f"ctranslate2-{prec}")
                if ours is None or theirs is None:
                    break
                ratio = theirs["median_ms"] / ours["median_ms"]
                flag = "" if ours["accuracy_ok"] and theirs["accuracy_ok"] else " (inaccurate)"
                cells += [f"{ours['throughput']:.1f} ({_ms(ours)} ms)",
                          f"{theirs['throughput']:.1f} ({_ms(theirs)} ms)", f"**{ratio:.2f}×**{flag}"]
                rec.update({f"{fig.replace(' ', '_')}_tallow_tokens_per_s": ours["throughput"],
                            f"{fig.replace(' ', '_')}_ctranslate2_tokens_per_s": theirs["throughput"],
                            f"{fig.replace(' ', '_')}_ratio": ratio})
            else:
                lines.append(f"| {key} | {prec} | " + " | ".join(cells) + " |")
                records.append(rec)
    return "\n".join(lines), records


def split_table(rows: list[dict], providers: list[Provider], cases: dict) -> str:
    """Every provider: time to the first token (the prefill), decode ms per
    step, the whole call, the decode share of it; for tallow's per-op step,
    how much faster the native step is."""
    lines = ["| case | provider | first token ms (prefill) | decode ms / step | generate ms | decode share "
             "| native step vs per-op | logits error (tol) | greedy tokens = transformers' |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, c in cases.items():
        for p in providers:
            first, step, gen = (_at(rows, key, f, p.name) for f in ("first token", "decode step", "generate"))
            if gen is None:
                continue
            share = step["median_ms"] * (c["new"] - 1) / gen["median_ms"]
            gain = "—"
            if p.variant == "per-op":
                native = _at(rows, key, "decode step", f"tallow-{p.precision}")
                gain = "—" if native is None else f"{step['median_ms'] / native['median_ms']:.2f}×"
            acc = f"{gen['agreement_error']:.2g} ({gen['agreement_tol']:g})" + ("" if gen["accuracy_ok"] else " **NO**")
            lines.append(f"| {key} | {p.name} | {_ms(first)} | {_ms(step)} | {_ms(gen)} | {share:.0%} | {gain} | {acc} "
                         f"| {gen['greedy_tokens_equal_to_reference']}/{c['new']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: 1 round, {QUICK_NEW} new tokens, short timings")
    ap.add_argument("--cases", nargs="*", choices=sorted(CASES), help=f"default: {' '.join(DEFAULT_CASES)}")
    ap.add_argument("--providers", nargs="*", metavar="GLOB", help="provider names or globs (default: all)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens per row (default: the case's, 32)")
    ap.add_argument("--new-tokens", type=int,
                    help=f"new tokens per row (default: the case's, 128; --quick: {QUICK_NEW})")
    ap.add_argument("--rounds", type=int, help="alternated rounds (default 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, help="seconds of timed calls per process (default 4; --quick: 0)")
    ap.add_argument("--min-reps", type=int, help="timed calls at least (default 3; --quick: 2)")
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--warmup-reps", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--cache", type=Path, default=(Path(os.environ["TALLOW_BENCH_CACHE"]) / SUITE
                                                   if os.environ.get("TALLOW_BENCH_CACHE") else DEFAULT_CACHE))
    ap.add_argument("--no-write", action="store_true", help="print only; no result files")
    ap.add_argument("--keep-omp-wait-policy", action="store_true",
                    help="pass OMP_WAIT_POLICY on to the engines' processes (default: removed, as in a fresh shell)")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    args.cache = args.cache.resolve()
    if args.worker:
        args.warmup = args.warmup if args.warmup is not None else 1
        return worker(args)
    if args.prepare_only is not None:
        spec = json.loads(args.prepare_only)
        info = prepare(args.cache, spec["cases"], [PROVIDERS[n] for n in spec["providers"]])
        (args.cache / "prepared.json").write_text(json.dumps(info, indent=1))
        return 0
    for name in ("prompt_len", "new_tokens", "rounds", "threads", "min_reps", "max_reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_reps < 0:
        ap.error(f"--warmup-reps must be >= 0, got {args.warmup_reps}")
    rounds = args.rounds or (1 if args.quick else 3)
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 4.0
    if args.min_reps is None:
        args.min_reps = 2 if args.quick else 3
    case_specs = []
    for name in args.cases or DEFAULT_CASES:
        case = CASES[name]
        prompt = args.prompt_len or case.prompt
        new = args.new_tokens or (min(QUICK_NEW, case.new) if args.quick else case.new)
        if new < 2:  # the decode step is (last - first) / (new - 1)
            ap.error(f"--new-tokens must be >= 2 (the decode steps are timed between the first and last token), "
                     f"got {new}")
        positions = MODELS[case.model].config.get("n_positions", 1024)
        if prompt + new > positions:
            ap.error(f"case {name}: prompt {prompt} + new tokens {new} exceed the model's {positions} positions")
        case_specs.append({"case": name, "key": _case_key(case, prompt, new), "prompt": prompt, "new": new})
    providers, skipped = select_providers(ap, dict(PROVIDERS), args.providers, _available)

    # Preparation in its own process: transformers and the models must not stay in the parent.
    args.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cache", str(args.cache), "--prepare-only",
           json.dumps({"cases": case_specs, "providers": [p.name for p in providers]})]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        print("preparation failed (see above)", file=sys.stderr)
        return 1
    print(f"prepared in {time.perf_counter() - t0:.0f} s (cache: {args.cache})", flush=True)
    info = json.loads((args.cache / "prepared.json").read_text())
    cases = {c["key"]: info["cases"][c["key"]] for c in case_specs}

    results: dict[tuple[str, str], list[dict]] = {}
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tallow-bench-gpt2-") as tmp:
        for rnd in range(rounds):
            order = providers if rnd % 2 == 0 else providers[::-1]
            for key, c in cases.items():
                for p in order:
                    res = _run_worker(p, key, c, info["models"][c["model"]], args, Path(tmp))
                    results.setdefault((key, p.name), []).append(res)
                    med = {f: statistics.median(res["times"][f]) * 1e3 for f in FIGURES}
                    print(f"round {rnd + 1}/{rounds} [{key}] {p.name}: decode {med['decode step']:.2f} ms/step, "
                          f"first token {med['first token']:.1f} ms, generate {med['generate']:.0f} ms "
                          f"({len(res['times']['generate'])} calls, load {res['load_s']:.1f} s)", flush=True)
    print(f"timed in {time.perf_counter() - t_run:.0f} s", flush=True)

    rows, failed = build_rows(results, providers, cases, args.cache, args.threads)
    table, records = peer_table(rows, cases)
    omp = os.environ.get("OMP_WAIT_POLICY")
    omp_note = ("" if omp is None else f" OMP_WAIT_POLICY={omp} was " + ("passed on to the engines."
                if args.keep_omp_wait_policy else "removed from the engines' environment."))
    models_md = "\n".join(f"- {m}: {v['layers']} layers, {v['hidden']} wide, {v['heads']} heads, "
                          f"vocabulary {v['vocab']} (random weights, seed 0)" for m, v in info["models"].items())
    md = (f"Each engine in its own process, {rounds} alternated round(s), {args.threads} threads, torch imported "
          f"before tallow.{omp_note} Greedy, eos ignored, token ids on both sides. Median of the rounds' medians "
          f"[their min–max]. `{shlex.join(['python', 'benchmarks/bench_gpt2_decode.py', *command])}`"
          f"{' (--quick: smoke-run timings, not results)' if args.quick else ''}\n\n"
          f"### tallow vs CTranslate2 Generator, same precision (> 1: tallow faster)\n\n"
          + (table if records else "(no pair measured: CTranslate2 or tallow's provider not run)")
          + f"\n\n### Time per step\n\n{split_table(rows, providers, cases)}\n\n"
          "Decode ms / step: (time of the last token - time of the first) / (new tokens - 1); first token: the "
          "call's start to its first token (the prompt's prefill and one sampling).\n\n"
          f"### Model\n\n{models_md}\n\n"
          + ("### Not run\n\n" + "\n".join(f"- {k}: {v}" for k, v in skipped.items()) + "\n\n" if skipped else "")
          + ("**Beyond the accuracy tolerance:**\n\n" + "\n".join(f"- {f}" for f in failed) + "\n" if failed else ""))
    print("\n" + md)
    if not args.no_write:
        import harness

        harness.write_results(SUITE, rows, chart=True, failed=failed, md=md, extra={
            "peers": records, "cases": cases, "models": info["models"], "skipped": skipped, "rounds": rounds})
    if failed:
        print("providers beyond their accuracy tolerance:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
