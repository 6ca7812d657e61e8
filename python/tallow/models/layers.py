"""Building blocks shared by the models: a linear layer that runs fp32 or INT8."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.int8_matmul import apply_activation

_ACTIVATIONS = (None, "relu", "gelu_erf", "gelu_tanh")


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

    def quantize(self) -> None:
        """Switches to W8A8 (per-channel weights, dynamic per-row activations)
        and drops the fp32 weight."""
        from ..ops import QuantizedLinear

        self.quantized = QuantizedLinear.from_float(self.weight, self.bias, activation=self.activation)
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x)
        return apply_activation(F.linear(x, self.weight, self.bias), self.activation)

    def extra_repr(self) -> str:
        kind = "int8" if self.quantized is not None else "fp32"
        return f"{self.in_features} -> {self.out_features}, {kind}, activation={self.activation}"


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of a model, counting each quantized Dense as the float
    weights it replaced (N·K + N), so fp32 and INT8 variants report alike."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, Dense) and m.quantized is not None:
            n += m.in_features * m.out_features + m.out_features
    return n


def quantize_model(model: torch.nn.Module, mode: Optional[str]) -> Optional[str]:
    """Turns every Dense of ``model`` into W8A8 when ``mode == "int8"``;
    returns the quantization now in force (None or "int8")."""
    if mode is None:
        return None
    if mode != "int8":
        raise ValueError(f"quantize must be None or 'int8', got {mode!r}")
    for m in model.modules():
        if isinstance(m, Dense):
            m.quantize()
    return "int8"
