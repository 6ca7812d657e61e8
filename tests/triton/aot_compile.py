"""Compiles tallow's Triton kernels ahead of time for sm_80 and sm_90 with
the tile configurations the wrappers launch on a GPU — no GPU needed
(Triton's bundled ptxas) — and prints one JSON line per kernel variant:
shared memory, registers, spills, and a few PTX facts the kernels rely on.

Run without TRITON_INTERPRET (tests/triton/test_triton_compile.py starts it
in a subprocess). Usage: python aot_compile.py [--quick] (quick: sm_90 and a
few variants, ~15 s; full: every launch configuration on both, ~2.5 min)
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import tallow.kernels.attention as A  # noqa: E402
import tallow.kernels.int8_matmul as I  # noqa: E402
import tallow.kernels.preprocess as P  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def signature(fn, pointers: dict, floats=(), constexprs=()):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(label, fn, pointers, floats, consts, arch, num_warps, num_stages=None, **opts):
    sig = signature(fn, pointers, floats, consts)
    options = {"num_warps": num_warps, "enable_fp_fusion": True, **opts}
    if num_stages is not None:
        options["num_stages"] = num_stages
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options=options)
    ptx = k.asm["ptx"]
    md = k.metadata
    row = {"kernel": label, "arch": arch, "shared": md.shared, "num_warps": md.num_warps,
           "seconds": round(time.time() - t0, 2),
           "mma": ("mma.sync" in ptx) or ("wgmma" in ptx), "fma_f32": ("fma.rn.f32" in ptx),
           "div_rn": ("div.rn.f32" in ptx)}
    print(json.dumps(row), flush=True)


def attention(arch, quick):
    cases = [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 256),
             (torch.float32, 128), (torch.float32, 256)]
    if quick:
        cases = cases[:2]
    for dtype, block_d in cases:
        bm, bn, nw, ns = A.prefill_config(dtype, block_d)
        t = TYPES[dtype]
        consts = {"FP32": dtype == torch.float32, "UPCAST": False,
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d}
        compile_one(f"attn_fwd {t} D{block_d}", A._attn_fwd, {"Q": t, "K": t, "V": t, "O": t, "MASK": "u8"},
                    ("qk_scale",), consts, arch, nw, ns)
    for dtype, block_d in [(torch.float16, 128), (torch.float32, 256)][: 1 if quick else 2]:
        t = TYPES[dtype]
        compile_one(f"decode_partial {t} D{block_d}", A._decode_partial,
                    {"Q": t, "K": t, "V": t, "MASK": "u8", "PM": "fp32", "PL": "fp32", "PO": "fp32"},
                    ("qk_scale",), {"BLOCK_N": A.decode_config(block_d), "BLOCK_D": block_d},
                    arch, 4)
        compile_one(f"decode_combine {t} D{block_d}", A._decode_combine,
                    {"PM": "fp32", "PL": "fp32", "PO": "fp32", "O": t}, (), {"BLOCK_S": 64, "BLOCK_D": block_d},
                    arch, 4)


def int8(arch, quick):
    compile_one("quantize_rows K4096", I._quantize_rows, {"X": "fp32", "XQ": "i8", "SX": "fp32", "ZP": "i32"},
                (), {"BLOCK_K": 4096}, arch, 8, enable_fp_fusion=False)
    ptrs = {"A": "i8", "B": "i8", "C": "fp32", "SX": "fp32", "ZP": "i32", "COLSUM": "i32", "SW": "fp32",
            "BIAS": "fp32"}
    configs = [c for c in I._CONFIGS if c.kwargs["BLOCK_M"] == 16] if quick else I._CONFIGS
    for cfg in configs:
        consts = {"LINEAR": True, **cfg.kwargs}
        name = "int8_gemm " + "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        compile_one(name, I._int8_gemm, ptrs, (), consts, arch, cfg.num_warps, cfg.num_stages,
                    enable_fp_fusion=False)


def preprocess(arch, quick):
    for t in ("fp32", "fp16")[: 1 if quick else 2]:
        compile_one(f"resample {t}", P._resample,
                    {"SRC": "u8", "META": "i64", "TAPS": "i32", "LUT": "fp32", "OUT": t}, (),
                    {"BLOCK_I": 4, "BLOCK_J": 32}, arch, 4)


def main():
    quick = "--quick" in sys.argv
    archs = [90] if quick else [80, 90]
    for arch in archs:
        attention(arch, quick)
        int8(arch, quick)
        preprocess(arch, quick)


if __name__ == "__main__":
    main()
