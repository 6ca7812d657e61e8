"""INT8 2-D convolution on the INT8 GEMM (channels-last, im2col).

``QuantizedConv2d.from_float(weight [Cout, Cin, KH, KW], bias, stride=, padding=,
activation=)`` quantizes the weights once, symmetric per output channel
(like ``QuantizedLinear``), over ``K = KH · KW · Cin`` in ``(kh, kw, cin)``
order, and packs them in the GEMM's layout. ``forward(x [B, Cin, H, W])``:

1. quantizes each **image** (all of its H·W·Cin values) to u8 with one scale
   and zero point — the quantizer of ``int8_matmul.quantize_rows_ref`` applied
   to the flattened image. Per-row scales, as ``QuantizedLinear`` uses, cannot
   serve here: the KH·KW taps of one GEMM row come from different pixels,
   and quantizing the input once (then gathering bytes) is what keeps the
   im2col cheap;
2. gathers, for every output pixel, its KH·KW·Cin quantized inputs (im2col,
   channels-last so each tap is one contiguous run of Cin values; taps in
   the zero padding hold the image's zero point, i.e. the value 0.0);
3. multiplies on tallow's INT8 GEMM, exact in int32, with dequantization,
   bias and the activation fused in its epilogue:
   ``y = act(float(acc - zp · colsum[n]) · (scale_img · scale_w[n]) + bias[n])``.

The output is [B, Cout, Ho, Wo] in channels-last memory (the layout the next
layer reads without a copy). ResNet-50 (``models/resnet.py``) runs its 3×3,
7×7 and strided convolutions on it with ``quantize="int8"``.

Backends: ``cpu`` (tallow._C ``int8_conv2d``) and ``ref`` (the same maths in
torch, integer part exact).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import dispatch
from .._native import native
from .int8_matmul import (_ACT_CODE, _check_activation, _wrap_int32, apply_activation, fill_quantized_weights,
                          quantize_rows_ref)

_ORDER = {"cpu": ("cpu", "ref"), "cuda": ("ref",)}


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def int8_conv2d_ref(x: torch.Tensor, wq: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    stride: int, padding: int, activation: Optional[str], levels: int = 255) -> torch.Tensor:
    """The INT8 convolution's maths in torch. ``x [B, C, H, W]`` float32,
    ``wq`` int8 ``[Cout, KH, KW, C]``; returns [B, Cout, Ho, Wo] float32.
    ``levels=127``: 7-bit activations (the native kernel's ``a_bits=7``)."""
    b, c, h, w = x.shape
    cout, kh, kw, _ = wq.shape
    nhwc = x.permute(0, 2, 3, 1).to(torch.float32)
    q, sx, zp = quantize_rows_ref(nhwc.reshape(b, h * w * c), levels)
    q = q.to(torch.int64).reshape(b, h, w, c)
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = zp.to(torch.int64)[:, None, None, None].expand(b, hp, wp, c).clone()
    padded[:, padding:padding + h, padding:padding + w] = q
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    taps = [padded[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
            for i in range(kh) for j in range(kw)]
    cols = torch.cat(taps, dim=-1).reshape(b * ho * wo, kh * kw * c)  # (kh, kw, c) order
    wmat = wq.reshape(cout, kh * kw * c).to(torch.int64)
    acc = torch.matmul(cols.to(torch.float64), wmat.t().to(torch.float64)).to(torch.int64)
    rows_zp = zp.to(torch.int64).repeat_interleave(ho * wo)
    acc = _wrap_int32(acc - rows_zp[:, None] * wmat.sum(dim=1)[None, :])
    rows_sx = sx.repeat_interleave(ho * wo)
    y = acc.to(torch.float32) * (rows_sx[:, None] * weight_scale.to(torch.float32)[None, :])
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    y = apply_activation(y, activation)
    return y.reshape(b, ho, wo, cout).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class QuantizedConv2d(torch.nn.Module):
    """INT8 ``act(conv2d(x, W, b, stride, padding))`` (see the module docstring).

    Buffers: ``packed_weight`` int8 ``[ceil(Cout/16), ceil(K/4), 16, 4]`` (K =
    KH·KW·Cin in (kh, kw, cin) order), ``weight_scale`` float32 ``[Cout]``,
    ``weight_colsum`` int32 ``[Cout]``, ``bias`` float32 ``[Cout]`` or None."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *, stride: int = 1,
                 padding: int = 0, bias: bool = True, activation: Optional[str] = None):
        super().__init__()
        kh, kw = kernel_size
        for name, v, lo in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1), ("kernel height", kh, 1),
                            ("kernel width", kw, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"QuantizedConv2d: {name} must be an int >= {lo}, got {v!r}")
        self._activation = _check_activation(activation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        k = kh * kw * in_channels
        self.register_buffer("packed_weight", torch.zeros((out_channels + 15) // 16, (k + 3) // 4, 16, 4,
                                                          dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32))
        self.register_buffer("weight_colsum", torch.zeros(out_channels, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32) if bias else None)
        self._np_key = None
        self._np_arrays = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
                   padding: int = 0, activation: Optional[str] = None) -> "QuantizedConv2d":
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or not weight.is_floating_point():
            raise ValueError("QuantizedConv2d.from_float: weight must be a floating-point tensor [Cout, Cin, KH, KW], "
                             f"got {getattr(weight, 'shape', type(weight).__name__)}")
        cout, cin, kh, kw = weight.shape
        w = weight.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).reshape(cout, kh * kw * cin)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("QuantizedConv2d.from_float: weight contains NaN or inf")
        if bias is not None and tuple(bias.shape) != (cout,):
            raise ValueError(f"QuantizedConv2d.from_float: bias must have shape ({cout},), got {tuple(bias.shape)}")
        mod = cls(cin, cout, (kh, kw), stride=stride, padding=padding, bias=bias is not None, activation=activation)
        fill_quantized_weights(mod, w, bias)
        return mod

    @property
    def activation(self) -> Optional[str]:
        return None if self._activation == "none" else self._activation

    def int8_weight(self) -> torch.Tensor:
        """The quantized weight as int8 ``[Cout, KH, KW, Cin]``."""
        kh, kw = self.kernel_size
        k = kh * kw * self.in_channels
        flat = self.packed_weight.permute(0, 2, 1, 3).reshape(-1, self.packed_weight.shape[1] * 4)
        return flat[: self.out_channels, :k].reshape(self.out_channels, kh, kw, self.in_channels)

    def _cpu(self, x: torch.Tensor) -> torch.Tensor:
        bufs = self._buffers
        key = tuple((id(t), t.data_ptr()) for t in bufs.values() if t is not None)
        if self._np_key != key:
            self._np_arrays = (bufs["packed_weight"].numpy(), bufs["weight_colsum"].numpy(),
                               bufs["weight_scale"].numpy(), None if bufs["bias"] is None else bufs["bias"].numpy())
            self._np_key = key
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho, wo = _out_size(h, kh, self.stride, self.padding), _out_size(w, kw, self.stride, self.padding)
        nhwc = x.detach().contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # a view
        out = torch.empty(b, ho, wo, self.out_channels, dtype=torch.float32)
        native().int8_conv2d(nhwc.numpy(), *self._np_arrays, kh, kw, self.stride, self.padding,
                             _ACT_CODE[self._activation], out.numpy())
        return out.permute(0, 3, 1, 2)  # [B, Cout, Ho, Wo], channels-last memory

    def _ref(self, x: torch.Tensor) -> torch.Tensor:
        return int8_conv2d_ref(x, self.int8_weight(), self.weight_scale, self.bias, self.stride, self.padding,
                               self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"QuantizedConv2d: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"QuantizedConv2d: x must be float32, got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QuantizedConv2d: x must be [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        kh, kw = self.kernel_size
        if x.shape[2] + 2 * self.padding < kh or x.shape[3] + 2 * self.padding < kw:
            raise ValueError(f"QuantizedConv2d: input {tuple(x.shape[2:])} with padding {self.padding} is smaller "
                             f"than the kernel {self.kernel_size}")
        if x.shape[0] == 0:
            ho = _out_size(x.shape[2], kh, self.stride, self.padding)
            wo = _out_size(x.shape[3], kw, self.stride, self.padding)
            return x.new_empty(0, self.out_channels, ho, wo)
        return dispatch("int8_conv2d", x.device.type, _ORDER, {"cpu": self._cpu, "ref": self._ref}, x)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}, weight=int8 per-channel, "
                f"input=u8 per image")
