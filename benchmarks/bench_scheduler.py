"""Overheads of iteration-level batching (tallow.models.scheduler) on a
GPT-2-124M-shaped model with random weights, single-threaded, CPU time
(time.process_time, so other work on the machine does not count).

Prints, per dtype (fp32, int8):
- the model's decode step for 32 rows at mixed positions (decode_rows alone);
- next_tokens on [32, 50257] logits: all greedy, all sampled (temperature,
  top-k 50, top-p 0.9, repetition penalty, 32 generators), top-p 0.95 alone,
  and mixed (half greedy, two top-k/top-p groups), on Zipf-like logits
  (log-probability -1.1 log rank, the shape of a trained LM's next-token
  distribution) and on flat ones (randn: a random-weight model's; the
  nucleus then holds most of the vocabulary and needs the full sort);
- a whole GenerationScheduler.step() with 32 running rows (decode + sampling
  + text + bookkeeping) against its decode_rows share.

A dev measurement, not part of run_all (it writes no results file):
    python benchmarks/bench_scheduler.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tallow
from tallow.models import SamplingParams, load
from tallow.models.generation import next_tokens
from tallow.models.scheduler import GenerationScheduler

from registry import GPT2_124M


def cpu_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tallow.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=GPT2_124M["hidden"], n_layer=GPT2_124M["layers"], n_head=GPT2_124M["heads"],
                     vocab_size=GPT2_124M["vocab"], n_positions=GPT2_124M["ctx"])
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(cfg).eval().save_pretrained(Path(tmp))
        models = {"fp32": load(tmp), "int8": load(tmp, quantize="int8")}
    rows, vocab = 32, GPT2_124M["vocab"]
    print(f"GPT-2-124M shape, random weights, 1 thread, CPU time (median of {args.reps}); {tallow.get_isa()}")

    zipf = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    peaked = torch.stack([zipf[torch.randperm(vocab)] for _ in range(rows)]) * 1.25  # / temperature 0.8
    flat = torch.randn(rows, vocab)
    seen = torch.rand(rows, vocab) < 0.001
    sampled = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
    mixed = [SamplingParams(temperature=0) if i % 2 else
             (sampled if i % 4 == 0 else SamplingParams(temperature=1.0, top_p=0.95)) for i in range(rows)]
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    top_p = SamplingParams(temperature=1.0, top_p=0.95)
    sampling = {}
    for kind, logits in (("zipf", peaked), ("flat", flat)):
        sampling.update({
            f"greedy   {kind}": lambda x=logits: next_tokens(x, [SamplingParams(temperature=0)] * rows, seen, [None] * rows),
            f"sampled  {kind}": lambda x=logits: next_tokens(x, [sampled] * rows, seen, gens),
            f"top-p    {kind}": lambda x=logits: next_tokens(x, [top_p] * rows, seen, gens),
            f"mixed    {kind}": lambda x=logits: next_tokens(x, mixed, seen, gens),
        })
    sample_ms = {k: cpu_time(f, args.reps) * 1e3 for k, f in sampling.items()}

    for name, m in models.items():
        sched = GenerationScheduler(m, max_rows=rows)
        torch.manual_seed(1)
        for i in range(rows):  # prompts of 16..79 tokens: rows at mixed positions
            sched.add(i, [torch.randint(0, vocab - 1, (16 + 2 * i,)).tolist()],
                      [SamplingParams(max_new_tokens=200, stop_at_eos=False, **(
                          {"temperature": 0} if i % 2 else {"temperature": 0.8, "top_k": 50, "seed": i}))])
        sched.step()  # prefill all 32
        steps = []
        for _ in range(args.reps + 1):
            t = time.process_time()
            sched.step()
            steps.append(time.process_time() - t)
        step_ms = statistics.median(steps[1:]) * 1e3
        live = sched._rows
        toks = torch.tensor([r.pending for r in live])
        pos = torch.tensor([r.length for r in live])
        views = sched._views(0, len(live))
        decode_ms = cpu_time(lambda: m.decode_rows(toks, pos, views), args.reps) * 1e3
        print(f"{name}: decode_rows 32 rows {decode_ms:.1f} ms; whole step() {step_ms:.1f} ms "
              f"(overhead beyond the forward {step_ms - decode_ms:+.1f} ms = {(step_ms / decode_ms - 1) * 100:+.1f} %)")
        for k, v in sample_ms.items():
            print(f"  next_tokens {k:13s} {v:6.2f} ms = {v / decode_ms * 100:4.1f} % of the {name} decode step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
