"""HNSW index (Malkov & Yashunin 2018) on hnswlib: the embedded default.

What hnswlib leaves to its caller, done here:
- external ids (int or str) mapped to hnswlib labels; deleted labels go on a
  free list and are reused (``mark_deleted``, later ``unmark_deleted`` + an
  in-place update of that same slot);
- growth with ``resize_index`` (capacity doubles);
- ``ef`` stored with the index and re-applied on load (hnswlib forgets it);
- a readers/writer lock: searches run concurrently, writes exclusively
  (hnswlib is not safe for queries concurrent with inserts);
- payload filters that still return k hits when k exist: the matching set is
  computed first; a selective filter is answered by exact search over the
  matching vectors, a broad one by hnswlib's filtered search, falling back to
  exact search when hnswlib cannot fill k results (where it would raise);
- atomic saves: each save writes a new snapshot directory, then swaps the
  ``CURRENT`` pointer file with ``os.replace``; a crash mid-save leaves the
  previous snapshot loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._extras import import_extra
from . import filters as F
from .base import Hit, Id, IndexInputError, RWLock, VectorIndex, as_matrix, check_ids, check_k, check_upsert

_SPACE = {"cosine": "cosine", "ip": "ip", "l2": "l2"}
_FORMAT = 1


class CorruptIndexError(RuntimeError):
    """An index directory that cannot be loaded."""


class HnswIndex(VectorIndex):
    def __init__(self, dim: int, metric: str = "cosine", *, path: str | os.PathLike | None = None, M: int = 16,
                 ef_construction: int = 200, ef: int = 64, capacity: int = 1024,
                 exact_fraction: float = 0.05):
        hnswlib = import_extra("hnswlib", "search", "the hnsw vector index")

        if metric not in _SPACE:
            raise IndexInputError(f"metric must be one of {', '.join(_SPACE)}, got {metric!r}")
        if not isinstance(dim, int) or dim < 1:
            raise IndexInputError(f"dim must be a positive int, got {dim!r}")
        self.dim, self.metric = dim, metric
        self.path = Path(path) if path is not None else None
        self.M, self.ef_construction, self.ef = int(M), int(ef_construction), int(ef)
        # Filters matching at most this fraction of the index are answered exactly.
        self.exact_fraction = float(exact_fraction)
        self._lock = RWLock()
        self._index = hnswlib.Index(space=_SPACE[metric], dim=dim)
        self._index.init_index(max_elements=max(16, capacity), ef_construction=self.ef_construction, M=self.M,
                               allow_replace_deleted=True)
        self._index.set_ef(self.ef)
        self._label_of: dict[Id, int] = {}
        self._id_of: dict[int, Id] = {}
        self._payload: dict[int, dict] = {}
        self._free: list[int] = []     # labels of deleted items, reusable
        self._next_label = 0
        self._version = 0              # bumps on every write; keys the filter cache
        self._filter_cache: dict[str, dict] = {}  # filter JSON -> _matching() entry

    # -- writes -----------------------------------------------------------------------

    def upsert(self, ids: Sequence[Id], vectors: Any, payloads: Sequence[dict] | None = None) -> None:
        ids, mat, pls = check_upsert(ids, vectors, payloads, self.dim)
        if not ids:
            return
        with self._lock.write():
            existing = [(i, self._label_of[x]) for i, x in enumerate(ids) if x in self._label_of]
            fresh = [i for i, x in enumerate(ids) if x not in self._label_of]
            if existing:  # hnswlib updates the vector of a live label in place
                rows, labels = zip(*existing)
                self._index.add_items(mat[list(rows)], np.asarray(labels, dtype=np.int64))
                for r, lab in existing:
                    self._payload[lab] = pls[r]
            if fresh:
                reuse = min(len(fresh), len(self._free))
                if self._next_label + (len(fresh) - reuse) > self._index.get_max_elements():
                    self._index.resize_index(max(2 * self._index.get_max_elements(),
                                                 self._next_label + len(fresh) - reuse))
                labels = []
                for _ in range(reuse):
                    labels.append(self._free.pop())
                for _ in range(len(fresh) - reuse):
                    labels.append(self._next_label)
                    self._next_label += 1
                lab_arr = np.asarray(labels, dtype=np.int64)
                if reuse:
                    # Revive exactly the freed labels' own slots, then overwrite their vectors
                    # in place. (hnswlib's replace_deleted=True fills *any* deleted slot and
                    # drops that slot's old label from its lookup table; with our own free
                    # list that orphans labels, and later get_items / mark_deleted raise
                    # "Label not found".)
                    for lab in labels[:reuse]:
                        self._index.unmark_deleted(lab)
                    self._index.add_items(mat[fresh[:reuse]], lab_arr[:reuse])
                if len(fresh) > reuse:
                    self._index.add_items(mat[fresh[reuse:]], lab_arr[reuse:])
                for r, lab in zip(fresh, labels):
                    self._label_of[ids[r]] = lab
                    self._id_of[lab] = ids[r]
                    self._payload[lab] = pls[r]
            self._version += 1

    def delete(self, ids: Sequence[Id]) -> int:
        ids = check_ids(ids)
        removed = 0
        with self._lock.write():
            for x in ids:
                lab = self._label_of.pop(x, None)
                if lab is None:
                    continue
                self._index.mark_deleted(lab)
                del self._id_of[lab]
                del self._payload[lab]
                self._free.append(lab)
                removed += 1
            if removed:
                self._version += 1
        return removed

    # -- reads ------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock.read():
            return len(self._label_of)

    def entries(self, field: str | None = None) -> list[tuple[Id, Any]]:
        with self._lock.read():
            if field is None:
                return [(ext, dict(self._payload[lab])) for ext, lab in self._label_of.items()]
            return [(ext, self._payload[lab].get(field)) for ext, lab in self._label_of.items()]

    def set_ef(self, ef: int) -> None:
        """Search breadth (recall vs speed); saved with the index."""
        if not isinstance(ef, int) or ef < 1:
            raise IndexInputError(f"ef must be an int >= 1, got {ef!r}")
        with self._lock.write():
            self.ef = ef
            self._index.set_ef(ef)

    def get(self, id: Id) -> tuple[np.ndarray, dict] | None:
        with self._lock.read():
            lab = self._label_of.get(id)
            if lab is None:
                return None
            return np.asarray(self._index.get_items([lab])[0], dtype=np.float32), dict(self._payload[lab])

    def _scores(self, distances: np.ndarray) -> np.ndarray:
        if self.metric == "l2":
            return np.sqrt(np.maximum(distances, 0))  # hnswlib returns squared L2
        return 1.0 - distances                        # cosine / ip distances are 1 - similarity

    def _matching(self, node: F.Node, key: str) -> dict:
        """The live items matching a filter: {"mask": bool per label, "labels",
        "vectors": their vectors once an exact search needed them}. Cached per
        filter until the next write: hnswlib's get_items costs ~15 us a vector,
        so repeated selective filters must not copy them again."""
        entry = self._filter_cache.get(key)
        if entry is not None and entry["version"] == self._version:
            return entry
        mask = np.zeros(max(self._next_label, 1), dtype=bool)
        for lab, payload in self._payload.items():
            if F.matches(node, payload):
                mask[lab] = True
        if len(self._filter_cache) >= 16:  # bounds the cached vectors to ~16 x exact_fraction of the index
            self._filter_cache.clear()
        entry = {"version": self._version, "mask": mask, "labels": np.flatnonzero(mask), "vectors": None}
        self._filter_cache[key] = entry
        return entry

    def _live(self) -> dict:
        """Every live item, as a ``_matching`` entry. Not cached: its vectors would be
        the whole index (the filter cache's bound assumes selective filters), and it
        serves only the rare search hnswlib's graph cannot answer."""
        labels = np.fromiter(sorted(self._id_of), dtype=np.int64, count=len(self._id_of))
        return {"version": self._version, "mask": None, "labels": labels, "vectors": None}

    def _exact(self, queries: np.ndarray, entry: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over a filter's matching items: (labels [q, k'], scores [q, k'])."""
        labels = entry["labels"]
        if entry["vectors"] is None:
            entry["vectors"] = np.asarray(self._index.get_items(labels), dtype=np.float32)  # normalised for cosine
        vecs = entry["vectors"]
        q = queries
        if self.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        if self.metric == "l2":
            d2 = (q * q).sum(1)[:, None] - 2 * q @ vecs.T + (vecs * vecs).sum(1)[None, :]
            scores = np.sqrt(np.maximum(d2, 0))
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        else:
            scores = q @ vecs.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return labels[order], np.take_along_axis(scores, order, axis=1)

    def search(self, vectors: Any, k: int, filter: dict | None = None,
               score_threshold: float | None = None) -> list[list[Hit]]:
        k = check_k(k)
        queries = as_matrix(vectors, self.dim, "query vectors")
        node = F.parse(filter)
        if score_threshold is not None and not np.isfinite(score_threshold):
            raise IndexInputError(f"score_threshold must be finite, got {score_threshold!r}")
        with self._lock.read():
            live = len(self._label_of)
            if live == 0:
                return [[] for _ in range(len(queries))]
            if node is None:
                kk = min(k, live)  # hnswlib searches with max(ef, k)
                try:
                    labels, dist = self._index.knn_query(queries, k=kk)
                    scores = self._scores(dist)
                except RuntimeError:
                    # hnswlib reached fewer than kk items: after in-place updates and
                    # deletions (duplicate vectors above all) parts of its graph can be
                    # unreachable, and a k near the live count asks for all of them.
                    labels, scores = self._exact(queries, self._live(), kk)
            else:
                entry = self._matching(node, json.dumps(filter, sort_keys=True))
                mask, n_allowed = entry["mask"], len(entry["labels"])
                if n_allowed == 0:
                    return [[] for _ in range(len(queries))]
                kk = min(k, n_allowed)
                if n_allowed <= max(self.exact_fraction * live, 4 * kk):
                    labels, scores = self._exact(queries, entry, kk)
                else:
                    try:
                        labels, dist = self._index.knn_query(queries, k=kk, filter=lambda lab: bool(mask[lab]))
                        scores = self._scores(dist)
                    except RuntimeError:  # hnswlib found fewer than kk passing items
                        labels, scores = self._exact(queries, entry, kk)
        return [self._hits(row_l, row_s, score_threshold) for row_l, row_s in zip(labels, scores)]

    def _hits(self, labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> list[Hit]:
        id_of, payload = self._id_of, self._payload
        keep_above = self.metric != "l2"  # similarity: keep >= threshold; L2 distance: keep <= threshold
        hits = []
        for lab, s in zip(labels.tolist(), scores.tolist()):
            ext = id_of.get(lab)
            if ext is None:
                continue
            if threshold is not None and (s < threshold if keep_above else s > threshold):
                continue
            hits.append(Hit(ext, s, dict(payload[lab])))
        return hits

    # -- persistence ------------------------------------------------------------------

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Writes a new snapshot and atomically points CURRENT at it."""
        root = Path(path) if path is not None else self.path
        if root is None:
            raise IndexInputError("save() needs a path (none was given to the constructor)")
        root.mkdir(parents=True, exist_ok=True)
        name = f"snapshot-{uuid.uuid4().hex[:12]}"
        tmp = root / (name + ".partial")
        with self._lock.read():
            tmp.mkdir()
            self._index.save_index(str(tmp / "index.bin"))
            meta = {
                "format": _FORMAT, "dim": self.dim, "metric": self.metric, "M": self.M,
                "ef_construction": self.ef_construction, "ef": self.ef, "exact_fraction": self.exact_fraction,
                "capacity": self._index.get_max_elements(), "next_label": self._next_label, "free": self._free,
                "items": [[lab, self._id_of[lab], self._payload[lab]] for lab in sorted(self._id_of)],
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, root / name)
        pointer = root / f"CURRENT.{uuid.uuid4().hex[:8]}.tmp"
        with open(pointer, "w") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, root / "CURRENT")  # the commit point
        dirfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        for old in root.iterdir():  # older snapshots and leftovers of crashed saves
            if old.name != name and (old.name.startswith("snapshot-") or old.name.startswith("CURRENT.")):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        self.path = root
        return root

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HnswIndex":
        hnswlib = import_extra("hnswlib", "search", "the hnsw vector index")

        root = Path(path)
        try:
            name = (root / "CURRENT").read_text().strip()
            snap = root / name
            meta = json.loads((snap / "meta.json").read_text())
            if meta.get("format") != _FORMAT:
                raise CorruptIndexError(f"{root}: unknown index format {meta.get('format')!r}")
            self = cls(int(meta["dim"]), meta["metric"], path=root, M=meta["M"],
                       ef_construction=meta["ef_construction"], ef=meta["ef"],
                       exact_fraction=meta.get("exact_fraction", 0.05))
            self._index = hnswlib.Index(space=_SPACE[self.metric], dim=self.dim)
            self._index.load_index(str(snap / "index.bin"), max_elements=int(meta["capacity"]),
                                   allow_replace_deleted=True)
            self._index.set_ef(self.ef)
            self._next_label = int(meta["next_label"])
            self._free = [int(x) for x in meta["free"]]
            for lab, ext, payload in meta["items"]:
                self._label_of[ext] = int(lab)
                self._id_of[int(lab)] = ext
                self._payload[int(lab)] = payload
        except CorruptIndexError:
            raise
        except FileNotFoundError as exc:
            raise CorruptIndexError(f"{root} is not a tallow HNSW index (missing {exc.filename})") from exc
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CorruptIndexError(f"{root}: the index cannot be loaded ({type(exc).__name__}: {exc})") from exc
        if self._index.get_current_count() - len(self._free) != len(self._label_of):
            raise CorruptIndexError(f"{root}: index.bin and meta.json disagree on the number of items")
        return self
