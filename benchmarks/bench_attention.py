"""Fused attention: tallow vs torch SDPA (CPU flash kernel) vs the eager maths.

Cases (shapes from benchmarks/registry.py):
  BERT-base prefill   B=8, H, L=seq;      B=1, H, L=max_seq   (no mask)
  GPT-2 causal prefill B=1, H, L=ctx
  GPT-2 decode         B=8, H, Lq=1, Lk=ctx (one new token against a full KV cache)

Work (FLOP) = 4 * B * H * D * sum_i n_i, where n_i is the number of keys
query row i sees: n_i = Lk without a mask; with causal, n_i = Lk - Lq + i + 1,
so sum_i n_i = Lq * (Lk - Lq) + Lq * (Lq + 1) / 2 (the causal square counts
half, plus its diagonal). 4 = 2 FLOP per multiply-add, for Q.K^T and for P.V;
the softmax is not counted. Unit: GFLOP/s.

OpenMP wait policy: torch's libgomp threads busy-wait (spin) for a long
while after each parallel region (GOMP_SPINCOUNT, ~10 ms with Cascade Lake's
slow `pause`). In an interleaved run they spin on one of the two cores while
the next provider runs, so whoever follows SDPA loses about half a core
(measured: tallow alone 10.2 ms, right after SDPA 14-15 ms, at B=1 L=512).
This script therefore sets OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep)
unless the caller set it; `--omp-default` keeps torch's default spinning.

Run: .venv/bin/python benchmarks/bench_attention.py [--quick] [--omp-default]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--omp-default" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Agreement, Case, run_suite  # noqa: E402
from registry import BERT_BASE, GPT2_124M  # noqa: E402

from tallow.ops import attention, attention_ref  # noqa: E402


def visible_pairs(lq: int, lk: int, causal: bool) -> int:
    """sum over query rows of the keys each one sees."""
    if not causal:
        return lq * lk
    return lq * (lk - lq) + lq * (lq + 1) // 2


def make_case(name: str, b: int, h: int, lq: int, lk: int, d: int, causal: bool) -> Case:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g)
    # torch's is_causal aligns the diagonal top-left; ours bottom-right. They
    # agree for Lq == Lk; with Lq == 1 (decode) every key is visible anyway.
    sdpa_causal = causal and lq == lk
    assert causal == sdpa_causal or lq == 1
    providers = {
        "tallow": lambda: attention(q, k, v, causal=causal),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal),
        "eager_math": lambda: attention_ref(q, k, v, causal=causal),
    }
    if lq <= 4:  # decode: also against a bf16 KV cache (issue 11; GPT-2's kv_cache_dtype)
        k16, v16 = k.bfloat16(), v.bfloat16()
        providers["tallow-bf16-cache"] = lambda: attention(q, k16, v16, causal=causal)
    work = 4 * b * h * d * visible_pairs(lq, lk, causal)
    return Case(name, providers, work=work, unit="GFLOP/s",
                params={"B": b, "H": h, "Lq": lq, "Lk": lk, "D": d, "causal": causal,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
                agreement=Agreement(reference="eager_math", metric="rel",
                                    tol={"tallow": 1e-4, "torch_sdpa": 1e-4, "tallow-bf16-cache": 1e-2},
                                    why="fp32 attention, different summation orders and exp: ~1e-6 relative "
                                        "(1e-4 leaves room); a bf16 K/V cache rounds to 8 mantissa bits"),
                peak="fp32")


def cases() -> list[Case]:
    bert, gpt2 = BERT_BASE, GPT2_124M
    return [
        make_case(f"bert-base prefill B=8 L={bert['seq']}", 8, bert["heads"], bert["seq"], bert["seq"],
                  bert["head_dim"], False),
        make_case(f"bert-base prefill B=1 L={bert['max_seq']}", 1, bert["heads"], bert["max_seq"],
                  bert["max_seq"], bert["head_dim"], False),
        make_case(f"gpt2 causal prefill B=1 L={gpt2['ctx']}", 1, gpt2["heads"], gpt2["ctx"], gpt2["ctx"],
                  gpt2["head_dim"], True),
        make_case(f"gpt2 decode B=8 Lk={gpt2['ctx']}", 8, gpt2["heads"], 1, gpt2["ctx"], gpt2["head_dim"], True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (less timing per case)")
    parser.add_argument("--omp-default", action="store_true",
                        help="leave torch's OpenMP threads spinning between calls (see the module docstring)")
    args = parser.parse_args()
    run_suite("attention", cases(), min_time=0.05 if args.quick else 0.6, chart=not args.quick)


if __name__ == "__main__":
    main()
