"""How far INT8 moves an LLM from its own fp32: the quantization variants of
tallow side by side on one GGUF model (default: make run's SmolLM2-135M-Instruct).

Variants, all from the same dequantized weights in one process:
- ``fp32``: the reference.
- ``int8-rows``: QuantizedLinear on every linear layer — weights per output
  channel, activations per row (what Llama-family INT8 was before
  tallow.ops.int8_block; GPT-2's INT8 still).
- ``int8-blocks``: ``load(..., quantize="int8")`` — BlockQuantizedLinear,
  weights and activations per block of 32.

Measured:
- teacher-forced over ``--windows`` windows of ``--window`` tokens of the
  standard library's docstrings: the share of positions whose top-1 token
  equals fp32's, KL(fp32 || variant) in nats per token, and perplexity;
- greedy chat replies (bench_llm's questions, the model's chat template,
  ``--tokens`` tokens, end of turn ignored): how many equal fp32's, the mean
  common prefix, and the first question's reply text;
- decode (b1, 32-token prompt, ``--tokens`` tokens) and 512-token prefill
  speed through ``generate_ids`` (the native path where it is built),
  ``--rounds`` alternated rounds, median — a ratio between variants of one
  run, on an otherwise idle machine.

``python benchmarks/bench_int8_llm_quality.py`` prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_llm import CHAT_QUESTIONS  # noqa: E402  (the same questions as the llama.cpp comparison)


def _rows_variant(fp32_path: str):
    """The model with every linear on QuantizedLinear (per-row INT8), from the fp32 weights."""
    from tallow.models import load
    from tallow.models.layers import Dense
    from tallow.ops import QuantizedLinear

    model = load(fp32_path)
    for m in model.modules():
        if isinstance(m, Dense):
            m.quantized = QuantizedLinear.from_float(m.weight, m.bias, activation=m.activation)
            m.weight, m.bias = None, None
    model.quantization = "int8 (per row)"
    return model


def _teacher_forced(model, windows):
    import torch

    out = []
    with torch.inference_mode():
        for ids in windows:
            out.append(model(torch.tensor([ids]))[0].float())
    return torch.cat(out)


def _greedy(model, prompts, tokens):
    from tallow.models.scheduler import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    return [[ev.token_id for ev in model.generate_ids([p], params)] for p in prompts]


def _speed(model, tokens):
    from tallow.models.scheduler import SamplingParams

    stamps = []
    for _ in model.generate_ids([list(range(1000, 1032))], SamplingParams(max_new_tokens=tokens, temperature=0,
                                                                           stop_at_eos=False)):
        stamps.append(time.perf_counter())
    t0 = time.perf_counter()
    for _ in model.generate_ids([list(range(1000, 1512))], SamplingParams(max_new_tokens=1, temperature=0,
                                                                           stop_at_eos=False)):
        pass
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), 512 / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tallow:smollm2-135m-instruct", help="a .gguf file or tallow:<name>")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32, help="greedy reply / decode length")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from tallow.corpus import docstring_sentences
    from tallow.engine.chat import render_chat
    from tallow.models import load, resolve_model_path

    path = str(resolve_model_path(args.model) if args.model.startswith("tallow:") else args.model)
    fp32 = load(path)
    variants = {"fp32": fp32, "int8-rows": _rows_variant(path), "int8-blocks": load(path, quantize="int8")}
    enc = fp32.tokenizer._tok
    ids = enc.encode(" ".join(docstring_sentences(100 + args.windows * args.window // 10)),
                     add_special_tokens=False).ids
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    windows = [w for w in windows if len(w) == args.window]
    prompts = [enc.encode(render_chat(fp32.chat_template, [{"role": "user", "content": q}],
                                      special_tokens=fp32.special_tokens), add_special_tokens=False).ids
               for q in CHAT_QUESTIONS]

    base = _teacher_forced(fp32, windows)
    base_lp = F.log_softmax(base, -1)
    targets = torch.cat([torch.tensor(w[1:] + [w[-1]]) for w in windows])
    keep = torch.cat([torch.arange(len(w)) < len(w) - 1 for w in windows])
    base_replies = _greedy(fp32, prompts, args.tokens)
    rows = []
    for name, model in variants.items():
        logits = base if model is fp32 else _teacher_forced(model, windows)
        lp = F.log_softmax(logits, -1)
        agree = float((logits.argmax(-1) == base.argmax(-1)).float().mean())
        kl = float(F.kl_div(lp, base_lp, log_target=True, reduction="batchmean"))
        ppl = math.exp(float(-lp[keep].gather(1, targets[keep, None]).mean()))
        replies = base_replies if model is fp32 else _greedy(model, prompts, args.tokens)
        prefix = [next((i for i, (a, b) in enumerate(zip(r, s)) if a != b), len(r))
                  for r, s in zip(replies, base_replies)]
        rows.append({"name": name, "agree": agree, "kl": kl, "ppl": ppl,
                     "equal": sum(r == s for r, s in zip(replies, base_replies)),
                     "prefix": statistics.mean(prefix), "first": enc.decode(replies[0])})
        print(f"[quality] {name}: top-1 {agree:.4f} KL {kl:.5f} ppl {ppl:.4f}", flush=True)
    speed = {name: ([], []) for name in variants}
    for name, model in variants.items():
        _speed(model, 8)  # warm-up: the native step is built at the first call
    for _ in range(args.rounds):
        for name, model in variants.items():
            dec, pre = _speed(model, args.tokens)
            speed[name][0].append(dec)
            speed[name][1].append(pre)

    ref_ppl = rows[0]["ppl"]
    print(f"\n{Path(path).name}: {len(windows)} x {args.window} tokens teacher-forced; "
          f"{len(prompts)} chat questions x {args.tokens} greedy tokens; speed median of {args.rounds} rounds\n")
    print("| variant | top-1 = fp32 | KL(fp32 ‖ ·) nats/token | perplexity (vs fp32) | chat replies = fp32 "
          "| mean common prefix | decode b1 tok/s | prefill 512 tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec, pre = (statistics.median(v) for v in speed[r["name"]])
        print(f"| {r['name']} | {100 * r['agree']:.1f} % | {r['kl']:.4f} | {r['ppl']:.3f} "
              f"({100 * (r['ppl'] / ref_ppl - 1):+.2f} %) | {r['equal']}/{len(prompts)} | {r['prefix']:.1f} "
              f"| {dec:.1f} | {pre:.0f} |")
    print(f"\nFirst question ({CHAT_QUESTIONS[0]!r}):")
    for r in rows:
        print(f"- {r['name']}: {r['first'][:80]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
