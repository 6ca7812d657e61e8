"""Helpers shared by the index tests (imported as a plain module: pytest puts
this folder on sys.path)."""

from __future__ import annotations

import numpy as np

from tallow.index import HnswIndex, LibsqlVectorIndex, QdrantIndex

from tallow.testing import libsql_available

# The libSQL vector index needs the libsql package (absent on aarch64; see
# tallow/store/driver.py): the loops over every backend leave it out there,
# and the parametrized fixture skips it with the reason (tests/index/conftest.py).
ALL_BACKENDS = ("hnsw", "qdrant", "libsql")
BACKENDS = ALL_BACKENDS if libsql_available() else ("hnsw", "qdrant")


def make_index(backend: str, dim: int, metric: str, tmp_path=None, **kw):
    if backend == "hnsw":
        return HnswIndex(dim, metric, **kw)
    if backend == "qdrant":
        return QdrantIndex(dim, metric, location=":memory:", **kw)
    if backend == "libsql":
        return LibsqlVectorIndex(dim, metric, path=":memory:", **kw)
    raise AssertionError(backend)


def brute_force(data: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """(indices [q, k], scores [q, k]) best first, in float64; scores as the
    indexes report them (cosine / ip similarity, l2 distance)."""
    x = data.astype(np.float64)
    q = np.atleast_2d(queries).astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        s = np.sqrt(np.maximum(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
    else:
        s = q @ x.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)
