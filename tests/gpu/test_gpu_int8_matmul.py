"""int8_matmul / QuantizedLinear on CUDA tensors, cuda and triton backends:
exact GEMM (both the mma.sync and the dp4a paths), bit-exact quantization,
and the fused epilogue vs the reference with the CPU tests' tolerance."""

from __future__ import annotations

import pytest
import torch

import tallow
from tallow.ops import QuantizedLinear, int8_linear_ref, int8_matmul, int8_matmul_ref, quantize_rows_ref
from tallow.testing import assert_close

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
MATMUL_SHAPES = [(1, 1, 1), (1, 769, 100), (7, 17, 65), (97, 100, 769), (129, 65, 17), (1, 3, 769),
                 (7, 769, 3), (129, 1, 100), (6, 256, 64), (13, 512, 130), (1024, 768, 3072)]
LINEAR_SHAPES = [(1, 768, 3072), (129, 65, 17), (97, 100, 769), (8, 3072, 768), (300, 768, 768)]
ACTS = [None, "relu", "gelu_erf", "gelu_tanh"]


def rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", MATMUL_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_gpu_exact(force_backend, backend, m, k, n):
    force_backend(backend)
    a, b = rand_i8(m, k), rand_i8(k, n)
    c = int8_matmul(a.cuda(), b.cuda())
    assert c.dtype == torch.int32 and c.is_cuda
    assert torch.equal(c.cpu(), int8_matmul_ref(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_gpu_strided(force_backend, backend):
    force_backend(backend)
    a = rand_i8(40, 33).t()
    b = rand_i8(50, 40)[::2].t()
    assert torch.equal(int8_matmul(a.cuda(), b.cuda()).cpu(), int8_matmul_ref(a, b))


@pytest.mark.parametrize("path", [1, 2])
def test_cuda_gemm_paths_agree(path):
    """Both CUDA GEMM paths (1 = mma.sync, 2 = dp4a) on an aligned shape."""
    mod = tallow._gpu.cuda_backend(torch.empty(1, device="cuda"))
    a, b = rand_i8(130, 256), rand_i8(256, 70)
    ad, wd = a.cuda(), b.t().contiguous().cuda()
    c = torch.empty(130, 70, dtype=torch.int32, device="cuda")
    mod.int8_gemm(ad.data_ptr(), wd.data_ptr(), c.data_ptr(), 130, 70, 256, 256, 256, 70, False, 0,
                  0, 0, 0, 0, 0, path, torch.cuda.current_stream().cuda_stream)
    assert torch.equal(c.cpu(), int8_matmul_ref(a, b))


def _special_rows(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g) * 3
    x[1] = 0.0
    x[2] = x[2].abs() + 0.1
    x[3] = -x[3].abs() - 0.1
    x[4, 0] = float("nan")
    x[5, -1] = float("inf")
    x[6] = torch.arange(k) * 0.5 - k / 4
    x[7] = x[7] * 1e-30
    x[8] = x[8] * 1e30
    return x


@pytest.mark.parametrize("k", [1, 3, 17, 100, 769, 3072])
def test_quantize_rows_gpu_bit_exact(k):
    from tallow.kernels.int8_matmul import quantize_rows

    x = _special_rows(k)
    qr, sr, zr = quantize_rows_ref(x)
    mod = tallow._gpu.cuda_backend(torch.empty(1, device="cuda"))
    xd = x.cuda()
    xq = torch.empty(9, k, dtype=torch.int8, device="cuda")
    s = torch.empty(9, device="cuda")
    z = torch.empty(9, dtype=torch.int32, device="cuda")
    mod.int8_quantize_rows(xd.data_ptr(), xq.data_ptr(), s.data_ptr(), z.data_ptr(), 9, k, k,
                           torch.cuda.current_stream().cuda_stream)
    results = {"cuda": (xq, s, z), "triton": quantize_rows(xd)}
    for name, (q, sc, zp) in results.items():
        assert torch.equal((q.cpu().to(torch.int32) + 128).to(torch.uint8), qr), name
        assert torch.equal(sc.cpu().nan_to_num(-1.0), sr.nan_to_num(-1.0)), name
        assert torch.equal(zp.cpu(), zr), name


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gpu_matches_reference(force_backend, backend, m, k, n, act):
    force_backend(backend)
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    lin = QuantizedLinear.from_float(w, bias, activation=act)
    x = torch.randn(m, k, generator=g) * 2
    if m > 2:
        x[1, 3] = float("nan")
    ref = int8_linear_ref(x, lin.int8_weight(), lin.weight_scale, lin.bias, act)
    y = lin.to("cuda")(x.cuda()).cpu()
    assert torch.equal(y.isnan(), ref.isnan())
    fin = torch.isfinite(ref)
    scale = float(ref[fin].abs().max())
    assert_close(y[fin], ref[fin], atol=1e-5 * max(scale, 1e-3), rtol=1e-5, what=f"{backend} {act}")


def test_linear_gpu_leading_dims_and_no_bias():
    lin = QuantizedLinear.from_float(torch.randn(40, 64) * 0.1).cuda()
    x = torch.randn(2, 3, 64, device="cuda")
    y = lin(x)
    assert y.shape == (2, 3, 40) and y.is_cuda
    ref = int8_linear_ref(x.cpu(), lin.int8_weight().cpu(), lin.weight_scale.cpu(), None, None)
    assert_close(y.cpu(), ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
