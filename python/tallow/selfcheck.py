"""``tallow selfcheck``: every op of the installed build against its pure-torch
reference on awkward shapes, on the ISA this CPU runs (or the one named).

For a user: "does this install compute right on this machine?" in a few
seconds, without the source tree or pytest. ``make test-wheel`` runs it in a
fresh venv on the installed wheel, on the chosen ISA and on ``scalar``. The
bounds are the test suite's: integer results exact, float epilogues within
1e-5 of the output's scale, attention within twice torch SDPA's error against
a float64 oracle, preprocessing bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class CheckResult:
    op: str
    case: str
    ok: bool
    detail: str


def _close(y: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    """The suite's bound for a float epilogue over an exact integer part."""
    from .testing import assert_close

    scale = float(ref[torch.isfinite(ref)].abs().max()) if ref.numel() else 1.0
    try:
        cmp = assert_close(y, ref, atol=1e-5 * max(scale, 1e-3), rtol=1e-5)
        return True, f"max abs error {cmp.max_abs:.2e} (output scale {scale:.3g})"
    except AssertionError as exc:
        return False, str(exc)


def _exact(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, str]:
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    same = bool(torch.equal(out, ref))
    return same, "bit for bit" if same else f"{int((out != ref).sum())} of {out.numel()} values differ"


def _int8_matmul(gen: torch.Generator) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    from .ops import int8_matmul, int8_matmul_ref

    def case(m, k, n):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=gen)
        return _exact(int8_matmul(a, b), int8_matmul_ref(a, b))

    return [(f"{m}x{k}x{n}", lambda m=m, k=k, n=n: case(m, k, n))
            for m, k, n in [(1, 1, 1), (7, 33, 17), (64, 300, 65), (129, 64, 1)]]


def _int8_linear(gen: torch.Generator):
    from .ops import QuantizedLinear, int8_linear_ref

    def case(m, k, n, act):
        w = torch.randn(n, k, generator=gen)
        q = QuantizedLinear.from_float(w, torch.randn(n, generator=gen), activation=act)
        x = torch.randn(m, k, generator=gen) * 2 + 0.5
        return _close(q(x), int8_linear_ref(x, q.int8_weight(), q.weight_scale, q.bias, q.activation))

    return [(f"{m}x{k}x{n} {act}", lambda m=m, k=k, n=n, act=act: case(m, k, n, act))
            for m, k, n, act in [(1, 5, 3, None), (17, 100, 33, "relu"), (3, 7, 250, "gelu_erf"),
                                 (64, 384, 96, "gelu_tanh")]]


def _int8_block(gen: torch.Generator):
    from .ops.int8_block import BlockQuantizedLinear, int8_linear_b32_ref

    def case(m, k, n):
        q = BlockQuantizedLinear.from_float(torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))
        x = torch.randn(m, k, generator=gen) * 3
        return _close(q(x), int8_linear_b32_ref(x, q.int8_weight(), q.weight_scale(), q.bias, None))

    return [(f"{m}x{k}x{n}", lambda m=m, k=k, n=n: case(m, k, n)) for m, k, n in [(1, 33, 17), (5, 100, 769)]]


def _int8_conv2d(gen: torch.Generator):
    from .ops import QuantizedConv2d, int8_conv2d_ref

    def case(b, c, h, w, cout, k, s, p):
        conv = QuantizedConv2d.from_float(torch.randn(cout, c, k, k, generator=gen), torch.randn(cout, generator=gen),
                                          stride=s, padding=p, activation="relu")
        x = torch.randn(b, c, h, w, generator=gen) * 3 + 1
        return _close(conv(x), int8_conv2d_ref(x, conv.int8_weight(), conv.weight_scale, conv.bias, s, p, "relu"))

    shapes = [(1, 3, 17, 15, 33, 7, 2, 3), (2, 17, 3, 3, 5, 3, 1, 0), (1, 64, 14, 14, 64, 3, 1, 1)]
    return [("b{}c{}h{}w{}o{}k{}s{}p{}".format(*sh), lambda sh=sh: case(*sh)) for sh in shapes]


