"""INT8 convolution (QuantizedConv2d): the native kernel against its torch
reference on every ISA, awkward shapes, error vs float32, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tallow
from tallow.ops import QuantizedConv2d, int8_conv2d_ref, quantize_rows_ref
from tallow.testing import assert_close

needs_native = pytest.mark.native  # fails, not skips, without tallow._C (conftest.py)

# (B, Cin, H, W, Cout, kernel, stride, padding): kernel sizes 1/3/7, strides 1/2,
# channel counts off the vector width, images barely larger than the kernel.
SHAPES = [
    (2, 8, 9, 7, 20, 3, 1, 1),
    (1, 3, 17, 15, 33, 7, 2, 3),
    (3, 16, 8, 8, 24, 1, 2, 0),
    (1, 5, 6, 6, 17, 3, 2, 1),
    (2, 17, 3, 3, 5, 3, 1, 0),
    (1, 64, 14, 14, 64, 3, 1, 1),
    (4, 1, 5, 9, 1, 3, 1, 2),
]


def close_to_ref(y, ref, what=""):
    """Integer part exact; the epilogue is a few float32 roundings."""
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    assert_close(y, ref, atol=1e-5 * max(scale, 1e-3), rtol=1e-5, what=what)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}c{}h{}w{}o{}k{}s{}p{}".format(*s))
@pytest.mark.parametrize("act", [None, "relu"])
def test_kernel_matches_reference(each_isa, shape, act):
    b, c, h, w, cout, k, s, p = shape
    torch.manual_seed(hash(shape) % 1000)
    conv = QuantizedConv2d.from_float(torch.randn(cout, c, k, k), torch.randn(cout), stride=s, padding=p,
                                      activation=act)
    x = torch.randn(b, c, h, w) * 3 + 1  # off-centre, so the zero point is not trivial
    y = conv(x)
    ref = int8_conv2d_ref(x, conv.int8_weight(), conv.weight_scale, conv.bias, s, p, act)
    assert y.shape == ref.shape == (b, cout, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    close_to_ref(y, ref, what=f"{each_isa} {shape} {act}")


@needs_native
def test_strided_and_nchw_inputs_give_the_same_answer():
    conv = QuantizedConv2d.from_float(torch.randn(12, 6, 3, 3), None, stride=1, padding=1)
    x = torch.randn(2, 6, 10, 11)
    y = conv(x)
    assert torch.equal(conv(x.contiguous(memory_format=torch.channels_last)), y)
    big = torch.randn(2, 6, 20, 11)
    assert torch.equal(conv(big[:, :, ::2]), conv(big[:, :, ::2].contiguous()))


def test_reference_quantizes_each_image_once():
    """The reference's per-image scale is quantize_rows_ref on the flattened
    NHWC image, and an image of zeros gives exactly the bias."""
    conv = QuantizedConv2d.from_float(torch.randn(4, 3, 3, 3), torch.arange(4.0), padding=1)
    x = torch.zeros(2, 3, 5, 5)
    x[1] = torch.randn(3, 5, 5)
    y = int8_conv2d_ref(x, conv.int8_weight(), conv.weight_scale, conv.bias, 1, 1, None)
    assert torch.equal(y[0], torch.arange(4.0)[:, None, None].expand(4, 5, 5))
    _, scale, _ = quantize_rows_ref(x[1].permute(1, 2, 0).reshape(1, -1))
    assert float(scale) == pytest.approx(float((x[1].max().clamp_min(0) - x[1].min().clamp_max(0)) / 255))


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_error_vs_float32(k, s, p):
    """Per-image u8 activations and per-channel int8 weights on Gaussian data:
    the same ~1 % relative noise as QuantizedLinear (bound 1.5 %)."""
    torch.manual_seed(1)
    w = torch.randn(64, 32, k, k) / (32 * k * k) ** 0.5
    b = torch.randn(64) * 0.1
    x = torch.randn(2, 32, 16, 16)
    y = QuantizedConv2d.from_float(w, b, stride=s, padding=p)(x)
    ref = F.conv2d(x, w, b, stride=s, padding=p)
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.015, f"relative error {rel:.3%}"


def test_forced_ref_backend(force_backend):
    force_backend("ref")
    conv = QuantizedConv2d.from_float(torch.randn(5, 4, 3, 3), torch.randn(5), stride=2, padding=1, activation="relu")
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(conv(x), int8_conv2d_ref(x, conv.int8_weight(), conv.weight_scale, conv.bias, 2, 1, "relu"))


def test_bad_input_is_named():
    conv = QuantizedConv2d.from_float(torch.randn(5, 4, 3, 3), None)
    with pytest.raises(ValueError, match=r"x must be \[B, 4, H, W\]"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="float32"):
        conv(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv(torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        QuantizedConv2d.from_float(torch.randn(5, 4, 3, 3), None, stride=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        QuantizedConv2d.from_float(torch.full((5, 4, 3, 3), float("nan")), None)
    assert conv(torch.randn(0, 4, 8, 8)).shape == (0, 5, 8 - 2, 8 - 2)


def _native_conv(conv: QuantizedConv2d, x: torch.Tensor, a_bits: int) -> torch.Tensor:
    """tallow._C.int8_conv2d on NHWC x with the module's buffers -> NCHW."""
    import numpy as np

    b, _, h, w = x.shape
    (kh, kw), s, p = conv.kernel_size, conv.stride, conv.padding
    out = np.empty((b, (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1, conv.out_channels), np.float32)
    tallow.native().int8_conv2d(x.permute(0, 2, 3, 1).contiguous().numpy(), conv.packed_weight.numpy(),
                                conv.weight_colsum.numpy(), conv.weight_scale.numpy(),
                                None if conv.bias is None else conv.bias.numpy(), kh, kw, s, p,
                                1 if conv.activation == "relu" else 0, out, a_bits=a_bits)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}c{}h{}w{}o{}k{}s{}p{}".format(*s))
