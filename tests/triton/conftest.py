"""The Triton kernels' tests: on a CUDA device when there is one, otherwise
under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). Interpreter runs are slow, so
the shapes are small."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _skip_reason():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not 1 (triton was imported first?)"
    try:
        import tallow.kernels  # noqa: F401
    except ImportError as exc:
        return f"tallow.kernels is not installed: {exc}"
    return None


@pytest.fixture
def device():
    """The device the Triton kernels run on here (cuda, or cpu = interpreter)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
