"""Errors of the metadata store."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A metadata-store operation failed (bad input, schema mismatch, SQL error)."""


class StoreUnavailableError(StoreError):
    """The libSQL primary of an embedded replica cannot be reached.

    Raised for writes (which replicas delegate to the primary) and for ``sync()``.
    The message names the URL; a failed write was rolled back, nothing of it was
    written. Reads keep being served from the local replica."""


class KVStoreFullError(StoreError):
    """A key-value store already holds its maximum number of keys; nothing was written."""


class KVNotIntegerError(StoreError):
    """kv_increment on a value that is not a decimal 64-bit integer (or that would overflow)."""
