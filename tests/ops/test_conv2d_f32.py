"""The native ResNet's fp32 convolution (csrc/vision/conv_kernel.h): the
implicit-GEMM direct convolution (bias, residual and ReLU fused) and
Winograd F(2x2, 3x3) / F(4x4, 3x3), against a float64 oracle on every ISA
tier this CPU runs, over awkward shapes (3 input channels as the stem,
channel counts off the vector width, odd and tiny images, strides 1-3,
partial Winograd tiles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tallow
from tallow.testing import require_native


def _conv(x: torch.Tensor, w: torch.Tensor, b, stride: int, pad: int, res=None, act: int = 0,
          winograd: int = 0) -> torch.Tensor:
    """tallow's convolution on NCHW tensors (it runs on NHWC)."""
    nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    oh = (x.shape[2] + 2 * pad - w.shape[2]) // stride + 1
    ow = (x.shape[3] + 2 * pad - w.shape[3]) // stride + 1
    out = np.empty((x.shape[0], oh, ow, w.shape[0]), np.float32)
    r = None if res is None else res.permute(0, 2, 3, 1).contiguous().numpy()
    tallow.native().conv2d_f32(nhwc, w.contiguous().numpy(), None if b is None else b.numpy(), stride, pad, r, act,
                               out, winograd=winograd)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _oracle(x, w, b, stride, pad, res=None, act=0):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=stride, padding=pad)
    if res is not None:
        y = y + res.double()
    return torch.relu(y) if act else y


def _case(seed: int, b: int, c: int, h: int, w: int, n: int, k: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(n, c, k, k, generator=g) / (c * k * k) ** 0.5
    return x, weight, torch.randn(n, generator=g)


# (batch, cin, height, width, cout, kernel, stride, padding)
DIRECT = [(1, 3, 23, 19, 64, 7, 2, 3),     # the stem: 3 channels, 7x7 / 2
          (2, 5, 9, 7, 17, 3, 1, 1),      # channels off the vector width
          (1, 64, 14, 14, 256, 1, 1, 0),  # 1x1 expanding
          (3, 33, 9, 11, 40, 1, 2, 0),    # the strided shortcut
          (2, 17, 14, 13, 70, 3, 2, 1),   # strided 3x3, odd width
          (1, 512, 3, 3, 130, 1, 1, 0),   # long k, few rows
          (1, 8, 5, 6, 3, 3, 3, 2),       # stride 3, padding 2
          (2, 4, 6, 6, 16, 2, 1, 0),      # even kernel
          (1, 300, 4, 4, 33, 3, 1, 1)]    # k = 2700: several k blocks


@pytest.mark.parametrize("shape", DIRECT, ids=lambda s: "b{}c{}h{}w{}n{}k{}s{}p{}".format(*s))
@pytest.mark.parametrize("with_res", [False, True], ids=["plain", "residual"])
def test_direct_conv_matches_float64(each_isa, shape, with_res):
    require_native()
    b, c, h, w, n, k, s, p = shape
    x, weight, bias = _case(sum(shape), b, c, h, w, n, k)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(b, n, oh, ow) if with_res else None
    act = 1 if with_res else 0
    got = _conv(x, weight, bias, s, p, res, act)
    want = _oracle(x, weight, bias, s, p, res, act)
    torch_err = (_oracle(x, weight, bias, s, p, res, act).float() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    # float32 sums of c * k * k terms of size ~1: a few ulps of the output's scale
    assert err <= 2 * torch_err + 1e-5 * (1 + want.abs().max().item()), err


# (batch, channels in, height, width, channels out)
WINOGRAD = [(1, 8, 8, 8, 16), (2, 5, 7, 9, 17), (1, 64, 14, 14, 64), (3, 3, 5, 3, 7), (1, 4, 1, 1, 4),
            (1, 9, 2, 3, 33), (2, 128, 6, 5, 130)]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", WINOGRAD, ids=lambda s: "b{}c{}h{}w{}n{}".format(*s))
def test_winograd_matches_float64(each_isa, m, shape):
    require_native()
    b, c, h, w, n = shape
    x, weight, bias = _case(m + sum(shape), b, c, h, w, n, 3)
    want = _oracle(x, weight, bias, 1, 1, act=1)
    got = _conv(x, weight, bias, 1, 1, act=1, winograd=m)
    direct = _conv(x, weight, bias, 1, 1, act=1)
    direct_err = (direct.double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    # Winograd's transforms cost accuracy (F(4,3) more: its points +-2 scale
    # terms by up to 8): measured up to ~20x the direct error on these shapes.
    assert err <= 40 * direct_err + (1e-6 if m == 2 else 1e-5) * (1 + want.abs().max().item()), (err, direct_err)


def test_rows_do_not_depend_on_the_batch(each_isa):
    """An image's output is the same alone or inside a batch, bit for bit."""
    require_native()
    x, weight, bias = _case(0, 5, 24, 12, 12, 40, 3)
    for wino in (0, 2, 4):
        full = _conv(x, weight, bias, 1, 1, act=1, winograd=wino)
        for i in (0, 4):
            assert torch.equal(_conv(x[i:i + 1].contiguous(), weight, bias, 1, 1, act=1, winograd=wino)[0], full[i])


def test_conv2d_f32_names_wrong_arguments():
    require_native()
    mod = tallow.native()
    x = np.ones((1, 6, 6, 4), np.float32)
    w = np.ones((8, 4, 3, 3), np.float32)
    out = np.empty((1, 6, 6, 8), np.float32)
    with pytest.raises(ValueError, match="weight.shape\\[1\\] must be 4"):
        mod.conv2d_f32(x, np.ones((8, 5, 3, 3), np.float32), None, 1, 1, None, 0, out)
    with pytest.raises(TypeError, match="x must be float32"):
        mod.conv2d_f32(x.astype(np.float64), w, None, 1, 1, None, 0, out)
    with pytest.raises(ValueError, match="out.shape\\[1\\] must be 3"):
        mod.conv2d_f32(x, w, None, 2, 1, None, 0, out)
    with pytest.raises(ValueError, match="winograd needs a 3x3 kernel, stride 1"):
        mod.conv2d_f32(x, w, None, 2, 1, None, 0, np.empty((1, 3, 3, 8), np.float32), winograd=2)
    with pytest.raises(ValueError, match="winograd must be 0"):
        mod.conv2d_f32(x, w, None, 1, 1, None, 0, out, winograd=3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        mod.conv2d_f32(x, w, None, 0, 1, None, 0, out)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        mod.conv2d_f32(np.ones((1, 1, 1, 4), np.float32), w, None, 1, 0, None, 0, out)
    with pytest.raises(ValueError, match="act must be 0"):
        mod.conv2d_f32(x, w, None, 1, 1, None, 2, out)
    with pytest.raises(ValueError, match="residual.shape\\[3\\] must be 8"):
        mod.conv2d_f32(x, w, None, 1, 1, np.ones((1, 6, 6, 7), np.float32), 0, out)
