"""INT8 GEMM benchmarks.

Suite ``int8_linear``: tallow's QuantizedLinear (dynamic u8 activations, int8
weights, fused dequant + bias) vs torch float32 ``F.linear`` and vs
``torch.ao.quantization.quantize_dynamic``'s int8 Linear (FBGEMM/x86 engine).
Suite ``int8_matmul``: tallow's exact ``int8_matmul`` vs ``torch._int_mm``.

Shapes: the distinct linear layers (K -> N) of BERT-base and GPT-2 124M from
benchmarks/registry.py (768->768, 768->3072, 3072->768, the 768->50257 LM
head), at M = 1 (decode), 32, 256 and 1024 tokens. Work = 2·M·K·N operations
(int8 multiply-adds for the int8 providers, float multiply-adds for F.linear),
reported in GOP/s.

torch._int_mm only runs for M > 16 and K, N multiples of 8: at M = 1 its A is
zero-padded to 17 rows and for N = 50257 its B to 50264 columns (padding done
once, outside the timing; the provider's name says so).

Run: .venv/bin/python benchmarks/bench_int8_matmul.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import tallow  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp  # noqa: F401
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Agreement, Case, run_suite  # noqa: E402
from registry import BERT_BASE, GPT2_124M, linear_shapes  # noqa: E402

from tallow.ops import QuantizedLinear, int8_matmul  # noqa: E402

TOKENS = (1, 32, 256, 1024)  # tokens per call: decode step, small batch, a BERT batch, GPT-2's context
QUICK_TOKENS = (1, 32)


def model_shapes() -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    for model in (BERT_BASE, GPT2_124M):
        for s in linear_shapes(model):
            if s not in shapes:
                shapes.append(s)
    return shapes


def dynamic_int8_linear(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def linear_cases(shapes, tokens) -> list[Case]:
    cases = []
    for k, n in shapes:
        w = torch.randn(n, k) / k**0.5
        b = torch.randn(n) * 0.1
        ql = QuantizedLinear.from_float(w, b)
        dq = dynamic_int8_linear(w, b)
        for m in tokens:
            x = torch.randn(m, k)

            def ours(x=x, ql=ql):
                with torch.no_grad():
                    return ql(x)

            def fp32(x=x, w=w, b=b):
                with torch.no_grad():
                    return F.linear(x, w, b)

            def dyn(x=x, dq=dq):
                with torch.no_grad():
                    return dq(x)

            cases.append(Case(
                name=f"linear M={m} {k}->{n}",
                providers={"tallow QuantizedLinear": ours, "torch fp32 F.linear": fp32,
                           "torch quantize_dynamic int8": dyn},
                work=2.0 * m * k * n, unit="GOP/s", params={"M": m, "K": k, "N": n},
                agreement=Agreement(
                    reference="torch fp32 F.linear", metric="rel_fro",
                    tol={"tallow QuantizedLinear": 0.015, "torch quantize_dynamic int8": 0.03},
                    why="INT8 vs fp32: QuantizedLinear's tested bound is 1.5 % (tests/ops/test_int8_matmul.py); "
                        "FBGEMM's per-tensor weight scale costs about twice that"),
                peak={"tallow QuantizedLinear": "int8", "torch quantize_dynamic int8": "int8",
                      "torch fp32 F.linear": "fp32"},
            ))
    return cases


def matmul_cases(shapes, tokens) -> list[Case]:
    cases = []
    for k, n in shapes:
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        n_pad = -(-n // 8) * 8
        b_pad = torch.zeros(k, n_pad, dtype=torch.int8)
        b_pad[:, :n] = b
        for m in tokens:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            m_pad = max(m, 17)
            a_pad = torch.zeros(m_pad, k, dtype=torch.int8)
            a_pad[:m] = a
            label = "torch._int_mm"
            pads = []
            if m_pad != m:
                pads.append(f"M padded to {m_pad}")
            if n_pad != n:
                pads.append(f"N padded to {n_pad}")
            if pads:
                label += " [" + ", ".join(pads) + "]"
            cases.append(Case(
                name=f"int8_matmul M={m} {k}->{n}",
                providers={"tallow int8_matmul": (lambda a=a, b=b: int8_matmul(a, b)),
                           label: (lambda a=a_pad, b=b_pad: torch._int_mm(a, b))},
                work=2.0 * m * k * n, unit="GOP/s", params={"M": m, "K": k, "N": n, "int_mm_padding": ", ".join(pads)},
                # Exact integer GEMMs: equal results (the padding cut off).
                agreement=Agreement(tol=0.0, outputs={label: lambda a=a_pad, b=b_pad, m=m, n=n: torch._int_mm(a, b)[:m, :n]},
                                    why="int32 accumulation of int8 products is exact"),
                peak="int8",
            ))
    return cases


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: M in {1, 32}, two shapes, short timings")
    args = ap.parse_args(argv)
    shapes = model_shapes()
    tokens = TOKENS
    min_time = 0.6
    if args.quick:
        shapes, tokens, min_time = shapes[:2], QUICK_TOKENS, 0.15
    torch.manual_seed(0)
    print(f"tallow {tallow.__version__}, isa {tallow.get_isa()}, {tallow.get_num_threads()} threads; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, qengine {torch.backends.quantized.engine}")
    run_suite("int8_linear", linear_cases(shapes, tokens), min_time=min_time)
    run_suite("int8_matmul", matmul_cases(shapes, tokens), min_time=min_time)


if __name__ == "__main__":
    main()
