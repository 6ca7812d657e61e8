"""Loads the native module ``tallow._C`` without ever failing the import.

``import tallow`` works when the extension is missing or broken (a source
checkout, a wheel built for another platform); the error, with the reason,
comes at the first call that needs native code.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class NativeUnavailableError(RuntimeError):
    """The native module tallow._C could not be loaded."""


_module: ModuleType | None = None
_load_error: str | None = None


def _load() -> None:
    global _module, _load_error
    if _module is not None or _load_error is not None:
        return
    try:
        _module = importlib.import_module("tallow._C")
    except Exception as exc:  # ImportError, OSError (bad .so), anything else
        _load_error = f"{type(exc).__name__}: {exc}"


def native() -> ModuleType:
    """Returns tallow._C or raises NativeUnavailableError saying why not."""
    _load()
    if _module is None:
        raise NativeUnavailableError(
            "tallow's native module (tallow._C) is not available: "
            f"{_load_error}. Build it with `pip install .` (see README)."
        )
    return _module


def native_available() -> bool:
    _load()
    return _module is not None


def native_error() -> str | None:
    """Why the native module failed to load (None when it loaded)."""
    _load()
    return _load_error
