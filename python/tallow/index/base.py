"""The vector index interface shared by the HNSW, Qdrant and libSQL backends,
and the input checks they all apply."""

from __future__ import annotations

import json
import math
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import numpy as np

from ..errors import InputError

Id = Union[int, str]
METRICS = ("cosine", "ip", "l2")
MAX_K = 10_000


class IndexInputError(InputError):
    """Bad input to an index: wrong dimension, NaN vectors, bad ids or k."""


@dataclass(slots=True)  # slots: cheaper to create (a search makes k of them per query)
class Hit:
    id: Id
    score: float  # cosine / ip: similarity (higher is better); l2: distance (lower is better)
    payload: dict = field(default_factory=dict)


def as_matrix(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """float32 [n, dim] C-contiguous; a single vector becomes [1, dim]."""
    if type(vectors) is np.ndarray and vectors.dtype == np.float32:  # the common case, without copies
        arr = vectors
    else:
        try:
            arr = np.asarray(vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors,
                             dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise IndexInputError(f"{what} must be numeric arrays: {exc}") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise IndexInputError(f"{what} must be [n, {dim}], got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise IndexInputError(f"{what} have dimension {arr.shape[1]}, the index has dimension {dim}")
    if not np.isfinite(arr).all():
        bad = ~np.isfinite(arr).all(axis=1)
        raise IndexInputError(f"{what} row {int(np.argmax(bad))} contains NaN or inf")
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def check_ids(ids: Sequence[Id]) -> list[Id]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise IndexInputError(f"ids must be a list of int or str, got {type(ids).__name__}")
    out = []
    for i, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise IndexInputError(f"id {i} must be int or str, got {type(x).__name__}")
        if isinstance(x, int) and x < 0:
            raise IndexInputError(f"id {i} must be >= 0, got {x}")
        if isinstance(x, str) and not x:
            raise IndexInputError(f"id {i} is an empty string")
        out.append(x)
    if len(set(out)) != len(out):
        raise IndexInputError("ids contain duplicates")
    return out


def check_payloads(payloads: Sequence[dict] | None, n: int) -> list[dict]:
    if payloads is None:
        return [{} for _ in range(n)]
    if len(payloads) != n:
        raise IndexInputError(f"got {n} ids but {len(payloads)} payloads")
    for i, p in enumerate(payloads):
        if not isinstance(p, dict):
            raise IndexInputError(f"payload {i} must be a dict, got {type(p).__name__}")
        for k, v in p.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise IndexInputError(f"payload {i} field {k!r} is {v}: JSON cannot store it")
        try:
            json.dumps(p)
        except (TypeError, ValueError) as exc:
            raise IndexInputError(f"payload {i} is not JSON-serialisable: {exc}") from exc
    return [dict(p) for p in payloads]


def check_upsert(ids: Sequence[Id], vectors: Any, payloads: Sequence[dict] | None,
                 dim: int) -> tuple[list[Id], np.ndarray, list[dict]]:
    """The checks every backend's upsert makes: ids, a finite [n, dim] matrix
    with one row per id, JSON-serialisable payloads."""
    ids = check_ids(ids)
    mat = as_matrix(vectors, dim)
    if mat.shape[0] != len(ids):
        raise IndexInputError(f"got {len(ids)} ids but {mat.shape[0]} vectors")
    return ids, mat, check_payloads(payloads, len(ids))


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise IndexInputError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise IndexInputError(f"k must be >= 1, got {k}")
    if k > MAX_K:
        raise IndexInputError(f"k must be <= {MAX_K}, got {k}")
    return k


class _Held:
    """The context manager RWLock.read() / write() return (a class, not a
    generator: the read side is taken on every search)."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, enter, exit_) -> None:
        self._enter, self._exit = enter, exit_

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc) -> None:
        self._exit()


class RWLock:
    """Many readers or one writer. Searches share; upserts/deletes/saves exclude.

    Writer-preferring: once a writer waits, new readers queue behind it.
    Otherwise a steady stream of overlapping searches keeps the reader count
    above zero and starves ingestion forever. Not reentrant: a thread must not
    take read() while it already holds it (a waiting writer would deadlock it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._read = _Held(self._acquire_read, self._release_read)
        self._write = _Held(self._acquire_write, self._release_write)

    def read(self) -> _Held:
        return self._read

    def write(self) -> _Held:
        return self._write

    def _acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class VectorIndex(ABC):
    """upsert / delete / search / count / entries (/ save where it applies)."""

    dim: int
    metric: str

    @abstractmethod
    def upsert(self, ids: Sequence[Id], vectors: Any, payloads: Sequence[dict] | None = None) -> None: ...

    @abstractmethod
    def delete(self, ids: Sequence[Id]) -> int: ...

    @abstractmethod
    def search(self, vectors: Any, k: int, filter: dict | None = None,
               score_threshold: float | None = None) -> list[list[Hit]]: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def entries(self, field: str | None = None) -> list[tuple[Id, Any]]:
        """Every stored id with a copy of its payload, in no particular order;
        with ``field``, with that payload field's value instead (None where the
        payload has no such field). A consistent snapshot where the backend has
        one (HNSW: taken under its lock; libSQL: one query)."""

    def save(self) -> None:  # backends that persist on every write do nothing
        return None

    def close(self) -> None:
        return None
