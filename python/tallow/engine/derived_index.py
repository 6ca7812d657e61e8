"""A vector index derived from the libSQL store, and the identity of the
model whose vectors it holds: the lifecycle the text engine and image search
share (load the last snapshot or quarantine a corrupt one, reconcile against
the store, save every ``save_every`` writes, serialise writes with one lock).

The store is the source of truth; every index entry carries the content hash
of what it was made from (payload field ``HASH_KEY``). ``reconcile`` makes the
index match the store whatever step a crash interrupted: entries missing or
carrying another hash are (re)added from the stored vectors, entries the store
no longer has are deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

HASH_KEY = "_tallow_hash"  # index payload field: the content hash the entry was made from
_MISSING = object()


class IndexRebuiltWarning(RuntimeWarning):
    """The vector index could not be loaded and was rebuilt from the store."""


def model_identity(model: Any) -> str:
    """Names a model by what decides its vectors: ``"<architecture>-<16 hex>"``,
    a SHA-256 of its repr (architecture, widths, quantization), its embedding
    settings (pooling, normalize) when it has them, and every byte of every
    parameter and buffer. A model that is not a torch module can name itself
    with a str attribute ``identity``.

    One scheme for text and image models. The full weight hash (not a sample
    of each tensor) is chosen because it cannot call two different models the
    same — a fine-tune that moves a few weights is caught — and it costs about
    0.1 s per 100 MB of weights, once per engine. Data-dir compatibility:
    image tags are unchanged (this is the scheme ``image_model.json`` has
    always recorded); text content hashes made before (with the sampled
    ``embedder_identity``) differ, so re-ingesting an unchanged document
    re-embeds it once (counted as "updated"); search and reconcile are not
    affected (they compare the store's own hashes)."""
    precomputed = getattr(model, "precomputed_identity", None)
    if isinstance(precomputed, str) and precomputed:  # a served model: computed where its weights are
        return precomputed
    explicit = getattr(model, "identity", None)
    if isinstance(explicit, str) and explicit:
        return "explicit:" + explicit
    is_module = callable(getattr(model, "named_parameters", None))
    cls = type(model)
    # Not a torch module: its repr may hold a memory address; name its class and config instead.
    h = hashlib.sha256((repr(model) if is_module else json.dumps(
        [f"{cls.__module__}.{cls.__qualname__}", getattr(model, "config", None)], default=repr)).encode())
    settings = {a: getattr(model, a) for a in ("pooling", "normalize") if hasattr(model, a)}
    if settings:  # embedders only: image models hash as they always have
        h.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    if is_module:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{getattr(model, 'architecture', type(model).__name__)}-{h.hexdigest()[:16]}"


def load_snapshot(root: Path, *, dim: int | None, store_path: Any, what: str = "index",
                  metric: str | None = None):
    """The HNSW snapshot saved under ``root``, or None: when no save ever
    completed (no CURRENT: a crash during the first one), or when it is
    corrupt or of another shape — then it is moved aside to
    ``<root>.corrupt-<time>`` with an ``IndexRebuiltWarning`` and the index is
    rebuilt from the store."""
    from ..index import CorruptIndexError, HnswIndex

    if not (root / "CURRENT").exists():
        return None
    try:
        idx = HnswIndex.load(root)
        if metric is not None and idx.metric != metric:
            raise CorruptIndexError(f"{root} is a {idx.metric} index, {metric} is needed")
        if dim is not None and idx.dim != dim:
            raise CorruptIndexError(f"{root} holds {idx.dim}-d vectors, the store {dim}-d")
        return idx
    except CorruptIndexError as exc:
        aside = root.with_name(f"{root.name}.corrupt-{int(time.time())}")
        shutil.move(str(root), str(aside))
        warnings.warn(IndexRebuiltWarning(f"{exc}; moved to {aside} and rebuilding the {what} from {store_path}"),
                      stacklevel=5)
        return None


# One batch of the store's current contents for ``reconcile``: ids, their
# content hashes, their vectors [n, dim].
StoreBatch = tuple[list[str], list[Any], np.ndarray]


class DerivedIndex:
    """The index (``self.index``, None until the first vector is known) of
    one kind of stored item, with its snapshot, reconcile and save policy.

    - ``new_index(dim)``: makes an empty index of that width.
    - ``snapshot``: the HNSW snapshot directory, or None for backends that
      persist on every write (Qdrant, libSQL vectors).
    - ``on_load(index)``: settings a loaded snapshot does not keep (HNSW's ef).
    - ``lock``: writes (the owner's ingest / add / delete, and reconcile,
      save, close here) hold it; it is re-entrant so an owner's write can
      reconcile inside it. Searches do not take it: the index has its own
      readers/writer lock and the store its own.
    """

    def __init__(self, new_index: Callable[[int], Any], *, snapshot: Path | None, store_path: Any,
                 save_every: int = 1000, what: str = "index", on_load: Callable[[Any], None] | None = None):
        self._new_index = new_index
        self.snapshot = snapshot
        self.store_path = store_path
        self.save_every = save_every
        self.what = what
        self._on_load = on_load
        self.index = None
        self.unsaved = 0
        self.lock = threading.RLock()

    def open(self, dim: int | None) -> bool:
        """Loads the snapshot (or starts an empty index when the store's width
        is known). True when there is an index to reconcile."""
        with self.lock:
            if self.snapshot is not None:
                self.index = load_snapshot(self.snapshot, dim=dim, store_path=self.store_path, what=self.what,
                                           metric="cosine")
                if self.index is not None and self._on_load is not None:
                    self._on_load(self.index)
            if self.index is None and dim is not None:
                self.index = self._new_index(dim)
            return self.index is not None

    def create(self, dim: int):
        """Replaces the index with an empty one of width ``dim`` (caller holds the lock)."""
        self.index = self._new_index(dim)
        return self.index

    def entries(self) -> dict[str, Any]:
        """{id: content hash} of everything in the index (one consistent snapshot)."""
        if self.index is None:
            return {}
        return {str(ext): h for ext, h in self.index.entries(HASH_KEY)}

    def reconcile(self, batches: Iterable[StoreBatch], payloads: Callable[[list[str]], dict[str, dict]]) -> dict:
        """Makes the index match the store. ``batches``: everything the store
        holds; ``payloads(ids)``: {id: filter payload} of the ids that must be
        (re)added (ids the store no longer has are left out, and skipped).
        Saves when anything changed. Returns {"added": n, "deleted": n}."""
        with self.lock:
            entries = self.entries()
            seen: set[str] = set()
            added = 0
            for ids, hashes, vecs in batches:
                seen.update(ids)
                todo = [r for r, (x, h) in enumerate(zip(ids, hashes)) if entries.get(x, _MISSING) != h]
                if not todo:
                    continue
                got = payloads([ids[r] for r in todo])
                keep = [r for r in todo if ids[r] in got]
                if keep:
                    self.index.upsert([ids[r] for r in keep], np.asarray(vecs)[keep],
                                      [{**got[ids[r]], HASH_KEY: hashes[r]} for r in keep])
                    added += len(keep)
            stale = [x for x in entries if x not in seen]
            deleted = self.index.delete(stale) if stale else 0
            if added or deleted:
                self.index.save()  # HNSW: atomic snapshot; the others persist on every write
                self.unsaved = 0
            return {"added": added, "deleted": deleted}

    def wrote(self, n: int = 1) -> None:
        """Counts writes; saves a snapshot every ``save_every`` of them (caller holds the lock)."""
        self.unsaved += n
        if self.unsaved >= self.save_every:
            self.save()

    def save(self) -> None:
        """Snapshots the index now if anything changed since the last save."""
        with self.lock:
            if self.index is not None and self.unsaved:
                self.index.save()
            self.unsaved = 0

    def close(self) -> None:
        """Saves and closes the index."""
        with self.lock:
            if self.index is not None:
                self.save()
                self.index.close()
