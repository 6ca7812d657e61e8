"""tallow: a CPU-first inference engine with hand-written kernels.

``import tallow`` never fails because of the native module; see
:func:`tallow.info` for what was built and what this machine runs.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# torch's OpenMP threads busy-wait after every parallel region (up to ~10 ms
# here). Between torch ops and tallow's kernels — every model layer — they
# take cores from our thread pool; measured on 2 cores: BERT-base fp32 1.0 s
# vs 0.29 s per sequence under load. Passive waiting is only honoured if set
# before libgomp loads, i.e. before torch is imported; an explicit setting of
# the user's always wins, and a host that does not want tallow to touch its
# process environment sets TALLOW_SET_OMP_WAIT_POLICY=0. See README "Run-time
# choices".
if "torch" not in _sys.modules and _os.environ.get("TALLOW_SET_OMP_WAIT_POLICY", "1").strip().lower() not in (
        "0", "false", "no", "off"):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._native import NativeUnavailableError, native, native_available, native_error
from ._dispatch import BackendFallbackWarning, BackendUnavailable

from ._version import __version__


_SUBMODULES = ("corpus", "engine", "index", "models", "ops", "store", "testing")


def __getattr__(name: str):
    # Submodules load on first use (tallow.ops pulls in torch and registers
    # the custom ops); `import tallow` itself stays light and cannot fail.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name == "Engine":  # the Python API's entry point (tallow.engine.Engine)
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'tallow' has no attribute {name!r}")


def set_num_threads(n: int) -> None:
    """Sets the number of threads tallow's kernels use (also: TALLOW_NUM_THREADS)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    native().set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads tallow's kernels use."""
    return native().num_threads()


def set_isa(name: str) -> None:
    """Forces the CPU kernels onto an ISA: 'avx512_vnni', 'avx2' or 'scalar' on
    x86-64, 'neon' or 'scalar' on aarch64 (no higher than the CPU supports).
    Also settable with TALLOW_ISA."""
    try:
        native().set_isa(name)
    except RuntimeError as exc:  # "this CPU supports at most ..."
        raise ValueError(str(exc)) from exc


def get_isa() -> str:
    """The ISA the CPU kernels use now."""
    return native().active_isa()


def info() -> dict:
    """Version, native build, ISA, threads and available backends."""
    import torch

    from ._dispatch import requested_backend

    report: dict = {
        "version": __version__,
        "torch": torch.__version__,
        "native": {"available": native_available()},
        "backends": {"ref": True, "cpu": native_available(), "triton": False, "cuda": False},
    }
    if native_available():
        mod = native()
        report["native"].update(
            {
                "module": mod.__file__,
                "compiler": mod.compiler,
                "arch": mod.arch(),
                "isa_levels": list(mod.isa_levels()),
                "cpu_features": mod.cpu_features(),
                "isa_requirements": mod.isa_requirements(),
                "best_isa": mod.best_isa(),
                "isa": mod.active_isa(),
                "threads": mod.num_threads(),
            }
        )
    else:
        report["native"]["error"] = native_error()
    from . import _gpu

    report["cuda_module"] = _gpu.cuda_module_status()
    has_cuda = torch.cuda.is_available()
    report["backends"]["cuda"] = bool(has_cuda and report["cuda_module"]["devices"] > 0)
    report["backends"]["triton"] = bool(has_cuda and _gpu.triton_available())
    report["gpu_kernels"] = _gpu.gpu_kernels_status()
    from ._extras import installed

    report["extras"] = installed()
    try:
        report["backend_override"] = requested_backend()
    except ValueError as exc:
        report["backend_override"] = f"invalid: {exc}"
    return report


from ._extras import MissingExtraError  # noqa: E402  (light: no third-party import)

__all__ = [
    "BackendFallbackWarning",
    "MissingExtraError",
    "BackendUnavailable",
    "NativeUnavailableError",
    "get_isa",
    "get_num_threads",
    "info",
    "set_isa",
    "set_num_threads",
]
