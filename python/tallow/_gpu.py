"""The GPU backends' loaders: ``tallow._C_cuda`` (CUDA C++) and
``tallow.kernels`` (Triton), both imported lazily.

Neither ever breaks ``import tallow``: a missing module, a machine without a
GPU or driver, or a device too old for the kernels (sm_80 and later) make
the backend raise :class:`BackendUnavailable`, which the dispatcher turns
into a fallback (auto) or an error (``TALLOW_BACKEND=cuda|triton``).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from ._dispatch import BackendUnavailable

_cuda_module: ModuleType | None = None
_cuda_error: str | None = None
_sms: dict[int, int] = {}

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _load_cuda() -> None:
    global _cuda_module, _cuda_error
    if _cuda_module is not None or _cuda_error is not None:
        return
    try:
        _cuda_module = importlib.import_module("tallow._C_cuda")
    except Exception as exc:  # not built (no nvcc at build time), bad .so, ...
        _cuda_error = f"{type(exc).__name__}: {exc}"


def cuda_module_status() -> dict:
    """{'built': bool, 'devices': int, 'error': str or None} — never raises."""
    _load_cuda()
    if _cuda_module is None:
        return {"built": False, "devices": 0, "error": _cuda_error}
    n, err = _cuda_module.device_count()
    return {"built": True, "module": _cuda_module.__file__, "devices": n, "error": err or None}


def cuda_backend(t: torch.Tensor) -> ModuleType:
    """tallow._C_cuda, for a tensor on a CUDA device it can run on."""
    if t.device.type != "cuda":
        raise BackendUnavailable(f"the cuda backend takes CUDA tensors, got {t.device}")
    _load_cuda()
    if _cuda_module is None:
        raise BackendUnavailable(f"tallow._C_cuda is not available ({_cuda_error}); "
                                 "rebuild tallow with a CUDA compiler (TALLOW_CUDA=ON)")
    n, err = _cuda_module.device_count()
    if n == 0:
        raise BackendUnavailable(f"tallow._C_cuda sees no CUDA device ({err or 'none'})")
    major, _, _ = device_properties(t.device)
    if major < 8:
        raise BackendUnavailable(f"tallow._C_cuda needs compute capability 8.0 or later, {t.device} has {major}.x")
    return _cuda_module


def device_properties(device: torch.device) -> tuple[int, int, int]:
    """(major, minor, multiprocessor count) from torch's view of the device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    p = torch.cuda.get_device_properties(idx)
    _sms[idx] = p.multi_processor_count
    return p.major, p.minor, p.multi_processor_count


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms:
        device_properties(device)
    return _sms[idx]


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as the integer the kernels take."""
    return torch.cuda.current_stream(t.device).cuda_stream


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_kernels(op: str, t: torch.Tensor) -> ModuleType:
    """tallow.kernels.<op> (imports triton), for a tensor on a CUDA device."""
    if t.device.type != "cuda":
        raise BackendUnavailable(f"the triton backend takes CUDA tensors, got {t.device}")
    try:
        return importlib.import_module(f"tallow.kernels.{op}")
    except ImportError as exc:
        raise BackendUnavailable(f"triton kernels unavailable: {type(exc).__name__}: {exc}") from exc


# What has been verified on a GPU, said plainly in tallow.info() and the
# README. benchmarks/gpu_check.sh writes tallow/gpu_check.json (shipped in
# the package) when its GPU tests pass on a real device; until that file
# exists, the CUDA and Triton kernels have only been compiled (nvcc, Triton's
# AOT compile) and run under the Triton interpreter on CPU.
GPU_UNVERIFIED = ("compiled and interpreter-tested only; never run on a GPU "
                  "(the CUDA kernels were compiled with nvcc, the Triton kernels ran under TRITON_INTERPRET=1 on CPU; "
                  "benchmarks/gpu_check.sh has not passed on a GPU)")


def gpu_kernels_status() -> str:
    """One honest line on how far the GPU kernels have been tested; never raises."""
    import json
    from pathlib import Path

    record = Path(__file__).with_name("gpu_check.json")
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return GPU_UNVERIFIED
    if not isinstance(data, dict) or data.get("tests_rc") != 0:
        return GPU_UNVERIFIED
    return (f"run on a GPU: benchmarks/gpu_check.sh passed its GPU tests on {data.get('gpu', 'a GPU')} "
            f"({data.get('date', 'date unknown')})")
