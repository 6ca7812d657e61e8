"""Key-value stores for functions, kept in the libSQL metadata store (table
``kv``, migration 2), with Spin's semantics and limits.

``KV`` checks grants and sizes and maps every failure to its ``tallow:v1``
error code (``KVError.code``): no such store, access denied, store full, key
too large, value too large. Writes are committed when the call returns.
The store is opened lazily, on the first KV call of any function.

``KV.within(timeout_s, op, ...)`` runs an operation on the KV's own threads
and waits at most ``timeout_s`` for it: a guest's call returns at its
deadline even while the store is busy (held by an ingest, a slow disk, an
unreachable replica primary). An operation that has not started by then is
cancelled; one already running completes on its own.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

from . import abi
from .limits import KVConfig


class KVError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.name = abi.ERRORS[code]


class KV:
    def __init__(self, path: str | Path | None = None, config: KVConfig | None = None, *, store: Any = None,
                 sync_url: str | None = None, auth_token: str | None = None):
        self.config = (config or KVConfig()).check()
        self.path = path
        self._store = store
        self._sync = (sync_url, auth_token)
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def store(self):
        if self._store is None:
            with self._lock:
                if self._store is None:
                    from ..store import MetadataStore

                    if self.path is None:
                        raise KVError(abi.E_IO, "no metadata store is configured for key-value stores")
                    url, token = self._sync
                    self._store = MetadataStore(self.path, sync_url=url or None, auth_token=token or None)
        return self._store

    def open(self, name: str, granted: list[str]) -> str:
        if name not in self.config.stores:
            raise KVError(abi.E_NO_SUCH_STORE, f"no key-value store named {name!r}")
        if name not in granted:
            raise KVError(abi.E_ACCESS_DENIED, f"key-value store {name!r} is not granted to this function")
        return name

    def _key(self, key: bytes) -> bytes:
        if len(key) > self.config.max_key_bytes:
            raise KVError(abi.E_KEY_TOO_LARGE, f"key of {len(key)} bytes > kv.max_key_bytes={self.config.max_key_bytes}")
        return key

    def _call(self, fn, *args, **kw):
        from ..store.errors import KVNotIntegerError, KVStoreFullError, StoreError

        try:
            return fn(*args, **kw)
        except KVStoreFullError as exc:
            raise KVError(abi.E_STORE_FULL, str(exc)) from None
        except KVNotIntegerError as exc:
            raise KVError(abi.E_NOT_INTEGER, str(exc)) from None
        except StoreError as exc:
            raise KVError(abi.E_IO, str(exc)) from None

    def get(self, store: str, key: bytes) -> bytes | None:
        return self._call(self.store.kv_get, store, self._key(key))

    def exists(self, store: str, key: bytes) -> bool:
        return self._call(self.store.kv_exists, store, self._key(key))

    def keys(self, store: str) -> list[bytes]:
        return self._call(self.store.kv_keys, store)

    def set(self, store: str, key: bytes, value: bytes) -> None:
        self._key(key)
        if len(value) > self.config.max_value_bytes:
            raise KVError(abi.E_VALUE_TOO_LARGE,
                          f"value of {len(value)} bytes > kv.max_value_bytes={self.config.max_value_bytes}")
        self._call(self.store.kv_set, store, key, value, max_keys=self.config.max_keys)

    def delete(self, store: str, key: bytes) -> None:
        self._call(self.store.kv_delete, store, self._key(key))

    def increment(self, store: str, key: bytes, delta: int) -> int:
        return self._call(self.store.kv_increment, store, self._key(key), delta, max_keys=self.config.max_keys)

    def within(self, timeout_s: float, op: str, *args):
        """``self.<op>(*args)``, or TimeoutError when it has not finished within ``timeout_s``."""
        with self._lock:
            if self._pool is None:
                # The store serialises its calls on one lock: more threads would only wait there.
                self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tallow-kv")
            pool = self._pool
        fut = pool.submit(getattr(self, op), *args)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"key-value {op} did not finish within {timeout_s:.3f} s") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self._store is not None and self.path is not None:
            self._store.close()
            self._store = None
