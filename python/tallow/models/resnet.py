"""ResNet-50 (He et al. 2016, bottleneck v1.5: stride on the 3×3 conv) for
image features and ImageNet logits.

Batch norms are folded into the convolutions at load time. A model's
features are one native call (resnet_native.py, csrc/vision/), fp32 or INT8.
On the per-op path (``TALLOW_RESNET=ops``, or no native module) convolutions
run through torch in channels-last fp32; with ``quantize="int8"`` every
convolution and the final FC run on tallow's INT8 GEMM (the native INT8
path runs the same kernels on the same weights), bias and ReLU fused
in its epilogue: 1×1 stride-1 convolutions as a GEMM over channels-last
pixels with per-pixel activation scales (``QuantizedLinear``), the 3×3 and
the strided convolutions — the 7×7 stem included — through
``QuantizedConv2d`` (per-image activation scales, im2col: one copy per
kernel row, so the stem's 3-channel taps gather fast). Input: ``tallow.ops.preprocess`` output, [B, 3, 224, 224] normalised float32.

Checkpoints: a Hugging Face ``ResNetModel`` / ``ResNetForImageClassification``
directory, or a torchvision-style state dict (``.pth``). Both are mapped onto
torchvision's names (conv1, bn1, layer{1-4}.{i}.conv{1-3}, downsample, fc),
which this module uses internally.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ._checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict
from .layers import Conv, Dense, count_parameters, quantize_model
from .resnet_native import NativeResNet, native_resnet_wanted, winograd_wanted

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


@dataclass
class ResNetConfig:
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    num_labels: int = 1000
    id2label: Optional[dict[int, str]] = None
    eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetConfig":
        if d.get("model_type") != "resnet":
            raise CheckpointError(f"config.json model_type is {d.get('model_type')!r}, expected 'resnet'")
        if d.get("layer_type", "bottleneck") != "bottleneck":
            raise CheckpointError(f"only bottleneck ResNets are supported, got layer_type {d.get('layer_type')!r}")
        if d.get("downsample_in_bottleneck") or d.get("downsample_in_first_stage"):
            raise CheckpointError("only the v1.5 layout (stride on the 3x3 conv, no first-stage downsample) "
                                  "is supported")
        if d.get("hidden_act", "relu") != "relu":
            raise CheckpointError(f"only relu is supported, got hidden_act {d.get('hidden_act')!r}")
        id2label = {int(k): str(v) for k, v in (d.get("id2label") or {}).items()} or None
        return cls(embedding_size=int(d.get("embedding_size", 64)),
                   hidden_sizes=tuple(int(x) for x in d.get("hidden_sizes", (256, 512, 1024, 2048))),
                   depths=tuple(int(x) for x in d.get("depths", (3, 4, 6, 3))),
                   num_labels=len(id2label) if id2label else int(d.get("num_labels", 1000)),
                   id2label=id2label)

    def expected_shapes(self, *, classifier: bool) -> dict[str, tuple[int, ...]]:
        """torchvision names and shapes of this architecture."""
        shapes: dict[str, tuple[int, ...]] = {}

        def conv_bn(conv: str, bn: str, cout: int, cin: int, k: int) -> None:
            shapes[f"{conv}.weight"] = (cout, cin, k, k)
            for s in _BN_SUFFIXES:
                shapes[f"{bn}.{s}"] = (cout,)

        conv_bn("conv1", "bn1", self.embedding_size, 3, 7)
        cin = self.embedding_size
        for stage, (width, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
            mid = width // 4
            for i in range(depth):
                p = f"layer{stage + 1}.{i}."
                conv_bn(p + "conv1", p + "bn1", mid, cin, 1)
                conv_bn(p + "conv2", p + "bn2", mid, mid, 3)
                conv_bn(p + "conv3", p + "bn3", width, mid, 1)
                stride = 2 if (i == 0 and stage > 0) else 1
                if i == 0 and (cin != width or stride != 1):
                    conv_bn(p + "downsample.0", p + "downsample.1", width, cin, 1)
                cin = width
        if classifier:
            shapes["fc.weight"] = (self.num_labels, self.hidden_sizes[-1])
            shapes["fc.bias"] = (self.num_labels,)
        return shapes


def hf_to_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames Hugging Face ResNet keys to torchvision's."""
    out = {}
    for key, value in sd.items():
        k = key[len("resnet."):] if key.startswith("resnet.") else key
        k = k.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", k)
        if m:
            stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            rest = re.sub(r"^layer\.(\d)\.convolution", lambda x: f"conv{int(x.group(1)) + 1}", rest)
            rest = re.sub(r"^layer\.(\d)\.normalization", lambda x: f"bn{int(x.group(1)) + 1}", rest)
            rest = rest.replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization",
                                                                                "downsample.1")
            k = f"layer{stage + 1}.{block}.{rest}"
        k = k.replace("classifier.1.", "fc.")
        out[k] = value
    return out


