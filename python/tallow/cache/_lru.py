"""In-process LRU feature cache, bounded by entry count and by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ._base import FeatureCache, check_key, check_positive_int, check_value


class LRUCache(FeatureCache):
    """Least-recently-used cache in this process's memory.

    Holds at most ``max_entries`` vectors and at most ``max_bytes`` bytes of
    vector data (float32, 4 bytes per element; keys and per-entry overhead are
    not counted). A ``put`` evicts least-recently-used entries until both bounds
    hold; a single value larger than ``max_bytes`` is not stored at all (and
    replaces, i.e. drops, what was cached under its key). ``get`` marks the
    entry as recently used. Stored arrays are private copies; ``get`` returns a
    fresh copy, so callers may modify what they get."""

    backend = "lru"

    def __init__(self, max_entries: int = 4096, max_bytes: int = 256 << 20):
        super().__init__()
        self.max_entries = check_positive_int("max_entries", max_entries)
        self.max_bytes = check_positive_int("max_bytes", max_bytes)
        self._lock = threading.Lock()
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> np.ndarray | None:
        check_key(key)
        with self._lock:
            arr = self._data.get(key)
            if arr is not None:
                self._data.move_to_end(key)
        if arr is None:
            self._count(misses=1)
            return None
        self._count(hits=1)
        return arr.copy()  # stored arrays are never mutated, so copying outside the lock is safe

    def put(self, key: str, value: np.ndarray) -> None:
        check_key(key)
        arr = check_value(value)  # already a private copy
        arr.flags.writeable = False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if arr.nbytes > self.max_bytes:
                return
            self._data[key] = arr
            self._bytes += arr.nbytes
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of vector data held now."""
        with self._lock:
            return self._bytes

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def _entries(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"LRUCache(max_entries={self.max_entries}, max_bytes={self.max_bytes})"
