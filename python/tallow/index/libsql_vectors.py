"""libSQL native vectors: an ``F32_BLOB(dim)`` column, a ``libsql_vector_idx``
(DiskANN) index and ``vector_top_k`` — so vectors and metadata can live in one
embedded file (the seed's "Turso built-in vector search").

Metrics: cosine and l2 use the ANN index; libSQL has no dot-product distance,
so ``ip`` is answered exactly from the L2 distance and stored squared norms
(a·q = (|a|² + |q|² − |a−q|²) / 2).

Filters become parameterized SQL over the JSON payload column. A filtered
query asks the ANN index for an oversampled candidate list; when fewer than k
candidates pass, it falls back to an exact scan of the rows that match, so a
selective filter still returns k hits when k exist.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import filters as F
from .base import Hit, Id, IndexInputError, VectorIndex, as_matrix, check_ids, check_k, check_upsert

_OVERSAMPLE = 8


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum() or not name[:1].isalpha():
        raise IndexInputError(f"table name must be alphanumeric/underscore and start with a letter, got {name!r}")
    return name


class LibsqlVectorIndex(VectorIndex):
    def __init__(self, dim: int, metric: str = "cosine", *, path: str | Path = ":memory:", table: str = "vectors",
                 connection: Any = None):
        from ..store.driver import require_libsql

        if metric not in ("cosine", "l2", "ip"):
            raise IndexInputError(f"metric must be cosine, l2 or ip, got {metric!r}")
        self.dim, self.metric = int(dim), metric
        self.table = _ident(table)
        if connection is None:
            connection = require_libsql("the libSQL vector index (index='libsql')").connect(str(path))
        self._conn = connection
        self._lock = threading.Lock()  # one connection: serialise its use
        t = self.table
        with self._lock:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t} (ext_id TEXT NOT NULL, id_kind TEXT NOT NULL, payload TEXT NOT NULL,"
                f" norm2 REAL NOT NULL, embedding F32_BLOB({self.dim}) NOT NULL,"
                # the kind is part of the key: 5 and "5" are two ids, as in the other backends
                f" UNIQUE (ext_id, id_kind))")
            if metric != "ip":
                self._conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_ann ON {t}"
                                   f"(libsql_vector_idx(embedding, 'metric={'cosine' if metric == 'cosine' else 'l2'}'))")
            self._conn.commit()

    @staticmethod
    def _key(x: Id) -> tuple[str, str]:
        return (str(x), "int" if isinstance(x, int) else "str")

    @staticmethod
    def _ext(key: str, kind: str) -> Id:
        return int(key) if kind == "int" else key

    def upsert(self, ids: Sequence[Id], vectors: Any, payloads: Sequence[dict] | None = None) -> None:
        ids, mat, pls = check_upsert(ids, vectors, payloads, self.dim)
        rows = []
        for i, x in enumerate(ids):
            payload = json.dumps(pls[i])
            key, kind = self._key(x)
            rows.append((key, kind, payload, float(np.dot(mat[i], mat[i])), json.dumps(mat[i].tolist())))
        with self._lock:
            try:
                self._conn.executemany(
                    f"INSERT INTO {self.table} (ext_id, id_kind, payload, norm2, embedding) VALUES (?, ?, ?, ?, vector32(?)) "
                    "ON CONFLICT(ext_id, id_kind) DO UPDATE SET payload = excluded.payload, "
                    "norm2 = excluded.norm2, embedding = excluded.embedding", rows)
                self._conn.commit()
            except Exception:
                self._conn.rollback()
                raise

    def delete(self, ids: Sequence[Id]) -> int:
        ids = check_ids(ids)
        removed = 0
        with self._lock:
            try:
                for x in ids:
                    cur = self._conn.execute(f"DELETE FROM {self.table} WHERE ext_id = ? AND id_kind = ?", self._key(x))
                    removed += max(cur.rowcount, 0)
                self._conn.commit()
            except Exception:
                self._conn.rollback()
                raise
        return removed

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def entries(self, field: str | None = None) -> list[tuple[Id, Any]]:
        with self._lock:
            rows = self._conn.execute(f"SELECT ext_id, id_kind, payload FROM {self.table}").fetchall()
        out = []
        for key, kind, payload in rows:
            p = json.loads(payload)
            out.append((self._ext(key, kind), p if field is None else p.get(field)))
        return out

    def _distance_sql(self) -> str:
        if self.metric == "cosine":
            return "vector_distance_cos(embedding, vector32(?))"
        return "vector_distance_l2(embedding, vector32(?))"

    def _exact_distance_sql(self) -> str:
        # ip ranks by the L2 distance and the stored norms (libSQL has no dot product).
        return "vector_distance_l2(embedding, vector32(?))" if self.metric == "ip" else self._distance_sql()

    def _score(self, distance: float, norm2: float, qnorm2: float) -> float:
        if self.metric == "cosine":
            return 1.0 - distance
        if self.metric == "l2":
            return distance
        return (norm2 + qnorm2 - distance * distance) / 2.0  # ip from l2

    def _better_first(self, hits: list[Hit]) -> list[Hit]:
        return sorted(hits, key=lambda h: h.score, reverse=self.metric != "l2")

    def search(self, vectors: Any, k: int, filter: dict | None = None,
               score_threshold: float | None = None) -> list[list[Hit]]:
        k = check_k(k)
        queries = as_matrix(vectors, self.dim, "query vectors")
        where, params = F.to_sql(F.parse(filter))
        out = []
        with self._lock:
            for q in queries:
                qjson = json.dumps(q.tolist())
                qn2 = float(np.dot(q, q))
                hits: list[Hit] = []
                if self.metric != "ip":
                    rows = self._conn.execute(
                        f"SELECT v.ext_id, v.id_kind, v.payload, v.norm2, {self._distance_sql()} "
                        f"FROM vector_top_k('{self.table}_ann', vector32(?), ?) AS top "
                        f"JOIN {self.table} AS v ON v.rowid = top.id WHERE {where}",
                        (qjson, qjson, k * (_OVERSAMPLE if filter else 1), *params)).fetchall()
                    hits = [Hit(self._ext(r[0], r[1]), self._score(r[4], r[3], qn2), json.loads(r[2])) for r in rows]
                    hits = self._better_first(hits)[:k]
                if len(hits) < k:
                    matching = self._conn.execute(f"SELECT count(*) FROM {self.table} WHERE {where}", params).fetchone()[0]
                    if matching > len(hits):  # exact scan of the matching rows, best first in SQL
                        order = "(norm2 - d * d) DESC" if self.metric == "ip" else "d ASC"
                        rows = self._conn.execute(
                            f"SELECT ext_id, id_kind, payload, norm2, {self._exact_distance_sql()} AS d "
                            f"FROM {self.table} WHERE {where} ORDER BY {order} LIMIT ?",
                            (qjson, *params, k)).fetchall()
                        hits = [Hit(self._ext(r[0], r[1]), self._score(r[4], r[3], qn2), json.loads(r[2])) for r in rows]
                if score_threshold is not None:
                    hits = [h for h in hits if (h.score <= score_threshold if self.metric == "l2"
                                                else h.score >= score_threshold)]
                out.append(hits)
        return out

    def close(self) -> None:
        self._conn.close()