def infer_torchvision_config(sd: dict[str, torch.Tensor]) -> ResNetConfig:
    """Depths and widths of a torchvision-named bottleneck ResNet state dict."""
    if "conv1.weight" not in sd:
        raise CheckpointError("not a torchvision ResNet state dict: conv1.weight is missing")
    depths, widths = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError(f"not a bottleneck ResNet state dict: no layer{stage}.* tensors")
        depths.append(max(blocks) + 1)
        w = sd.get(f"layer{stage}.0.conv3.weight")
        if w is None:
            raise CheckpointError(f"layer{stage}.0.conv3.weight is missing (only bottleneck ResNets are supported)")
        widths.append(int(w.shape[0]))
    fc = sd.get("fc.weight")
    return ResNetConfig(embedding_size=int(sd["conv1.weight"].shape[0]), hidden_sizes=tuple(widths),
                        depths=tuple(depths), num_labels=int(fc.shape[0]) if fc is not None else 1000)


def fold_batch_norm(sd, conv: str, bn: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution `conv` with batch norm `bn` folded in: (weight, bias)."""
    w = sd[f"{conv}.weight"].float()
    scale = sd[f"{bn}.weight"].float() / torch.sqrt(sd[f"{bn}.running_var"].float() + eps)
    bias = sd[f"{bn}.bias"].float() - sd[f"{bn}.running_mean"].float() * scale
    return w * scale[:, None, None, None], bias


class ConvBN(torch.nn.Module):
    """Convolution with its batch norm folded in (+ optional ReLU).

    1×1 stride-1 convolutions keep their weight as a [Cout, Cin] ``Dense`` so
    they run as a GEMM over channels-last pixels; the others are a ``Conv``
    (both INT8 when quantized)."""

    def __init__(self, sd, conv: str, bn: str, *, stride: int, relu: bool, eps: float):
        super().__init__()
        w, bias = fold_batch_norm(sd, conv, bn, eps)
        act = "relu" if relu else None
        kernel = w.shape[-1]
        self.dense = self.conv = None
        if kernel == 1 and stride == 1:
            self.dense = Dense(w[:, :, 0, 0], bias, activation=act)
        else:
            self.conv = Conv(w, bias, stride=stride, padding=kernel // 2, activation=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(x)
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # free for channels-last input
        y = self.dense(rows)
        return y.view(b, h, w, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


class Bottleneck(torch.nn.Module):
    def __init__(self, sd, prefix: str, stride: int, downsample: bool, eps: float):
        super().__init__()
        self.conv1 = ConvBN(sd, prefix + "conv1", prefix + "bn1", stride=1, relu=True, eps=eps)
        self.conv2 = ConvBN(sd, prefix + "conv2", prefix + "bn2", stride=stride, relu=True, eps=eps)
        self.conv3 = ConvBN(sd, prefix + "conv3", prefix + "bn3", stride=1, relu=False, eps=eps)
        self.downsample = (ConvBN(sd, prefix + "downsample.0", prefix + "downsample.1", stride=stride, relu=False,
                                  eps=eps) if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu_(self.conv3(self.conv2(self.conv1(x))) + identity)


def _folded_convs(cfg: ResNetConfig, sd) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every convolution of the network, batch norm folded, by torchvision name."""
    out = {"conv1": fold_batch_norm(sd, "conv1", "bn1", cfg.eps)}
    for stage, depth in enumerate(cfg.depths):
        for i in range(depth):
            p = f"layer{stage + 1}.{i}."
            for j in (1, 2, 3):
                out[f"{p}conv{j}"] = fold_batch_norm(sd, f"{p}conv{j}", f"{p}bn{j}", cfg.eps)
            if f"{p}downsample.0.weight" in sd:
                out[f"{p}downsample"] = fold_batch_norm(sd, f"{p}downsample.0", f"{p}downsample.1", cfg.eps)
    return out


class ResNet50(torch.nn.Module):
    """Bottleneck ResNet: ``features(x)`` → [B, 2048], ``forward(x)`` → logits."""

    architecture = "resnet"

    def __init__(self, cfg: ResNetConfig, sd: dict[str, torch.Tensor], *, classifier: bool,
                 quantize: Optional[str] = None):
        super().__init__()
        self.config = cfg
        self.fc = Dense(sd["fc.weight"], sd["fc.bias"]) if classifier else None
        # The whole feature pass runs as one native call (resnet_native.py),
        # fp32 or INT8, chosen once at load; the model then holds no torch
        # convolutions at all (their fp32 weights would be a second copy of
        # ResNet-50's ~94 MB). TALLOW_RESNET=ops and a missing native module
        # take the per-op path below.
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.native = self.stem = self.blocks = None
        self._native_conv_parameters = 0
        if native_resnet_wanted():
            folded = _folded_convs(cfg, sd)
            self.native = NativeResNet(cfg, folded, winograd=winograd_wanted(), int8=quantize == "int8")
            self._native_conv_parameters = sum(w.numel() + b.numel() for w, b in folded.values())
        else:
            self.stem = ConvBN(sd, "conv1", "bn1", stride=2, relu=True, eps=cfg.eps)
            blocks = []
            cin = cfg.embedding_size
            for stage, (width, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
                for i in range(depth):
                    stride = 2 if (i == 0 and stage > 0) else 1
                    blocks.append(Bottleneck(sd, f"layer{stage + 1}.{i}.", stride,
                                             i == 0 and (cin != width or stride != 1), cfg.eps))
                    cin = width
            self.blocks = torch.nn.Sequential(*blocks)
        self.requires_grad_(False)
        self.quantization = quantize_model(self, quantize)

    def _check_input(self, x: torch.Tensor, *, finite: bool = True) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] (tallow.ops.preprocess output), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"images must be float32, got {x.dtype}")
        if x.shape[2] < 32 or x.shape[3] < 32:
            raise ValueError(f"images must be at least 32x32, got {tuple(x.shape[2:])}")
        if finite and not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or inf")

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features [B, 2048]."""
        # the native forward checks for NaN / inf itself, with no torch op
        # (which would leave torch's OpenMP threads spinning on its cores)
        self._check_input(x, finite=self.native is None)
        if self.native is not None:
            return self.native.features(x)
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(self.stem(x), kernel_size=3, stride=2, padding=1)
        x = self.blocks(x)
        return x.mean(dim=(2, 3))

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_labels]."""
        if self.fc is None:
            raise ValueError("this checkpoint has no classifier (fc / classifier.1); use features()")
        return self.fc(self.features(x))

    def num_parameters(self) -> int:
        """Parameters after batch-norm folding (the native path's convolutions
        counted as the folded weights and biases they were built from)."""
        return count_parameters(self) + self._native_conv_parameters

    def __repr__(self) -> str:
        c = self.config
        return (f"ResNet50(architecture=resnet-bottleneck, depths={list(c.depths)}, widths={list(c.hidden_sizes)}, "
                f"classes={c.num_labels if self.fc is not None else 'none'}, dtype=float32, "
                f"quantization={self.quantization or 'none'}, parameters={self.num_parameters():,})")


def _check_and_build(sd: dict[str, torch.Tensor], cfg: ResNetConfig, source: str,
                     quantize: Optional[str]) -> ResNet50:
    classifier = "fc.weight" in sd
    check_state_dict(sd, cfg.expected_shapes(classifier=classifier), ignorable=("num_batches_tracked",),
                     source=source)
    return ResNet50(cfg, sd, classifier=classifier, quantize=quantize)


def load_resnet(path: str | Path, quantize: Optional[str] = None) -> ResNet50:
    """A Hugging Face ResNet directory, or a torchvision ``.pth`` state dict file."""
    path = Path(path)
    if path.is_file():
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{str(path)!r} is corrupt or not a weights-only state dict: {exc}") from exc
        if not isinstance(sd, dict):
            raise CheckpointError(f"{str(path)!r} does not hold a state dict (got {type(sd).__name__})")
        return _check_and_build(sd, infer_torchvision_config(sd), str(path), quantize)
    cfg = ResNetConfig.from_dict(read_config(path))
    sd = hf_to_torchvision(read_state_dict(path))
    return _check_and_build(sd, cfg, str(path), quantize)
