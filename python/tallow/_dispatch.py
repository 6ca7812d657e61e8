"""Backend selection for tallow's ops.

Each op lists its implementations per device type, best first, e.g. for CPU
tensors ``("cpu", "ref")``. ``TALLOW_BACKEND=ref|cpu|triton|cuda`` forces one.

- Auto-chosen: a backend that raises ``BackendUnavailable`` (native module
  missing, unsupported configuration) is skipped with a warning, down to the
  pure-torch reference, which always works.
- Requested through TALLOW_BACKEND: the same failure raises.

Errors about the caller's input (``ValueError``/``TypeError``) are never
swallowed: they mean the input is wrong, not the backend.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Sequence

from ._native import NativeUnavailableError

KNOWN_BACKENDS = ("ref", "cpu", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """A backend cannot run this call (missing library, unsupported case)."""


class BackendFallbackWarning(RuntimeWarning):
    """An auto-chosen backend failed and a slower one was used instead."""


_warned: set[tuple[str, str, str]] = set()


def requested_backend() -> str | None:
    name = os.environ.get("TALLOW_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in KNOWN_BACKENDS:
        raise ValueError(
            f"TALLOW_BACKEND={name!r} is not a backend; expected one of {', '.join(KNOWN_BACKENDS)}"
        )
    return name


def dispatch(
    op: str,
    device_type: str,
    order: Mapping[str, Sequence[str]],
    impls: Mapping[str, Callable[..., Any]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Runs ``op`` with the best backend for ``device_type``.

    ``order`` maps a device type to backend names, best first; ``impls`` maps
    backend names to callables taking ``*args, **kwargs``.
    """
    forced = requested_backend()
    if forced is not None:
        if forced not in impls:
            raise BackendUnavailable(f"{op}: backend {forced!r} (TALLOW_BACKEND) does not implement this op")
        if forced != "ref" and forced not in order.get(device_type, ()):
            raise BackendUnavailable(
                f"{op}: backend {forced!r} (TALLOW_BACKEND) cannot run on {device_type} tensors"
            )
        try:
            return impls[forced](*args, **kwargs)
        except NativeUnavailableError as exc:
            raise BackendUnavailable(f"{op}: backend {forced!r} (TALLOW_BACKEND): {exc}") from exc

    candidates = [b for b in order.get(device_type, ()) if b in impls]
    if "ref" not in candidates:
        candidates.append("ref")
    for backend in candidates:
        try:
            return impls[backend](*args, **kwargs)
        except (BackendUnavailable, NativeUnavailableError) as exc:
            if backend == "ref":
                raise
            key = (op, backend, str(exc))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"{op}: backend {backend!r} failed ({exc}); falling back",
                    BackendFallbackWarning,
                    stacklevel=3,
                )
    raise AssertionError("unreachable: the ref backend always runs")


def choose_backend(op: str, device_type: str, order: Mapping[str, Sequence[str]],
                   available: Mapping[str, Callable[[], bool]]) -> str:
    """The backend a module binds once, when it is built or its weights move
    (DESIGN.md convention 16), by the rules of :func:`dispatch`: TALLOW_BACKEND
    if set (raising if that backend cannot run here), else the first backend
    of ``order[device_type]`` whose ``available[name]()`` says yes (the
    reference always is), with a warning when a better one was passed over."""
    forced = requested_backend()
    names = list(order.get(device_type, ()))
    if forced is not None:
        if forced != "ref" and forced not in names:
            raise BackendUnavailable(f"{op}: backend {forced!r} (TALLOW_BACKEND) cannot run on {device_type} tensors")
        if forced != "ref" and not available.get(forced, lambda: False)():
            raise BackendUnavailable(f"{op}: backend {forced!r} (TALLOW_BACKEND) is not available here")
        return forced
    for name in names:
        if name == "ref" or available.get(name, lambda: False)():
            if name != names[0]:
                key = (op, names[0], "unavailable")
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"{op}: backend {names[0]!r} is not available; using {name!r}",
                                  BackendFallbackWarning, stacklevel=3)
            return name
    return "ref"


def eager_call(*tensors: Any) -> bool:
    """True for plain eager tensors outside torch.compile/tracing. The public
    op functions then call ``dispatch`` directly, skipping torch.library's
    custom-op machinery (~25-100 us a call, most of the cost of a decode-step
    kernel); compile, export, fake and subclassed tensors take the custom op."""
    import torch

    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)
