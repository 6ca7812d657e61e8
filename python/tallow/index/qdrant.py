"""Qdrant backend through qdrant-client.

``QdrantIndex(dim, url=...)`` talks to a Qdrant server or cluster;
``path=`` (a directory) or ``location=":memory:"`` use qdrant-client's local
mode (exact search, one process per path) — the mode tests run here.

Qdrant point ids must be unsigned ints or UUIDs: int ids are used as they are,
str ids map to UUID5s, and the caller's id is kept in the payload under
``_tallow_id``. Filters are translated to Qdrant ``Filter``s; a payload index
is created for each filtered field the first time it is filtered on.
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

from .._extras import import_extra
from . import filters as F
from .base import Hit, Id, IndexInputError, VectorIndex, as_matrix, check_ids, check_k, check_upsert

_DISTANCE = {"cosine": "COSINE", "ip": "DOT", "l2": "EUCLID"}
_ID_KEY = "_tallow_id"
_NAMESPACE = uuid.UUID("5b0c5b5e-7a11-4f0a-9d1e-7a110a11e5ed")


def _point_id(x: Id) -> int | str:
    return x if isinstance(x, int) else str(uuid.uuid5(_NAMESPACE, x))


class QdrantIndex(VectorIndex):
    def __init__(self, dim: int, metric: str = "cosine", *, collection: str = "tallow", url: str | None = None,
                 path: str | None = None, location: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0):
        import_extra("qdrant_client", "qdrant", "the qdrant vector index")
        from qdrant_client import QdrantClient
        from qdrant_client import models as qm

        if metric not in _DISTANCE:
            raise IndexInputError(f"metric must be one of {', '.join(_DISTANCE)}, got {metric!r}")
        if sum(x is not None for x in (url, path, location)) != 1:
            raise IndexInputError("give exactly one of url= (server), path= (local directory) or "
                                  "location=':memory:'")
        self.dim, self.metric, self.collection = dim, metric, collection
        if url is not None:
            self._client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout))
        elif path is not None:
            self._client = QdrantClient(path=str(path))
        else:
            self._client = QdrantClient(location=location)
        self._qm = qm
        # Local mode has no payload indexes (qdrant-client warns and ignores them).
        self._indexed: set[str] = set()
        self._payload_indexes = url is not None
        if not self._client.collection_exists(collection):
            self._client.create_collection(
                collection, vectors_config=qm.VectorParams(size=dim, distance=getattr(qm.Distance, _DISTANCE[metric])))
        else:
            params = self._client.get_collection(collection).config.params.vectors
            if params.size != dim:
                raise IndexInputError(f"collection {collection!r} has dimension {params.size}, not {dim}")

    def upsert(self, ids: Sequence[Id], vectors: Any, payloads: Sequence[dict] | None = None) -> None:
        ids, mat, pls = check_upsert(ids, vectors, payloads, self.dim)
        for i, p in enumerate(pls):
            if _ID_KEY in p:
                raise IndexInputError(f"payload {i} uses the reserved field {_ID_KEY!r}")
        if not ids:
            return
        points = [self._qm.PointStruct(id=_point_id(x), vector=mat[i].tolist(), payload={**pls[i], _ID_KEY: x})
                  for i, x in enumerate(ids)]
        self._client.upsert(self.collection, points=points, wait=True)

    def delete(self, ids: Sequence[Id]) -> int:
        ids = check_ids(ids)
        if not ids:
            return 0
        pids = [_point_id(x) for x in ids]
        present = self._client.retrieve(self.collection, ids=pids, with_payload=False, with_vectors=False)
        if present:
            self._client.delete(self.collection, points_selector=self._qm.PointIdsList(points=[p.id for p in present]),
                                wait=True)
        return len(present)

    def count(self) -> int:
        return int(self._client.count(self.collection, exact=True).count)

    def entries(self, field: str | None = None) -> list[tuple[Id, Any]]:
        if field == _ID_KEY:
            raise IndexInputError(f"{_ID_KEY!r} is a reserved field (the caller's id)")
        # Scrolling pages through the collection; only the fields needed come back.
        selector: Any = True if field is None else [_ID_KEY, field]
        out: list[tuple[Id, Any]] = []
        offset = None
        while True:
            points, offset = self._client.scroll(self.collection, limit=1000, offset=offset, with_payload=selector,
                                                 with_vectors=False)
            for p in points:
                payload = dict(p.payload or {})
                ext = payload.pop(_ID_KEY, p.id)
                out.append((ext, payload if field is None else payload.get(field)))
            if offset is None:
                return out

    def _ensure_payload_indexes(self, node: F.Node, spec: dict) -> None:
        qm = self._qm
        for field in F.fields(node) - self._indexed:
            sample = _first_value(spec, field)
            # Numbers are filtered by value ranges (filters.to_qdrant), so one FLOAT
            # index serves stored ints and floats alike.
            schema = (qm.PayloadSchemaType.BOOL if isinstance(sample, bool)
                      else qm.PayloadSchemaType.KEYWORD if isinstance(sample, str)
                      else qm.PayloadSchemaType.FLOAT)
            self._client.create_payload_index(self.collection, field_name=field, field_schema=schema, wait=True)
            self._indexed.add(field)

    def search(self, vectors: Any, k: int, filter: dict | None = None,
               score_threshold: float | None = None) -> list[list[Hit]]:
        k = check_k(k)
        queries = as_matrix(vectors, self.dim, "query vectors")
        node = F.parse(filter)
        qfilter = F.to_qdrant(node)
        if node is not None and self._payload_indexes:
            self._ensure_payload_indexes(node, filter)
        requests = [self._qm.QueryRequest(query=q.tolist(), limit=k, filter=qfilter, with_payload=True,
                                          score_threshold=score_threshold) for q in queries]
        responses = self._client.query_batch_points(self.collection, requests=requests)
        out = []
        for resp in responses:
            hits = []
            for p in resp.points:
                payload = dict(p.payload or {})
                ext = payload.pop(_ID_KEY, p.id)
                hits.append(Hit(ext, float(p.score), payload))
            out.append(hits)
        return out

    def close(self) -> None:
        self._client.close()


def _first_value(spec: Any, field: str) -> Any:
    """A value the filter compares ``field`` with (to pick the index type)."""
    if isinstance(spec, dict):
        for key, v in spec.items():
            if key == field:
                if isinstance(v, dict):
                    inner = next(iter(v.values()))
                    return inner[0] if isinstance(inner, (list, tuple)) else inner
                return v
            if key in ("must", "should", "must_not"):
                for sub in v:
                    found = _first_value(sub, field)
                    if found is not None:
                        return found
    return None
