"""The cache protocol, its errors and the argument checks shared by the backends."""

from __future__ import annotations

import math
import threading

import numpy as np


class CacheError(ValueError):
    """A bad argument to a cache: key, value or size. Never raised for a cache
    backend that is unavailable (that degrades to a miss / a no-op)."""


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise CacheError(f"cache key must be a str (e.g. a SHA-256 hex digest), got {type(key).__name__}")
    if not key:
        raise CacheError("cache key must be a non-empty str")
    return key


def check_value(value: object) -> np.ndarray:
    """``value`` as a new C-contiguous float32 1-D array, or a CacheError saying
    what is wrong with it (not 1-D, empty, non-numeric, non-finite)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise CacheError(f"cache value must be a 1-D float array, got {type(value).__name__}: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise CacheError(f"cache value must be a 1-D float array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise CacheError(f"cache value must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise CacheError("cache value must not be empty (shape (0,))")
    # float64 beyond float32's range becomes inf: caught by the finiteness check
    # below, without numpy's overflow RuntimeWarning.
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        raise CacheError(f"cache value must be finite as float32: element {bad} is {arr[bad]!r} (shape {arr.shape})")
    return out


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CacheError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CacheError(f"{name} must be a number > 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise CacheError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class FeatureCache:
    """Image features keyed by the image's SHA-256 hex digest.

    Subclasses implement ``get`` / ``put`` (and ``_entries``, ``close`` when they
    hold something); the hit / miss / error counters live here. Every method is
    thread-safe. Usable as a context manager (``close`` on exit)."""

    backend: str = "none"

    def __init__(self) -> None:
        self._stats_lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._errors = 0

    def get(self, key: str) -> np.ndarray | None:
        """A float32 1-D copy of the cached value, or None on a miss."""
        raise NotImplementedError

    def put(self, key: str, value: np.ndarray) -> None:
        """Caches ``value`` (1-D, finite; stored as float32) under ``key``."""
        raise NotImplementedError

    def stats(self) -> dict:
        """``{"backend", "hits", "misses", "errors", "entries"}``; ``entries`` is
        None when the backend cannot count its own entries cheaply (Redis)."""
        with self._stats_lock:
            hits, misses, errors = self._hits, self._misses, self._errors
        return {"backend": self.backend, "hits": hits, "misses": misses, "errors": errors,
                "entries": self._entries()}

    def close(self) -> None:
        """Releases what the cache holds (connections, memory). Idempotent."""

    def _entries(self) -> int | None:
        return None

    def _count(self, *, hits: int = 0, misses: int = 0, errors: int = 0) -> None:
        with self._stats_lock:
            self._hits += hits
            self._misses += misses
            self._errors += errors

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


class NullCache(FeatureCache):
    """Caches nothing: every ``get`` is a (counted) miss, ``put`` only checks
    its arguments."""

    backend = "none"

    def get(self, key: str) -> np.ndarray | None:
        check_key(key)
        self._count(misses=1)
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        check_key(key)
        check_value(value)

    def _entries(self) -> int:
        return 0