def test_seven_bit_activations_match_their_reference(each_isa, shape):
    """a_bits=7 (what the native ResNet asks for where it is faster: AVX2's
    vpmaddubsw GEMM) quantizes each image to [0, 127]; the integer part stays
    exact on every ISA."""
    b, c, h, w, cout, k, s, p = shape
    torch.manual_seed(hash(shape) % 997)
    conv = QuantizedConv2d.from_float(torch.randn(cout, c, k, k), torch.randn(cout), stride=s, padding=p,
                                      activation="relu")
    x = torch.randn(b, c, h, w) * 3 + 1
    ref = int8_conv2d_ref(x, conv.int8_weight(), conv.weight_scale, conv.bias, s, p, "relu", levels=127)
    close_to_ref(_native_conv(conv, x, 7), ref, what=f"{each_isa} {shape}")
    _, _, zp = quantize_rows_ref(x.permute(0, 2, 3, 1).reshape(b, -1), levels=127)
    assert int(zp.max()) <= 127


@needs_native
def test_seven_bit_activations_are_checked_and_cost_little_accuracy():
    conv = QuantizedConv2d.from_float(torch.randn(8, 4, 3, 3) / 6, None, padding=1)
    with pytest.raises(ValueError, match="a_bits must be 7 or 8, got 6"):
        _native_conv(conv, torch.randn(1, 4, 6, 6), 6)
    torch.manual_seed(1)
    w = torch.randn(64, 32, 3, 3) / (32 * 9) ** 0.5
    x = torch.relu(torch.randn(2, 32, 16, 16))  # post-ReLU activations, as in ResNet
    conv = QuantizedConv2d.from_float(w, None, padding=1)
    ref = F.conv2d(x, w, padding=1)
    rel7 = float((_native_conv(conv, x, 7) - ref).norm() / ref.norm())
    rel8 = float((_native_conv(conv, x, 8) - ref).norm() / ref.norm())
    assert rel8 < rel7 < 0.02, (rel7, rel8)