def _attention(gen: torch.Generator):
    from .ops import attention, attention_ref
    from .testing import attention_error_bound, compare

    def case(b, h, lq, lk, d, causal, masked):
        q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (lq, lk, lk))
        mask = None
        if masked:
            mask = torch.zeros(b, lk, dtype=torch.bool)
            mask[:, lk // 2:] = torch.rand(b, lk - lk // 2, generator=gen) < 0.5
        out = attention(q, k, v, causal=causal, key_padding_mask=mask)
        oracle = attention_ref(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=mask)
        bound = attention_error_bound(q, k, v, causal, mask, oracle)
        cmp = compare(out, oracle)
        ok = cmp.nonfinite_mismatch == 0 and cmp.max_abs <= bound
        return ok, f"max abs error {cmp.max_abs:.2e} <= {bound:.2e}" if ok else f"{cmp} (bound {bound:.3e})"

    shapes = [(1, 1, 1, 1, 64, False, False), (3, 3, 7, 7, 80, False, True), (1, 2, 97, 129, 64, True, True),
              (8, 3, 1, 129, 64, True, True), (1, 2, 3, 300, 80, True, True)]
    return [("b{}h{}q{}k{}d{} causal={} mask={}".format(*sh), lambda sh=sh: case(*sh)) for sh in shapes]


def _preprocess(gen: torch.Generator):
    from .ops import preprocess, preprocess_ref

    def case(sizes):
        imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen).numpy() for h, w in sizes]
        return _exact(torch.as_tensor(preprocess(imgs)), torch.as_tensor(preprocess_ref(imgs)))

    return [("480x640 333x500 301x700", lambda: case([(480, 640), (333, 500), (301, 700)])),
            ("100x90 224x224 257x1031", lambda: case([(100, 90), (224, 224), (257, 1031)]))]


OPS = {"int8_matmul": _int8_matmul, "int8_linear": _int8_linear, "int8_linear_b32": _int8_block,
       "int8_conv2d": _int8_conv2d, "attention": _attention, "preprocess": _preprocess}


def run(isa: str | None = None) -> tuple[str, list[CheckResult]]:
    """Runs every check on the native CPU backend (on ``isa`` if given, else
    the one this CPU runs); returns (the ISA used, the results). Raises
    NativeUnavailableError when the native module did not load: a self-check
    of the torch reference against itself would prove nothing."""
    import os

    import tallow

    tallow.native()  # NativeUnavailableError naming why, before anything runs
    previous_isa, previous_backend = tallow.get_isa(), os.environ.get("TALLOW_BACKEND")
    os.environ["TALLOW_BACKEND"] = "cpu"  # the native kernels, never a silent fallback to the reference
    try:
        if isa is not None:
            tallow.set_isa(isa)
        used = tallow.get_isa()
        gen = torch.Generator().manual_seed(0)
        results = []
        for op, cases in OPS.items():
            for case, check in cases(gen):
                try:
                    ok, detail = check()
                except Exception as exc:  # a crash is a failed check, reported like one
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
                results.append(CheckResult(op, case, bool(ok), detail))
        return used, results
    finally:
        tallow.set_isa(previous_isa)
        if previous_backend is None:
            os.environ.pop("TALLOW_BACKEND", None)
        else:
            os.environ["TALLOW_BACKEND"] = previous_backend


def main(isa: str | None, as_json: bool) -> int:
    import json

    start = time.perf_counter()
    used, results = run(isa)
    failed = [r for r in results if not r.ok]
    if as_json:
        print(json.dumps({"isa": used, "passed": len(results) - len(failed), "failed": len(failed),
                          "results": [r.__dict__ for r in results]}, indent=2))
    else:
        for r in results:
            print(f"{'ok  ' if r.ok else 'FAIL'} {r.op:16s} {r.case:32s} {r.detail}")
        print(f"selfcheck on {used}: {len(results) - len(failed)} passed, {len(failed)} failed "
              f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0
