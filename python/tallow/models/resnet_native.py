"""A ResNet's feature forward as one native call (``tallow._C.ResNet``).

The per-op path (``ResNet50.features``: torch's channels-last convolutions
with the batch norms folded, tallow's fp32 GEMM for the 1×1 ones, torch glue
for the residual adds, the pooling and the layout) stays the reference this
path is tested against. Here the whole pass — the 7×7 stem, max pool, every
bottleneck block and the global average pool — runs in C++ on tallow's
thread pool (csrc/vision/): each convolution an implicit GEMM over
channels-last activations (no im2col buffer), bias, residual add and ReLU
fused in its epilogue, the 1×1 convolutions' output written straight into
the next 3×3 convolution's zero-padded input. No torch op runs in between, so
torch's OpenMP team stays parked.

Weights: the batch-norm-folded fp32 weights are packed once into the native
GEMM's 16-column panels (Winograd layers: their transformed weights instead);
a ResNet50 built on this path keeps no torch convolutions.

INT8 (``int8=True``): the blocks' convolutions are quantized exactly as the
per-op INT8 model quantizes them (``tallow.ops.QuantizedConv2d``'s weights,
symmetric per output channel) and run on the same int8mm kernels — 1×1
stride-1 ones as ``QuantizedLinear`` (one activation scale per pixel), the
3×3 and strided ones, the 7×7 stem included, as ``QuantizedConv2d`` (one
per image) — with the residual add + ReLU in the last GEMM's epilogue and
the pooling in C++ between them: the per-op INT8 model's maths without its
Python and torch glue. Where the CPU multiplies 7-bit activations faster
(AVX2: ``vpmaddubsw``, exact for u8 ≤ 127) the native path quantizes them to
[0, 127] instead of [0, 255] (int8mm's ``a_bits=7``; ResNet-50's features
stay at cosine ≥ 0.9998 to fp32).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .._native import native, native_available


def native_resnet_wanted() -> bool:
    """Whether a fp32 ResNet built now runs its features natively: the
    native module loads and neither ``TALLOW_RESNET=ops`` nor a
    ``TALLOW_BACKEND`` other than the native one asks for the per-op path.
    Decided once, when the model is built (DESIGN.md convention 16)."""
    if os.environ.get("TALLOW_RESNET", "").strip().lower() == "ops":
        return False
    if os.environ.get("TALLOW_BACKEND", "").strip().lower() in ("ref", "triton", "cuda"):
        return False
    return native_available()


def winograd_wanted() -> bool:
    """Whether the 3×3 stride-1 convolutions run by Winograd (the default);
    ``TALLOW_WINOGRAD=0`` keeps them direct (less weight memory, results
    closer to the direct convolution's rounding). Read when a model is built."""
    return os.environ.get("TALLOW_WINOGRAD", "1").strip().lower() not in ("0", "off", "false", "no")


def winograd_tile(stride: int, channels: int) -> int:
    """Output tile m of Winograd F(m×m, 3×3) for a 3×3 convolution (0: direct).

    Measured on ResNet-50 (AMD EPYC Zen 3, 2 threads, batch 1 and 8, ms per
    convolution, direct / F(2,3) / F(4,3)): 64 and 128 channels gain most from
    F(4,3) (4× fewer multiplies; its 36 weight matrices are small there); at
    256 and 512 channels F(2,3) wins at batch 1 (layer3 1.81 / 1.04 / 1.30,
    layer4 2.5 / 1.8 / 2.9: F(4,3)'s weights, 4× the direct ones, no longer
    stay in cache and stream from memory for 16-49 tiles) and loses little at
    batch 8, for 1.78× the direct weights instead of 4×. Strided ones stay direct."""
    if stride != 1:
        return 0
    return 4 if channels <= 128 else 2


def _conv(weight: torch.Tensor, bias: torch.Tensor) -> dict:
    return {"weight": weight.detach().float().contiguous().numpy(),
            "bias": bias.detach().float().contiguous().numpy()}


def _int8_conv(weight: torch.Tensor, bias: torch.Tensor, stride: int) -> dict:
    """The INT8 buffers of ``QuantizedConv2d.from_float`` (for a 1×1 weight
    the same bytes as ``QuantizedLinear.from_float`` of ``weight[:, :, 0, 0]``)."""
    from ..ops import QuantizedConv2d

    q = QuantizedConv2d.from_float(weight, bias, stride=stride, padding=int(weight.shape[-1]) // 2)
    return {"shape": tuple(int(d) for d in weight.shape), "packed": q.packed_weight.numpy(),
            "colsum": q.weight_colsum.numpy(), "scale": q.weight_scale.numpy(), "bias": q.bias.numpy()}


class NativeResNet:
    """The native twin of a ``ResNet50``: built from the same folded
    convolutions (``folded``: name -> (weight [Cout, Cin, KH, KW], bias)),
    in torchvision's names: conv1, layer{s}.{i}.conv{1-3}, .downsample."""

    def __init__(self, cfg, folded: dict[str, tuple[torch.Tensor, torch.Tensor]], *, winograd: bool = True,
                 int8: bool = False):
        self.net = native().ResNet()
        self.net.set_stem(_int8_conv(*folded["conv1"], 2) if int8 else _conv(*folded["conv1"]), 2)
        cin = cfg.embedding_size
        for stage, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            for i in range(depth):
                p = f"layer{stage + 1}.{i}."
                stride = 2 if (i == 0 and stage > 0) else 1
                down = folded.get(p + "downsample")
                if int8:
                    self.net.add_block(_int8_conv(*folded[p + "conv1"], 1), _int8_conv(*folded[p + "conv2"], stride),
                                       _int8_conv(*folded[p + "conv3"], 1),
                                       None if down is None else _int8_conv(*down, stride), stride, 0)
                else:
                    mid = int(folded[p + "conv2"][0].shape[0])
                    self.net.add_block(_conv(*folded[p + "conv1"]), _conv(*folded[p + "conv2"]),
                                       _conv(*folded[p + "conv3"]), None if down is None else _conv(*down), stride,
                                       winograd_tile(stride, mid) if winograd else 0)
                cin = width
        self.feature_size = int(self.net.feature_size)
        assert self.feature_size == cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] float32 (checked by the caller) -> [B, features]."""
        x = x.contiguous()
        out = np.empty((x.shape[0], self.feature_size), np.float32)
        self.net.features(x.numpy(), out)
        return torch.from_numpy(out)

    @property
    def owned_bytes(self) -> int:
        return int(self.net.owned_bytes)
