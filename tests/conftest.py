"""Shared fixtures: ISA forcing, backend forcing, GPU skipping."""

from __future__ import annotations

import pytest
import torch

import tallow
from tallow.testing import ISA_LEVELS, available_isas


@pytest.fixture(params=ISA_LEVELS)
def each_isa(request):
    """Runs the test once per ISA the CPU supports, with the kernels forced
    onto it; restores the previous ISA afterwards."""
    isa = request.param
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    previous = tallow.get_isa()
    tallow.set_isa(isa)
    try:
        yield isa
    finally:
        tallow.set_isa(previous)


@pytest.fixture
def force_backend(monkeypatch):
    """force_backend('ref') sets TALLOW_BACKEND for the test."""

    def _set(name: str) -> None:
        monkeypatch.setenv("TALLOW_BACKEND", name)

    return _set


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
