"""The GPU backends as seen from a machine without a GPU: the CUDA module is
built and linked when nvcc exists, imports cleanly and reports no device;
the Triton kernels ship inside the package; forcing a GPU backend on CPU
tensors raises, auto-dispatch never picks one; preprocess_tensors (the GPU
entry point) works on CPU tensors too."""

from __future__ import annotations

import importlib
import importlib.resources
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tallow
from tallow import BackendUnavailable
from tallow import _gpu
from tallow.ops import QuantizedLinear, attention, int8_matmul, preprocess, preprocess_ref, preprocess_tensors
from tallow.ops.preprocess import bilinear_taps


def _nvcc() -> str | None:
    found = shutil.which("nvcc") or os.environ.get("CUDACXX")
    for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if found is None and Path(p).exists():
            found = p
    return found


@pytest.mark.skipif(_nvcc() is None, reason="no CUDA compiler here: tallow._C_cuda is not built (make install: TALLOW_CUDA=AUTO)")
def test_cuda_module_built_and_imports_without_gpu():
    pkg = Path(tallow.__file__).parent
    assert list(pkg.glob("_C_cuda*.so")), f"nvcc is at {_nvcc()} but no _C_cuda*.so in {pkg}"
    mod = importlib.import_module("tallow._C_cuda")
    n, err = mod.device_count()  # never raises
    for name in ("attention_forward", "attention_splits", "int8_quantize_rows", "int8_gemm", "preprocess_resample"):
        assert hasattr(mod, name), name
    status = _gpu.cuda_module_status()
    assert status["built"] and status["devices"] == n
    if not torch.cuda.is_available():
        assert n == 0 and err  # e.g. "CUDA driver version is insufficient" / "no CUDA-capable device"


def test_cuda_module_checks_name_the_argument():
    mod = pytest.importorskip("tallow._C_cuda")
    with pytest.raises(ValueError, match="D must be in"):
        mod.attention_forward(1, 1, 1, 1, 0, 1, 1, 1, 1, 300, [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], 0, 0,
                              False, 1.0, 1, 0, 0)
    with pytest.raises(ValueError, match="act must be"):
        mod.int8_gemm(1, 1, 1, 1, 1, 1, 1, 1, 1, False, 7, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="splits"):
        mod.attention_splits  # noqa: B018 (exists)
        mod.attention_forward(1, 1, 1, 1, 0, 1, 1, 1, 1, 64, [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], 0, 0,
                              False, 1.0, 2, 0, 0)


def test_attention_splits_heuristic():
    mod = pytest.importorskip("tallow._C_cuda")
    assert mod.attention_splits(8 * 12, 1, 1024, 132) > 1     # decode, small batch: split
    assert mod.attention_splits(8 * 12, 512, 512, 132) == 1   # prefill: never
    assert mod.attention_splits(4096, 1, 1024, 132) == 1      # enough blocks already
    assert mod.attention_splits(1, 1, 10, 132) == 1           # too short to split


def test_triton_kernels_ship_in_the_package():
    files = {p.name for p in importlib.resources.files("tallow.kernels").iterdir()}
    assert {"attention.py", "int8_matmul.py", "preprocess.py"} <= files


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_gpu_backend_on_cpu_tensors_raises(force_backend, backend):
    force_backend(backend)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendUnavailable, match="cannot run on cpu"):
        attention(q, q, q)
    a = torch.zeros(2, 2, dtype=torch.int8)
    with pytest.raises(BackendUnavailable, match="cannot run on cpu"):
        int8_matmul(a, a)


def test_gpu_impls_refuse_cpu_tensors():
    attn_mod = importlib.import_module("tallow.ops.attention")  # the module, not the function
    i8_mod = importlib.import_module("tallow.ops.int8_matmul")

    q = torch.randn(1, 1, 4, 8)
    for fn in (attn_mod._attention_cuda, attn_mod._attention_triton):
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            fn(q, q, q, False, None, 1.0)
    a = torch.zeros(2, 2, dtype=torch.int8)
    for fn in (i8_mod._int8_matmul_cuda, i8_mod._int8_matmul_triton):
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            fn(a, a)


def test_auto_dispatch_on_cpu_never_tries_gpu_backends():
    q = torch.randn(1, 2, 5, 16)
    attention(q, q, q)  # warnings are errors: no fallback warning may appear


def test_quantized_linear_device_mismatch():
    lin = QuantizedLinear.from_float(torch.randn(4, 8))
    with pytest.raises(ValueError, match="weights are on cpu"):
        lin(torch.randn(2, 8, device="meta"))


def test_info_reports_gpu_backends():
    info = tallow.info()
    assert "cuda_module" in info and "triton" in info["backends"] and "cuda" in info["backends"]
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"] is False and info["backends"]["triton"] is False


# ---------------------------------------------------------------- preprocess_tensors on the CPU


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for h, w in sizes]


def test_preprocess_tensors_cpu_matches_ref():
    imgs = _images([(60, 45), (30, 100), (32, 32)])
    out = preprocess_tensors(imgs, resize=32, crop=24)
    assert torch.equal(out, preprocess_ref([i.numpy() for i in imgs], resize=32, crop=24))
    packed = torch.cat([i.reshape(-1) for i in imgs])
    offs = [0, imgs[0].numel(), imgs[0].numel() + imgs[1].numel()]
    out2 = preprocess_tensors(packed=packed, offsets=offs, sizes=[(60, 45), (30, 100), (32, 32)], resize=32, crop=24)
    assert torch.equal(out, out2)


def test_preprocess_tensors_errors():
    img = torch.zeros(10, 10, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        preprocess_tensors([img.float()])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess_tensors([torch.zeros(10, 10, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="outside packed"):
        preprocess_tensors(packed=img.reshape(-1), offsets=[0], sizes=[(11, 10)])
    with pytest.raises(ValueError, match="crop must be <= resize"):
        preprocess_tensors([img], resize=8, crop=9)
    with pytest.raises(TypeError, match="out_dtype"):
        preprocess_tensors([img], out_dtype=torch.int32)
    assert preprocess_tensors([], resize=8, crop=4).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("in_size,out_size", [(1024, 256), (97, 256), (640, 224), (256, 256), (3000, 171)])
def test_bilinear_taps_sum_to_one_and_cover_the_support(in_size, out_size):
    """The host-side taps (shared by the CUDA and Triton kernels): Pillow's
    normalised 22-bit coefficients sum to ~2^22, start inside the image."""
    start, count, coeff = bilinear_taps(in_size, out_size, 0, out_size)
    assert (start >= 0).all() and (start + count <= in_size).all() and (count >= 1).all()
    sums = coeff.astype(np.int64).sum(axis=1)
    assert (np.abs(sums - (1 << 22)) <= coeff.shape[1]).all()


def test_preprocess_tensors_agree_with_preprocess_on_arrays():
    imgs = _images([(77, 51)], seed=3)
    a = preprocess([imgs[0].numpy()], resize=40, crop=33)
    b = preprocess_tensors(imgs, resize=40, crop=33)
    assert torch.equal(a, b)
