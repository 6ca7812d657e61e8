"""The native encoder's fp32 GEMM (csrc/encoder/encoder_kernel.h: packed
16-column panels, bias and activation fused) against a float64 oracle, on
every ISA tier this CPU runs, over awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tallow
from tallow.testing import require_native

_ACTS = {0: lambda y: y, 1: torch.relu, 2: F.gelu, 3: lambda y: F.gelu(y, approximate="tanh")}


def _linear_f32(x: torch.Tensor, w: torch.Tensor, b, act: int) -> torch.Tensor:
    mod = tallow.native()
    packed = mod.pack_f32(w.numpy())
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    mod.linear_f32(x.numpy(), packed, None if b is None else b.numpy(), w.shape[0], act, out)
    return torch.from_numpy(out)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 17, 3), (7, 33, 5), (9, 16, 129), (97, 129, 1025),
                                   (18, 1152, 384), (5, 384, 1536), (130, 48, 64)])
@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_linear_f32_error_within_twice_torch(each_isa, m, n, k, act):
    require_native()
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    oracle = _ACTS[act](x.double() @ w.double().t() + b.double())
    got = _linear_f32(x, w, b, act)
    torch_err = (_ACTS[act](F.linear(x, w, b)).double() - oracle).abs().max().item()
    err = (got.double() - oracle).abs().max().item()
    # GELU's erf approximation (1.5e-7 relative) sets a floor on tiny shapes
    assert err <= 2 * torch_err + 2e-6 * (1 + oracle.abs().max().item()), (err, torch_err)


def test_linear_f32_without_bias_and_rows_independent_of_batch(each_isa):
    require_native()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(23, 300, generator=g), torch.randn(70, 300, generator=g)
    full = _linear_f32(x, w, None, 0)
    torch.testing.assert_close(full, x @ w.t(), rtol=1e-5, atol=1e-4)
    # a row's result is the same alone or inside a batch, bit for bit
    for i in (0, 5, 22):
        assert torch.equal(_linear_f32(x[i:i + 1].contiguous(), w, None, 0)[0], full[i])


def test_linear_f32_names_wrong_arguments():
    require_native()
    mod = tallow.native()
    packed = mod.pack_f32(np.ones((4, 8), np.float32))
    out = np.empty((2, 4), np.float32)
    with pytest.raises(ValueError, match="packed.shape\\[1\\] must be 5"):
        mod.linear_f32(np.ones((2, 5), np.float32), packed, None, 4, 0, out)
    with pytest.raises(TypeError, match="x must be float32"):
        mod.linear_f32(np.ones((2, 8), np.float64), packed, None, 4, 0, out)
    with pytest.raises(ValueError, match="act must be"):
        mod.linear_f32(np.ones((2, 8), np.float32), packed, None, 4, 7, out)
