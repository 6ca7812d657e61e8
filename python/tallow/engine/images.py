"""Image similarity search: bytes -> preprocess -> ResNet features -> HNSW
search -> metadata from libSQL (the pipeline behind ``POST /v1/images`` and
``POST /v1/images/search``). ``ImageSearch`` is the front; input checks live
in ``image_input``, the model and its features (and their caches) in
``image_features``, the index lifecycle in ``derived_index``.

Storage model (the same as ``engine`` uses for text chunks): the libSQL store
is the source of truth — ``store.put_image`` writes an image's row (id,
SHA-256 of its bytes, payload, size) and its L2-normalised feature in one
transaction. The cosine HNSW index under ``<data_dir>/image_index`` is a
``DerivedIndex`` of it: entries carry the content hash (SHA-256 + payload),
so a crash between the store write and the index write loses nothing, and a
corrupt index directory is moved aside and rebuilt (``IndexRebuiltWarning``).
Search hits whose row has gone from the store are dropped. A failed call
writes nothing.

Thread safety: searches run concurrently with each other and with writes (the
index has a readers/writer lock, the store its own lock); writes (add, delete,
save, reconcile) are serialised by the DerivedIndex's lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..index import filters as F
from ..index.base import IndexInputError, check_k
from .derived_index import HASH_KEY, DerivedIndex, model_identity
from .image_features import MODEL_FILE, ImageFeatures, ImageSearchError
from .image_input import (FORMATS, KINDS, MAX_ID_CHARS, MAX_PAYLOAD_BYTES, RESERVED_PREFIX, ImageInputError,
                          check_data, check_id, check_payload, check_threshold, probe)

__all__ = ["FORMATS", "HASH_KEY", "INDEX_DIR", "KINDS", "MAX_ID_CHARS", "MAX_PAYLOAD_BYTES", "MODEL_FILE",
           "RESERVED_PREFIX", "ImageInputError", "ImageSearch", "ImageSearchError", "check_data", "check_id",
           "check_payload", "model_identity", "probe"]

INDEX_DIR = "image_index"
_MODES = ("exact", "fast")


def _entry_hash(sha256: str, payload: dict) -> str:
    """What an index entry must match in the store to be current."""
    canon = json.dumps([sha256, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def _check_search(data: Any, k: Any, filter: Any, score_threshold: Any) -> tuple[bytes, int]:
    """A search's arguments (the index's and the filter language's errors
    re-raised as ``ImageInputError``); returns (data, k)."""
    data = check_data(data)
    try:
        k = check_k(k)
    except IndexInputError as exc:
        raise ImageInputError(str(exc)) from None
    try:
        F.parse(filter)
    except F.FilterError as exc:
        raise ImageInputError(f"filter: {exc}") from None
    check_threshold(score_threshold)
    return data, k


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class ImageSearch:
    """Stores images with payloads and finds the stored images most similar to
    a query image (cosine similarity of L2-normalised ResNet features).

    - ``data_dir``: holds ``image_index/`` (the HNSW snapshots) and
      ``image_model.json`` (the tag of the model the stored features came from).
    - ``store``: a ``tallow.store.MetadataStore`` (shared with the text engine;
      not closed by ``close()``), or a path to open one (then owned and closed).
    - ``model``: a loaded tallow ResNet (``tallow.models.load``) or a path,
      loaded on first use.
    - ``cache``: a feature cache (``get``/``put``), None for none.
    - ``max_megapixels``: larger images are refused from their header.
    - ``ef``: HNSW search breadth; ``save_every``: index snapshot every n writes.
    - ``preprocess_mode``: ``"exact"`` or ``"fast"`` (JPEG DCT-domain
      downscaling of big photos, see ``tallow.ops.preprocess``).
    - ``model_tag``: the model's identity for the cache and the store check;
      by default a hash of its weights (~0.1 s for ResNet-50, once).
    """

    def __init__(self, data_dir: str | os.PathLike, store: Any, model: Any, *, cache: Any = None,
                 max_megapixels: float = 40.0, ef: int = 64, save_every: int = 1000,
                 preprocess_mode: str = "exact", model_tag: str | None = None):
        if isinstance(max_megapixels, bool) or not isinstance(max_megapixels, (int, float)) \
                or not math.isfinite(max_megapixels) or max_megapixels <= 0:
            raise ValueError(f"max_megapixels must be a number > 0, got {max_megapixels!r}")
        if isinstance(ef, bool) or not isinstance(ef, int) or ef < 1:
            raise ValueError(f"ef must be an int >= 1, got {ef!r}")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
        if preprocess_mode not in _MODES:
            raise ValueError(f"preprocess_mode must be one of {_MODES}, got {preprocess_mode!r}")
        if model_tag is not None and (not isinstance(model_tag, str) or not model_tag):
            raise ValueError(f"model_tag must be a non-empty str or None, got {model_tag!r}")
        if model is None:
            raise ValueError("model is required: a loaded tallow ResNet or the path of a checkpoint")
        if cache is not None and not (callable(getattr(cache, "get", None)) and callable(getattr(cache, "put", None))):
            raise ValueError(f"cache must have get(key) and put(key, value), got {type(cache).__name__}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.max_megapixels = float(max_megapixels)
        self.ef = ef
        self.save_every = save_every
        self.preprocess_mode = preprocess_mode
        self.cache = cache
        self._closed = False
        self._owns_store = False
        if isinstance(store, (str, os.PathLike)):
            from ..store import MetadataStore

            store = MetadataStore(store)
            self._owns_store = True
        for name in ("put_image", "get_images", "delete_image", "iter_image_features", "image_by_sha"):
            if not callable(getattr(store, name, None)):
                raise ValueError(f"store must be a tallow.store.MetadataStore (no {name}()), got "
                                 f"{type(store).__name__}")
        self.store = store
        self._feat = ImageFeatures(self.data_dir, store, model, cache=cache, max_megapixels=self.max_megapixels,
                                   preprocess_mode=preprocess_mode, model_tag=model_tag)
        self._derived = DerivedIndex(self._new_index, snapshot=self.data_dir / INDEX_DIR, store_path=store.path,
                                     save_every=save_every, what="image index", on_load=self._set_ef)
        try:
            if self._derived.open(self.store.stats()["image_feature_dim"]):
                self._reconcile()
            if self._feat._model is not None:
                self._feat.bind(self._feat._model)
        except BaseException:
            if self._owns_store:
                self.store.close()
            raise

    # -- model ---------------------------------------------------------------------------

    @property
    def model(self):
        """The model, loaded on first use when a path was given."""
        return self._feat.model

    @property
    def _model(self):
        """The model if loaded (None before a path is loaded)."""
        return self._feat._model

    @property
    def model_tag(self) -> str:
        return self._feat.model_tag

    @property
    def dim(self) -> int | None:
        """Feature width: the model's, or the stored features' before the model is loaded."""
        if self._feat._dim is not None:
            return self._feat._dim
        return self._derived.index.dim if self._derived.index is not None else None

    def features(self, images: Sequence[bytes]) -> tuple[np.ndarray, list[bool]]:
        """L2-normalised float32 features [n, dim] of encoded images, and which
        came from a cache (the feature cache or the store)."""
        self._check_open()
        if isinstance(images, (bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
            raise ImageInputError(f"images must be a list of encoded images, got {type(images).__name__}",
                                  param="image")
        names = [f"image {i}" for i in range(len(images))]
        datas = [check_data(d, name) for d, name in zip(images, names)]
        if not datas:
            self.model  # noqa: B018 (its width)
            return np.zeros((0, self._feat._dim), dtype=np.float32), []
        vecs, cached, *_ = self._feat.compute(datas, names)
        return vecs, cached

    # -- index ---------------------------------------------------------------------------

    def _new_index(self, dim: int):
        from ..index import HnswIndex

        return HnswIndex(dim, "cosine", path=self.data_dir / INDEX_DIR, ef=self.ef)

    def _set_ef(self, idx) -> None:
        if idx.ef != self.ef:  # ef is not saved with a snapshot
            idx.set_ef(self.ef)

    def _ensure_index(self) -> None:
        """Before a write: an index of the model's width (caller holds the write lock)."""
        dim = self._feat._dim
        idx = self._derived.index
        if idx is None:
            self._derived.create(dim)
        elif idx.dim != dim:
            if idx.count():
                raise ImageSearchError(f"the image index holds {idx.dim}-d vectors, the model produces "
                                       f"{dim}-d features")
            self._derived.create(dim)  # an empty leftover of another model

    def _reconcile(self) -> dict:
        """Makes the index match the store (caller holds the write lock)."""
        rows_by_id: dict[str, dict] = {}

        def batches():
            for ids, _ in self.store.iter_image_features(batch=512):
                rows = self.store.get_images(ids)  # payload and sha256 (rows deleted meanwhile are left out)
                rows_by_id.clear()
                rows_by_id.update((r["id"], r) for r in rows)
                if rows:
                    yield ([r["id"] for r in rows], [_entry_hash(r["sha256"], r["payload"]) for r in rows],
                           np.stack([r["feature"] for r in rows]))

        return self._derived.reconcile(batches(), lambda ids: {x: rows_by_id[x]["payload"] for x in ids})

    def reconcile(self) -> dict:
        """Brings the index up to date with the store (e.g. after the store's
        ``sync()`` pulled another node's images). Returns {"added", "deleted"}."""
        self._check_open()
        with self._derived.lock:
            if self._derived.index is None:
                dim = self.store.stats()["image_feature_dim"]
                if dim is None:
                    return {"added": 0, "deleted": 0}
                self._derived.create(dim)
            return self._reconcile()

    # -- writes --------------------------------------------------------------------------

    def add(self, id: str, data: bytes, payload: dict | None = None) -> dict:
        """Stores an image (replacing one with the same id). Returns {id,
        sha256, width, height, dim, cached, timing_ms: {preprocess, inference,
        store, index, total}}."""
        res = self.add_many([(id, data, payload)])
        out = res["images"][0]
        out["timing_ms"] = res["timing_ms"]
        return out

    def add_many(self, items: Iterable[Sequence], batch_size: int = 32) -> dict:
        """Stores many images: items are (id, data) or (id, data, payload).
        Everything is checked and every feature computed before anything is
        written; inference runs in batches of ``batch_size``. Returns
        {"images": [{id, sha256, width, height, dim, cached}...], "timing_ms":
        {preprocess, inference, store, index, total}} (for the whole call)."""
        t0 = time.perf_counter()
        self._check_open()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ImageInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        ids, datas, payloads = [], [], []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ImageInputError(f"item {i} must be (id, data) or (id, data, payload), got "
                                      f"{type(item).__name__}")
            id = check_id(item[0])
            datas.append(check_data(item[1], f"image {id!r}"))
            payloads.append(check_payload(item[2] if len(item) == 3 else None, id))
            ids.append(id)
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise ImageInputError(f"image id {dup!r} appears more than once in one call", param="image")
        if not ids:
            return {"images": [], "timing_ms": {"preprocess": 0.0, "inference": 0.0, "store": 0.0, "index": 0.0,
                                                "total": _ms(time.perf_counter() - t0)}}
        vecs, cached, shas, sizes, timing = self._feat.compute(datas, [f"image {x!r}" for x in ids], batch_size)
        t_store = t_index = 0.0
        with self._derived.lock:
            self._check_open()
            self._ensure_index()
            self._feat.write_model_file()
            for j, id in enumerate(ids):
                t1 = time.perf_counter()
                w, h = sizes[j]
                self.store.put_image(id, shas[j], payloads[j], w, h, vecs[j])
                t2 = time.perf_counter()
                self._derived.index.upsert([id], vecs[j:j + 1], [{**payloads[j], HASH_KEY: _entry_hash(shas[j], payloads[j])}])
                t3 = time.perf_counter()
                t_store += t2 - t1
                t_index += t3 - t2
            self._derived.wrote(len(ids))
        images = [{"id": id, "sha256": shas[j], "width": sizes[j][0], "height": sizes[j][1], "dim": self._feat._dim,
                   "cached": cached[j]} for j, id in enumerate(ids)]
        return {"images": images, "timing_ms": {
            "preprocess": _ms(timing["preprocess"]), "inference": _ms(timing["inference"]), "store": _ms(t_store),
            "index": _ms(t_index), "total": _ms(time.perf_counter() - t0)}}

    def delete(self, id: str) -> bool:
        """Removes an image (store first, then index); False when it did not exist."""
        self._check_open()
        id = check_id(id)
        with self._derived.lock:
            self._check_open()
            existed = self.store.delete_image(id)
            idx = self._derived.index
            removed = idx.delete([id]) if idx is not None else 0
            if removed:
                self._derived.wrote()
        return bool(existed or removed)

    # -- reads ---------------------------------------------------------------------------

    def search(self, data: bytes, k: int = 10, filter: dict | None = None,
               score_threshold: float | None = None) -> dict:
        """The k stored images most similar to ``data`` (cosine similarity of
        features, best first). ``filter``: tallow's filter syntax over the
        payloads; ``score_threshold``: minimum similarity. Returns {"hits":
        [{id, score, sha256, width, height, payload}...], "timing_ms":
        {preprocess, inference, search, metadata, total}, "cached"}."""
        t0 = time.perf_counter()
        self._check_open()
        data, k = _check_search(data, k, filter, score_threshold)
        # Features even when nothing is stored: bad images fail the same way always.
        vecs, cached, _, _, timing = self._feat.compute([data], ["image"])
        result = self._hits(vecs, k, filter, score_threshold)
        result["cached"] = cached[0]
        result["timing_ms"] = {"preprocess": _ms(timing["preprocess"]), "inference": _ms(timing["inference"]),
                               **result["timing_ms"], "total": _ms(time.perf_counter() - t0)}
        return result

    def _hits(self, vec: np.ndarray, k: int, filter: dict | None, score_threshold: float | None) -> dict:
        """Index search + metadata for one feature vector [1, dim]."""
        t1 = time.perf_counter()
        idx = self._derived.index
        hits = idx.search(vec, k, filter, score_threshold)[0] if idx is not None else []
        t2 = time.perf_counter()
        rows = {r["id"]: r for r in self.store.get_images([str(h.id) for h in hits])} if hits else {}
        out = []
        for h in hits:
            r = rows.get(str(h.id))
            if r is None:  # deleted from the store after the index answered
                continue
            out.append({"id": r["id"], "score": float(h.score), "sha256": r["sha256"], "width": r["width"],
                        "height": r["height"], "payload": r["payload"]})
        t3 = time.perf_counter()
        return {"hits": out, "timing_ms": {"search": _ms(t2 - t1), "metadata": _ms(t3 - t2)}}

    def search_many(self, queries: Sequence[dict]) -> list:
        """Several searches with ONE batched preprocess + ResNet forward (the
        server's dynamic batching). ``queries``: dicts of ``search``'s
        arguments (data, k, filter, score_threshold). Returns per query the
        ``search`` result or the exception that query alone raised; the
        stage timings are the batch's, with ``batch_size`` added."""
        self._check_open()
        checked: list = []
        for q in queries:  # argument errors fail only their own query
            try:
                thr = q.get("score_threshold")
                data, k = _check_search(q.get("data"), q.get("k", 10), q.get("filter"), thr)
                probe(data, self.max_megapixels)
                checked.append((data, k, q.get("filter"), thr))
            except Exception as exc:
                checked.append(exc)
        good = [i for i, c in enumerate(checked) if not isinstance(c, Exception)]
        if len(good) < 2:
            return [c if isinstance(c, Exception) else self._search_one(*c) for c in checked]
        t0 = time.perf_counter()
        try:
            vecs, cached, _, _, timing = self._feat.compute([checked[i][0] for i in good],
                                                        [f"image {i}" for i in good])
        except ImageInputError:  # a body that decodes badly: isolate it by running one at a time
            return [c if isinstance(c, Exception) else self._search_one(*c) for c in checked]
        out: list = list(checked)
        for row, i in enumerate(good):
            _, k, flt, thr = checked[i]
            result = self._hits(vecs[row:row + 1], k, flt, thr)
            result["cached"] = cached[row]
            result["timing_ms"] = {"preprocess": _ms(timing["preprocess"]), "inference": _ms(timing["inference"]),
                                   **result["timing_ms"], "total": _ms(time.perf_counter() - t0),
                                   "batch_size": len(good)}
            out[i] = result
        return out

    def _search_one(self, data, k, filter, score_threshold) -> dict:
        try:
            return self.search(data, k, filter, score_threshold)
        except Exception as exc:
            return exc

    def get(self, id: str) -> dict | None:
        """An image's row {id, sha256, width, height, payload}, or None."""
        self._check_open()
        rows = self.store.get_images([check_id(id)])
        if not rows:
            return None
        r = rows[0]
        return {k: r[k] for k in ("id", "sha256", "width", "height", "payload")}

    def count(self) -> int:
        """Stored images (the store is the source of truth)."""
        self._check_open()
        return self.store.image_count()

    def stats(self) -> dict:
        self._check_open()
        return {"images": self.store.image_count(),
                "indexed": self._derived.index.count() if self._derived.index is not None else 0,
                "dim": self.dim, "model_tag": self._feat._tag, "data_dir": str(self.data_dir),
                "max_megapixels": self.max_megapixels, "ef": self.ef, "cache": self.cache is not None}

    # -- lifecycle -----------------------------------------------------------------------

    def save(self) -> None:
        """Snapshots the index now (atomically) if anything changed since the last save."""
        self._check_open()
        self._derived.save()

    def _check_open(self) -> None:
        if self._closed:
            raise ImageSearchError("the image search is closed")

    def close(self) -> None:
        """Saves and closes the index; closes the store only if this object opened it."""
        with self._derived.lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._derived.close()
            finally:
                if self._owns_store:
                    self.store.close()

    def __enter__(self) -> "ImageSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
