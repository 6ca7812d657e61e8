"""Image-search fixtures: the small random ResNet checkpoint ``resnet_dir``
comes from the shared tests/model_checkpoints.py plugin."""

from __future__ import annotations


import pytest


@pytest.fixture(scope="session")
def resnet(resnet_dir):
    """The checkpoint loaded once for the session (tallow models are read-only)."""
    from tallow.models import load

    return load(resnet_dir)
