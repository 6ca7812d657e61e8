"""kernels/int8_matmul.py: exact int8 GEMM, bit-exact activation
quantization, and the fused INT8 linear epilogue, against the references
of tallow.ops.int8_matmul (the same tolerances as the CPU tests)."""

from __future__ import annotations

import pytest
import torch

from tallow.ops import int8_linear_ref, int8_matmul_ref, quantize_rows_ref
from tallow.testing import assert_close

SHAPES = [(1, 1, 1), (7, 17, 65), (33, 100, 20), (129, 65, 17), (1, 64, 3)]
ACTS = [None, "relu", "gelu_erf", "gelu_tanh"]


def rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_matmul_exact(device, m, k, n):
    from tallow.kernels.int8_matmul import int8_matmul

    a, b = rand_i8(m, k), rand_i8(k, n)
    c = int8_matmul(a.to(device), b.to(device))
    assert c.dtype == torch.int32
    assert torch.equal(c.cpu(), int8_matmul_ref(a, b))


def test_int8_matmul_strided_and_extremes(device):
    from tallow.kernels.int8_matmul import int8_matmul

    a = rand_i8(40, 33).t()  # [33, 40], column-major
    b = rand_i8(50, 40)[::2].t()  # [40, 25], strided both ways
    assert torch.equal(int8_matmul(a.to(device), b.to(device)).cpu(), int8_matmul_ref(a, b))
    a = torch.full((3, 96), -128, dtype=torch.int8)
    b = torch.full((96, 5), -128, dtype=torch.int8)
    assert torch.equal(int8_matmul(a.to(device), b.to(device)).cpu(), int8_matmul_ref(a, b))


def _special_rows(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, k, generator=g) * 3
    x[1] = 0.0                       # all zero: scale 1, zp 0
    x[2] = x[2].abs() + 0.1          # all positive (mn = 0)
    x[3] = -x[3].abs() - 0.1         # all negative (mx = 0)
    x[4, 0] = float("nan")           # NaN row -> scale NaN, q 0
    x[5, -1] = float("inf")
    x[6] = torch.arange(k) * 0.5 - k / 4  # .5 ties after scaling
    x[7] = x[7] * 1e-30
    x[8] = x[8] * 1e30
    return x


# numpy (the interpreter) warns about inf*0 on the inf row; the kernel's
# result is what the assertions check.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("k", [1, 17, 100])
def test_quantize_rows_bit_exact(device, k):
    from tallow.kernels.int8_matmul import quantize_rows

    x = _special_rows(k)
    xq, s, z = quantize_rows(x.to(device))
    qr, sr, zr = quantize_rows_ref(x)
    assert torch.equal((xq.cpu().to(torch.int32) + 128).to(torch.uint8), qr)
    assert torch.equal(s.cpu().isnan(), sr.isnan())
    assert torch.equal(s.cpu().nan_to_num(0.0), sr.nan_to_num(0.0))
    assert torch.equal(z.cpu(), zr)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m,k,n,bias", [(1, 33, 20, True), (7, 17, 65, False), (33, 100, 20, True)])
def test_int8_linear_matches_reference(device, m, k, n, bias, act):
    from tallow.kernels.int8_matmul import int8_linear

    g = torch.Generator().manual_seed(m * k * n)
    x = torch.randn(m, k, generator=g) * 2
    x[0, 0] = float("nan") if m > 1 else x[0, 0]  # a NaN row gives a NaN output row
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    sw = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    colsum = w.to(torch.int32).sum(1, dtype=torch.int32)
    y = int8_linear(x.to(device), w.to(device).t(), colsum.to(device), sw.to(device),
                    None if b is None else b.to(device), act or "none").cpu()
    ref = int8_linear_ref(x, w, sw, b, act)
    assert torch.equal(y.isnan(), ref.isnan())
    fin = torch.isfinite(ref)
    scale = float(ref[fin].abs().max()) if fin.any() else 1.0
    assert_close(y[fin], ref[fin], atol=1e-5 * max(scale, 1e-3), rtol=1e-5, what=f"linear {act}")
