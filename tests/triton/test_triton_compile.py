"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one:
tests/triton/aot_compile.py runs triton.compile for each launch
configuration the wrappers use and reports shared memory and PTX facts.
Catches what the interpreter cannot: lowering errors, tiles that do not fit
in shared memory, tl.dot without tensor cores, and the quantization
kernel's correctly rounded division without FMA contraction (its bit
exactness on the GPU rests on both)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")
# Largest dynamic shared memory per block (opt-in): A100 163 KiB, H100/H200 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _compile(quick: bool) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)] + (["--quick"] if quick else []), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stdout
    return rows


def _check(rows: list[dict]) -> None:
    for r in rows:
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], r
        name = r["kernel"]
        if name.startswith("int8_gemm") or (name.startswith("attn_fwd") and "fp32" not in name):
            assert r["mma"], f"{name} on sm_{r['arch']} does not use the tensor cores"
        if name.startswith("quantize_rows"):
            assert r["div_rn"] and not r["fma_f32"], f"quantize_rows must divide with div.rn and never fuse: {r}"


def test_kernels_compile_for_sm90_quick():
    _check(_compile(quick=True))


@pytest.mark.slow
def test_every_launch_config_compiles_for_sm80_and_sm90():
    rows = _compile(quick=False)
    assert {r["arch"] for r in rows} == {80, 90}
    _check(rows)
