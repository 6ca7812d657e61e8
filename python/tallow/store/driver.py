"""Which SQLite driver the store opens: the ``libsql`` binding, or the
standard library's ``sqlite3`` where libsql cannot be installed.

libsql (the maintained binding of libSQL) ships wheels for x86-64 Linux only,
and its source build needs crates.io, so on aarch64 (Graviton, Ampere, Apple
silicon under Linux) ``pip install libsql`` fails. libSQL's file format is
SQLite's, so an embedded metadata store works the same through ``sqlite3``
(FTS5 and JSON functions included); what needs libSQL itself — embedded
replicas (``sync_url``) and the native vector index (``index="libsql"``) —
raises ``DriverUnavailable`` naming the missing package instead.

``TALLOW_STORE_DRIVER=libsql|sqlite3`` forces a driver (the tests use it to
run the store on ``sqlite3`` on x86-64 too).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from .errors import StoreError


class DriverUnavailable(StoreError):
    """A feature needs the libsql package, which is not installed here."""


@dataclass(frozen=True)
class Driver:
    name: str         # "libsql" or "sqlite3"
    module: Any       # the DB-API module
    has_libsql: bool  # replicas and native vectors available

    def connect(self, path: str) -> Any:
        """An autocommit connection (the store issues BEGIN/COMMIT itself),
        usable from the store's worker threads (it serialises access)."""
        if self.has_libsql:
            return self.module.connect(path, isolation_level=None)
        return self.module.connect(path, isolation_level=None, check_same_thread=False)


def _libsql_missing(feature: str, reason: str) -> DriverUnavailable:
    import platform

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":  # a wheel exists: the extra installs it
        return DriverUnavailable(f"{feature} needs the libsql package ({reason}), which tallow's 'search' extra "
                                 "installs on x86-64 Linux: pip install 'tallow[search]'")
    return DriverUnavailable(
        f"{feature} needs the libsql package ({reason}); it has no build for this platform "
        f"(libsql publishes x86-64 Linux wheels only) — use the embedded store and the hnsw or qdrant index")


def driver() -> Driver:
    forced = os.environ.get("TALLOW_STORE_DRIVER", "").strip().lower()
    if forced not in ("", "libsql", "sqlite3"):
        raise StoreError(f"TALLOW_STORE_DRIVER must be libsql or sqlite3, got {forced!r}")
    if forced != "sqlite3":
        try:
            import libsql
        except ImportError as exc:
            if forced == "libsql":
                raise _libsql_missing("TALLOW_STORE_DRIVER=libsql", str(exc)) from exc
        else:
            return Driver("libsql", libsql, True)
    import sqlite3

    return Driver("sqlite3", sqlite3, False)


def require_libsql(feature: str) -> Any:
    """The libsql module, or DriverUnavailable naming ``feature``."""
    d = driver()
    if not d.has_libsql:
        raise _libsql_missing(feature, "store driver is sqlite3")
    return d.module
