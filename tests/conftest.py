"""Shared fixtures: ISA forcing, backend forcing, GPU skipping."""

from __future__ import annotations

import os

import pytest
import torch

# Without a CUDA device the Triton kernels (tests/triton/) run under Triton's
# interpreter on CPU tensors. It must be chosen before triton is first
# imported, by anything (sentence-transformers, torch.compile...), so here,
# in the first conftest, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tallow
from tallow.testing import ALL_ISAS, available_isas, require_native

# Real redis-server fixtures (redis_url, redis_server_factory) for the feature
# cache tests and the server's; model checkpoints for the model, image and
# server tests. tests/ has no __init__.py: pytest's default
# (prepend) import mode puts this folder on sys.path, so the plugin is
# importable under its bare module name.
pytest_plugins = ["redis_server", "model_checkpoints"]


@pytest.fixture(params=ALL_ISAS)
def each_isa(request):
    """Runs the test once per ISA the CPU supports, with the kernels forced
    onto it; restores the previous ISA afterwards."""
    isa = request.param
    require_native()  # without tallow._C every tier would skip: fail instead
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run {isa} (tiers of this build: {tallow.native().isa_levels()})")
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


def pytest_runtest_setup(item):
    if item.get_closest_marker("native") is not None:
        require_native()


def pytest_report_header(config):
    if not tallow.native_available():
        return f"tallow._C: NOT LOADED: {tallow.native_error()}"
    try:
        isa = tallow.get_isa()
    except Exception as exc:  # e.g. a TALLOW_ISA this CPU lacks: the tests say so
        isa = f"unavailable: {exc}"
    return f"tallow._C: {tallow.native().__file__} (isa {isa})"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not `"gpu" in item.keywords`: keywords also hold the
        # names of the directories above the test (a checkout in .../gpu/)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
