"""Image-search fixtures: a small random ResNet checkpoint (the same recipe as
tests/models/conftest.py's ``resnet_dir``, copied because conftest fixtures
are not shared across sibling test folders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    """Random init leaves BN at identity (mean 0, var 1); make folding matter."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory) -> Path:
    """A small random ResNetForImageClassification (bottleneck, 4 stages, 256-d features)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(3)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
                       layer_type="bottleneck", num_labels=10)
    model = ResNetForImageClassification(cfg).eval()
    _randomise_batch_norms(model)
    out = tmp_path_factory.mktemp("resnet")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def resnet(resnet_dir):
    """The checkpoint loaded once for the session (tallow models are read-only)."""
    from tallow.models import load

    return load(resnet_dir)
