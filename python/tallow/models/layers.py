"""Building blocks shared by the models: a linear layer and a 2-D convolution
that run fp32 or INT8."""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.int8_matmul import apply_activation

_ACTIVATIONS = (None, "relu", "gelu_erf", "gelu_tanh")

# Batch invariance of the fp32 path. torch's CPU sgemm (MKL) computes a row
# of x @ W^T with one of three reduction orders, chosen by where the row sits
# in the M dimension: M == 1 (a GEMV), a row inside a full 4-row tile, or a
# row in the partial tile at the end (M % 4 rows). The results differ in the
# last bits (measured on AMD EPYC Zen 3, MKL AVX2: up to ~2e-6 absolute on
# GPT-2's linears), so a generated row's logits depended on how many other
# rows shared its batch. Padding M > 1 up to a multiple of the tile puts
# every row in a full tile: then a row's output is the same for every M >= 2
# and every position in the batch (checked bit for bit for M = 2..70 on
# GPT-2-124M's shapes). M == 1 keeps the GEMV: it is ~3x faster than a
# 4-row GEMM here (the batch-1 decode step) and differs from the tiled
# result by ~1e-6. The INT8 path needs none of this: per-row activation
# scales and exact int32 accumulation make it batch-invariant as it is.
_GEMM_ROW_TILE = 4
_tiled = threading.local()


@contextlib.contextmanager
def tiled_gemm():
    """Within it (this thread only), a one-row fp32 Dense call also takes the
    padded 4-row GEMM instead of the GEMV, so a row's result is the same
    whatever the batch size, 1 included (a batch-1 decode step then costs
    ~3x in its linears on the AMD EPYC: opt-in, see GenerationScheduler's
    ``batch_invariant``)."""
    before = getattr(_tiled, "on", False)
    _tiled.on = True
    try:
        yield
    finally:
        _tiled.on = before


class Dense(torch.nn.Module):
    """y = activation(x @ W^T + b), in fp32 (torch GEMM) or INT8 (tallow's
    VNNI kernel with the bias and activation fused into its epilogue)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str] = None):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {_ACTIVATIONS}")
        self.weight = torch.nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().contiguous(),
                                                                 requires_grad=False)
        self.activation = activation
        self.quantized = None  # a tallow.ops.QuantizedLinear once quantize() ran

    @property
    def in_features(self) -> int:
        return self.quantized.in_features if self.quantized is not None else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.quantized.out_features if self.quantized is not None else self.weight.shape[0]

    def quantize(self, blocks: bool = False) -> None:
        """Switches to W8A8 — weights per output channel, activations per row
        at run time; with ``blocks`` both per block of 32 input features
        (tallow.ops.int8_block, for LLM decoders) — and drops the fp32 weight."""
        from ..ops import QuantizedLinear
        from ..ops.int8_block import BlockQuantizedLinear

        kind = BlockQuantizedLinear if blocks else QuantizedLinear
        self.quantized = kind.from_float(self.weight, self.bias, activation=self.activation)
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x)
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        pad = -m % _GEMM_ROW_TILE
        if pad and (m > 1 or (m == 1 and getattr(_tiled, "on", False))):
            rows = torch.cat([x.reshape(m, k), x.new_zeros(pad, k)])
            y = F.linear(rows, self.weight, self.bias)[:m].reshape(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight, self.bias)
        return apply_activation(y, self.activation)

    def extra_repr(self) -> str:
        kind = "int8" if self.quantized is not None else "fp32"
        return f"{self.in_features} -> {self.out_features}, {kind}, activation={self.activation}"


class Conv(torch.nn.Module):
    """y = activation(conv2d(x, W, b, stride, padding)) on channels-last
    input, in fp32 (torch) or INT8 (``tallow.ops.QuantizedConv2d``: per-image
    activations, im2col, the INT8 GEMM with bias and activation fused)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], *, stride: int, padding: int,
                 activation: Optional[str] = None):
        super().__init__()
        if activation not in (None, "relu"):
            raise ValueError(f"Conv supports activation None or 'relu', got {activation!r}")
        self.weight = torch.nn.Parameter(weight.detach().float().contiguous(memory_format=torch.channels_last),
                                         requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().contiguous(),
                                                                 requires_grad=False)
        self.stride, self.padding, self.activation = stride, padding, activation
        self.shape = tuple(weight.shape)  # [Cout, Cin, KH, KW], kept after quantize() drops the weight
        self.quantized = None  # a tallow.ops.QuantizedConv2d once quantize() ran

    def quantize(self) -> None:
        from ..ops import QuantizedConv2d

        self.quantized = QuantizedConv2d.from_float(self.weight, self.bias, stride=self.stride,
                                                    padding=self.padding, activation=self.activation)
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x)
        y = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return torch.relu_(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        kind = "int8" if self.quantized is not None else "fp32"
        return (f"{self.shape[1]} -> {self.shape[0]}, kernel={tuple(self.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, {kind}, activation={self.activation}")


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of a model, counting each quantized Dense / Conv as the
    float weights it replaced, so fp32 and INT8 variants report alike."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Dense) and m.quantized is not None:
            n += m.in_features * m.out_features + m.out_features
        elif isinstance(m, Conv) and m.quantized is not None:
            cout, cin, kh, kw = m.shape
            n += cout * cin * kh * kw + (cout if m.quantized.bias is not None else 0)
    return n


def quantize_model(model: torch.nn.Module, mode: Optional[str], blocks: bool = False) -> Optional[str]:
    """Turns every Dense and Conv of ``model`` into W8A8 when ``mode == "int8"``
    (Dense layers per block of 32 with ``blocks``, see Dense.quantize);
    returns the quantization now in force (None or "int8")."""
    if mode is None:
        return None
    if mode != "int8":
        raise ValueError(f"quantize must be None or 'int8', got {mode!r}")
    for m in model.modules():
        if isinstance(m, Dense):
            m.quantize(blocks)
        elif isinstance(m, Conv):
            m.quantize()
    return "int8"
