"""Image similarity search: bytes -> preprocess -> ResNet features -> HNSW
search -> metadata from libSQL (the pipeline behind ``POST /v1/images`` and
``POST /v1/images/search``).

Storage model (the same as ``engine`` uses for text chunks)
-----------------------------------------------------------
The libSQL metadata store is the source of truth: ``store.put_image`` writes
an image's row (id, SHA-256 of its bytes, payload, size) and its L2-normalised
feature vector in one transaction. The cosine HNSW index under
``<data_dir>/image_index`` is derived from it and saved atomically (every
``save_every`` writes, on ``save()`` and on ``close()``). On open the last
snapshot is loaded and *reconciled* with the store: images missing from the
index, or whose index entry carries another content hash (SHA-256 + payload),
are (re)added from the stored features; index entries without a row are
deleted. A crash between the store write and the index write therefore loses
nothing, and a corrupt index directory is moved aside and rebuilt from the
store (``IndexRebuiltWarning``). Search hits whose row has gone from the store
are dropped.

Features are cached by the SHA-256 of the encoded bytes, in two places:

- ``cache`` (anything with ``get(key) -> ndarray | None`` and ``put(key,
  value)``, e.g. ``tallow.cache.FeatureCache``), keyed ``"<model tag>:<sha>"``
  so two models never share features. A failing cache (Redis gone) is a miss,
  never an error.
- the store itself: an image already stored with the same bytes reuses its
  feature, but only when ``<data_dir>/image_model.json`` says the stored
  features came from this model (the store records no model, and features of
  two models with the same width are silently incomparable). Opening a store
  whose images were indexed by another model raises ``ImageSearchError``.

Bad input raises ``ImageInputError`` (a ValueError) with ``kind``:
``"unsupported"`` (not an image in a supported format: the server's 415),
``"too_large"`` (above ``max_megapixels``, read from the header before any
decoding) or ``"invalid"`` (truncated/corrupt data, bad id, payload, k,
filter...: 422). A failed call writes nothing.

Thread safety: searches run concurrently with each other and with writes (the
index has a readers/writer lock, the store its own lock); writes (add, delete,
save, reconcile) are serialised by this object's lock.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..index import filters as F
from ..index.base import IndexInputError, check_k
from .engine import load_snapshot

log = logging.getLogger(__name__)

HASH_KEY = "_tallow_hash"  # index payload field: the entry's content hash (as the text engine's)
RESERVED_PREFIX = "_tallow"
MAX_ID_CHARS = 256
# Payloads live in the index's memory and its snapshot as well as in the store:
# bound them so one client cannot bloat every later save.
MAX_PAYLOAD_BYTES = 64 * 1024
# Formats Image.open may pick. Restricting them matters for a server: Pillow's
# EPS plugin runs Ghostscript, and other exotic decoders widen the attack surface.
# (MPO, multi-picture JPEG, is opened by the JPEG plugin and needs no entry.)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
INDEX_DIR = "image_index"
MODEL_FILE = "image_model.json"
KINDS = ("unsupported", "too_large", "invalid")
_MODES = ("exact", "fast")


class ImageInputError(InputError):
    """Bad input: ``kind`` is "unsupported" (415), "too_large" or "invalid" (422);
    ``param`` is "image" when the image (its data, id or payload) is at fault."""

    def __init__(self, message: str, kind: str = "invalid", *, param: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"ImageInputError kind must be one of {KINDS}, got {kind!r}")
        super().__init__(message, param=param, kind=kind)


class ImageSearchError(RuntimeError):
    """The pipeline cannot run: closed, a model that does not fit the stored features, ..."""


# -------------------------------------------------------------------- input checks


def check_id(id: Any) -> str:
    if not isinstance(id, str):
        raise ImageInputError(f"image id must be a str, got {type(id).__name__}", param="image")
    if not id:
        raise ImageInputError("image id is empty", param="image")
    if len(id) > MAX_ID_CHARS:
        raise ImageInputError(f"image id is {len(id)} characters long, the limit is {MAX_ID_CHARS}", param="image")
    if any(ord(c) < 32 or ord(c) == 127 for c in id):
        # Ids end up in URLs (DELETE /v1/images/{id}) and logs.
        raise ImageInputError(f"image id {id!r} contains control characters", param="image")
    return id


def check_payload(payload: Any, id: str) -> dict:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ImageInputError(f"image {id!r}: payload must be a JSON object (dict), got {type(payload).__name__}", param="image")
    for key in payload:
        if not isinstance(key, str):
            raise ImageInputError(f"image {id!r}: payload keys must be str, got {key!r}", param="image")
        if key.startswith(RESERVED_PREFIX):
            raise ImageInputError(f"image {id!r}: payload key {key!r} is reserved (keys starting with "
                                  f"{RESERVED_PREFIX!r} are tallow's own)", param="image")
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ImageInputError(f"image {id!r}: payload is not JSON-serialisable: {exc}", param="image") from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise ImageInputError(f"image {id!r}: payload is {len(text.encode())} bytes as JSON, the limit is "
                              f"{MAX_PAYLOAD_BYTES}", param="image")
    return json.loads(text)  # a deep copy in canonical JSON types (tuples -> lists)


def check_data(data: Any, what: str = "image") -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageInputError(f"{what}: expected encoded image bytes, got {type(data).__name__}", param="image")
    if not data:
        raise ImageInputError(f"{what}: the image data is empty", param="image")
    return data


def probe(data: bytes, max_megapixels: float, what: str = "image") -> tuple[int, int, str]:
    """(width, height, format) from the header alone (Image.open does not
    decode pixels), so an oversized image is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (~179 MP raises; the warning only under -W error).
        raise ImageInputError(f"{what}: too large ({exc})", "too_large", param="image") from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{what}: not an image in a supported format (supported: {', '.join(FORMATS)}; "
                              f"got {len(data)} bytes starting {data[:8]!r})", "unsupported", param="image") from None
    except Exception as exc:  # a recognised header Pillow then cannot parse
        raise ImageInputError(f"{what}: corrupt image header: {type(exc).__name__}: {exc}", param="image") from None
    w, h = img.size
    fmt = img.format
    img.close()
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{what}: the image is empty ({w}x{h})", param="image")
    if w * h > max_megapixels * 1e6:
        raise ImageInputError(f"{what}: {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
                              f"{max_megapixels:g} megapixels", "too_large", param="image")
    return w, h, fmt


def _entry_hash(sha256: str, payload: dict) -> str:
    """What an index entry must match in the store to be current."""
    canon = json.dumps([sha256, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def model_identity(model: Any) -> str:
    """A tag that differs between models whose features differ: architecture,
    width, quantization (the repr) and a hash of every parameter and buffer."""
    h = hashlib.sha256(repr(model).encode())
    named = getattr(model, "named_parameters", None)
    if named is not None:
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return f"{getattr(model, 'architecture', type(model).__name__)}-{h.hexdigest()[:16]}"


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


# -------------------------------------------------------------------- the pipeline


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
        self._model_spec = model
        self._model = None if isinstance(model, (str, os.PathLike)) else model
        self._tag_override = model_tag
        self._tag: str | None = None
        self._dim: int | None = None
        self._store_features_ok = False  # may the store's features be reused as a cache (same model)?
        self._model_file_ok = False       # does image_model.json name this model?
        self._model_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._index = None
        self._unsaved = 0
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
        try:
            with self._write_lock:
                self._open_index(self.store.stats()["image_feature_dim"])
            if self._model is not None:
                self._bind_model(self._model)
        except BaseException:
            if self._owns_store:
                self.store.close()
            raise

    # -- model ---------------------------------------------------------------------------

    @property
    def model(self):
        """The model, loaded on first use when a path was given."""
        if self._model is None or self._tag is None:
            with self._model_lock:
                if self._model is None:
                    from ..models import load

                    self._model = load(self._model_spec)
                if self._tag is None:
                    self._bind_model(self._model)
        return self._model

    @property
    def model_tag(self) -> str:
        self.model  # noqa: B018 (loads it)
        return self._tag

    @property
    def dim(self) -> int | None:
        """Feature width: the model's, or the stored features' before the model is loaded."""
        if self._dim is not None:
            return self._dim
        return self._index.dim if self._index is not None else None

    def _bind_model(self, model: Any) -> None:
        """Checks the model against the stored features; sets dim and tag."""
        if not callable(getattr(model, "features", None)):
            raise ImageSearchError(f"the image model must have features(x) (a tallow ResNet), got "
                                   f"{type(model).__name__}")
        cfg = getattr(model, "config", None)
        sizes = getattr(cfg, "hidden_sizes", None)
        if not sizes:
            raise ImageSearchError(f"cannot tell the feature width of {type(model).__name__}: it has no "
                                   "config.hidden_sizes (a tallow ResNet has)")
        dim = int(sizes[-1])
        stored = self.store.stats()["image_feature_dim"]
        if stored is not None and stored != dim:
            raise ImageSearchError(f"the model produces {dim}-d features but {self.store.path} holds {stored}-d "
                                   "image features (another model?): use another data_dir or delete the images")
        tag = self._tag_override or model_identity(model)
        recorded = self._read_model_file()
        n_images = self.store.image_count()
        if recorded is not None and recorded != tag and n_images:
            raise ImageSearchError(self._mismatch(recorded, tag, n_images))
        # Stored features double as a cache only when we know which model made them.
        self._store_features_ok = recorded == tag or (recorded is None and n_images == 0)
        self._model_file_ok = recorded == tag
        self._dim, self._tag = dim, tag

    def _mismatch(self, recorded: str, tag: str, n_images: int) -> str:
        return (f"the {n_images} images in {self.store.path} were indexed with model {recorded!r}, this model is "
                f"{tag!r}: their features are not comparable. Use another data_dir, load the same model, or delete "
                f"the images and add them again ({self.data_dir / MODEL_FILE} records the model)")

    def _read_model_file(self) -> str | None:
        path = self.data_dir / MODEL_FILE
        try:
            return str(json.loads(path.read_text())["model_tag"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unknown provenance: stored features are not reused until the file is rewritten
            # (which happens only while the store holds no images).
            warnings.warn(f"{path} is unreadable ({exc}); stored image features will not be reused as a cache",
                          RuntimeWarning, stacklevel=3)
            return None

    def _write_model_file(self) -> None:
        """Before a write (write lock held): records which model the stored
        features come from, if the store holds none of another (or unknown) model."""
        if self._model_file_ok:
            return
        recorded = self._read_model_file()
        if recorded != self._tag:
            n_images = self.store.image_count()
            if n_images and recorded is not None:
                raise ImageSearchError(self._mismatch(recorded, self._tag, n_images))
            if n_images:  # images of an unknown model: never claim them as ours
                return
            path = self.data_dir / MODEL_FILE
            tmp = path.with_name(f"{MODEL_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"model_tag": self._tag, "dim": self._dim}))
            os.replace(tmp, path)
        self._store_features_ok = self._model_file_ok = True

    # -- features ------------------------------------------------------------------------

    def _cache_get(self, key: str) -> np.ndarray | None:
        if self.cache is None:
            return None
        try:
            v = self.cache.get(key)
        except Exception as exc:  # a cache that went away degrades to no cache
            log.warning("feature cache get failed (treated as a miss): %s: %s", type(exc).__name__, exc)
            return None
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape[0] != self._dim or not np.isfinite(v).all():
            return None  # another writer's garbage: recompute rather than trust it
        return v

    def _cache_put(self, key: str, v: np.ndarray) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(key, v)
        except Exception as exc:
            log.warning("feature cache put failed (ignored): %s: %s", type(exc).__name__, exc)

    def _features(self, datas: list[bytes], names: list[str], batch_size: int = 32):
        """(features [n, dim] float32 L2-normalised, cached flags, sha256s,
        sizes (w, h), timing {preprocess, inference} in seconds). Every image's
        header is checked before anything is decoded."""
        sizes = [probe(d, self.max_megapixels, name)[:2] for d, name in zip(datas, names)]
        model = self.model
        shas = [hashlib.sha256(d).hexdigest() for d in datas]
        n = len(datas)
        out = np.zeros((n, self._dim), dtype=np.float32)
        cached = [False] * n
        todo: dict[str, list[int]] = {}  # sha -> rows still to compute (identical bytes computed once)
        for i, sha in enumerate(shas):
            if sha in todo:
                todo[sha].append(i)
                continue
            v = self._cache_get(f"{self._tag}:{sha}")
            if v is None and self._store_features_ok:
                row = self.store.image_by_sha(sha)
                if row is not None and row["feature"].shape[0] == self._dim:
                    v = row["feature"]
                    self._cache_put(f"{self._tag}:{sha}", v)
            if v is None:
                todo[sha] = [i]
            else:
                out[i], cached[i] = v, True
        t_pre = t_inf = 0.0
        shas_todo = list(todo)
        for start in range(0, len(shas_todo), batch_size):
            part = shas_todo[start:start + batch_size]
            rows = [todo[s][0] for s in part]
            t0 = time.perf_counter()
            from ..ops import preprocess

            x, errs = preprocess([datas[r] for r in rows], errors="return", max_megapixels=self.max_megapixels,
                                 mode=self.preprocess_mode)
            t1 = time.perf_counter()
            for r, e in zip(rows, errs):
                if e is not None:
                    # The header was fine (probe), so this is truncated or corrupt data.
                    raise ImageInputError(f"{names[r]}: {e}", "too_large" if "megapixels" in e else "invalid", param="image")
            feats = model.features(x)
            feats = np.asarray(feats.detach().cpu().numpy() if hasattr(feats, "detach") else feats,
                               dtype=np.float32)
            t2 = time.perf_counter()
            t_pre += t1 - t0
            t_inf += t2 - t1
            if feats.shape != (len(rows), self._dim):
                raise ImageSearchError(f"the model returned features of shape {feats.shape} for {len(rows)} "
                                       f"images, expected {(len(rows), self._dim)}")
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            if not np.isfinite(feats).all() or (norms == 0).any():
                raise ImageSearchError("the model returned NaN, inf or all-zero features")
            feats /= norms
            for s, v in zip(part, feats):
                for i in todo[s]:
                    out[i] = v
                self._cache_put(f"{self._tag}:{s}", v.copy())
        return out, cached, shas, sizes, {"preprocess": t_pre, "inference": t_inf}

    def features(self, images: Sequence[bytes]) -> tuple[np.ndarray, list[bool]]:
        """L2-normalised float32 features [n, dim] of encoded images, and which
        came from a cache (the feature cache or the store)."""
        self._check_open()
        if isinstance(images, (bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
            raise ImageInputError(f"images must be a list of encoded images, got {type(images).__name__}", param="image")
        names = [f"image {i}" for i in range(len(images))]
        datas = [check_data(d, name) for d, name in zip(images, names)]
        if not datas:
            self.model  # noqa: B018 (its width)
            return np.zeros((0, self._dim), dtype=np.float32), []
        vecs, cached, *_ = self._features(datas, names)
        return vecs, cached

    # -- index ---------------------------------------------------------------------------

    def _new_index(self, dim: int):
        from ..index import HnswIndex

        return HnswIndex(dim, "cosine", path=self.data_dir / INDEX_DIR, ef=self.ef)

    def _open_index(self, dim: int | None) -> None:
        """Loads the last snapshot (a corrupt one is moved aside) and reconciles it with the store."""

        root = self.data_dir / INDEX_DIR
        idx = load_snapshot(root, dim=dim, store_path=self.store.path, what="image index", metric="cosine")
        if idx is not None and idx.ef != self.ef:
            idx.set_ef(self.ef)
        self._index = idx
        if self._index is None and dim is not None:
            self._index = self._new_index(dim)
        if self._index is not None:
            self._reconcile()

    def _ensure_index(self) -> None:
        """Before a write: an index of the model's width (caller holds the write lock)."""
        if self._index is None:
            self._index = self._new_index(self._dim)
        elif self._index.dim != self._dim:
            if self._index.count():
                raise ImageSearchError(f"the image index holds {self._index.dim}-d vectors, the model produces "
                                       f"{self._dim}-d features")
            self._index = self._new_index(self._dim)  # an empty leftover of another model

    def _index_entries(self) -> dict[str, str | None]:
        """{id: content hash} of everything in the index (one consistent snapshot,
        taken under the index's lock by ``entries``, as the text engine does)."""
        return {str(ext): h for ext, h in self._index.entries(HASH_KEY)}

    def _reconcile(self) -> dict:
        """Makes the index match the store (caller holds the write lock)."""
        entries = self._index_entries()
        seen: set[str] = set()
        added = 0
        for ids, _ in self.store.iter_image_features(batch=512):
            rows = self.store.get_images(ids)  # payload and sha256 (rows deleted meanwhile are left out)
            todo = []
            for r in rows:
                seen.add(r["id"])
                h = _entry_hash(r["sha256"], r["payload"])
                if entries.get(r["id"]) != h:
                    todo.append((r, h))
            if todo:
                self._index.upsert([r["id"] for r, _ in todo], np.stack([r["feature"] for r, _ in todo]),
                                   [{**r["payload"], HASH_KEY: h} for r, h in todo])
                added += len(todo)
        stale = [x for x in entries if x not in seen]
        deleted = self._index.delete(stale) if stale else 0
        if added or deleted:
            self._index.save()
            self._unsaved = 0
        return {"added": added, "deleted": deleted}

    def reconcile(self) -> dict:
        """Brings the index up to date with the store (e.g. after the store's
        ``sync()`` pulled another node's images). Returns {"added", "deleted"}."""
        self._check_open()
        with self._write_lock:
            if self._index is None:
                dim = self.store.stats()["image_feature_dim"]
                if dim is None:
                    return {"added": 0, "deleted": 0}
                self._index = self._new_index(dim)
            return self._reconcile()

    def _wrote(self, n: int = 1) -> None:
        self._unsaved += n
        if self._unsaved >= self.save_every:
            self._index.save()
            self._unsaved = 0

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
        vecs, cached, shas, sizes, timing = self._features(datas, [f"image {x!r}" for x in ids], batch_size)
        t_store = t_index = 0.0
        with self._write_lock:
            self._check_open()
            self._ensure_index()
            self._write_model_file()
            for j, id in enumerate(ids):
                t1 = time.perf_counter()
                w, h = sizes[j]
                self.store.put_image(id, shas[j], payloads[j], w, h, vecs[j])
                t2 = time.perf_counter()
                self._index.upsert([id], vecs[j:j + 1], [{**payloads[j], HASH_KEY: _entry_hash(shas[j], payloads[j])}])
                t3 = time.perf_counter()
                t_store += t2 - t1
                t_index += t3 - t2
            self._wrote(len(ids))
        images = [{"id": id, "sha256": shas[j], "width": sizes[j][0], "height": sizes[j][1], "dim": self._dim,
                   "cached": cached[j]} for j, id in enumerate(ids)]
        return {"images": images, "timing_ms": {
            "preprocess": _ms(timing["preprocess"]), "inference": _ms(timing["inference"]), "store": _ms(t_store),
            "index": _ms(t_index), "total": _ms(time.perf_counter() - t0)}}

    def delete(self, id: str) -> bool:
        """Removes an image (store first, then index); False when it did not exist."""
        self._check_open()
        id = check_id(id)
        with self._write_lock:
            self._check_open()
            existed = self.store.delete_image(id)
            removed = self._index.delete([id]) if self._index is not None else 0
            if removed:
                self._wrote()
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
        data = check_data(data)
        try:
            k = check_k(k)
        except IndexInputError as exc:
            raise ImageInputError(str(exc)) from None
        try:
            F.parse(filter)
        except F.FilterError as exc:
            raise ImageInputError(f"filter: {exc}") from None
        if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(
                score_threshold, (int, float)) or not math.isfinite(score_threshold)):
            raise ImageInputError(f"score_threshold must be a finite number, got {score_threshold!r}")
        # Features even when nothing is stored: bad images fail the same way always.
        vecs, cached, _, _, timing = self._features([data], ["image"])
        result = self._hits(vecs, k, filter, score_threshold)
        result["cached"] = cached[0]
        result["timing_ms"] = {"preprocess": _ms(timing["preprocess"]), "inference": _ms(timing["inference"]),
                               **result["timing_ms"], "total": _ms(time.perf_counter() - t0)}
        return result

    def _hits(self, vec: np.ndarray, k: int, filter: dict | None, score_threshold: float | None) -> dict:
        """Index search + metadata for one feature vector [1, dim]."""
        t1 = time.perf_counter()
        idx = self._index
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
                data = check_data(q.get("data"))
                k = check_k(q.get("k", 10))
                F.parse(q.get("filter"))
                thr = q.get("score_threshold")
                if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float))
                                        or not math.isfinite(thr)):
                    raise ImageInputError(f"score_threshold must be a finite number, got {thr!r}")
                probe(data, self.max_megapixels)
                checked.append((data, k, q.get("filter"), thr))
            except IndexInputError as exc:
                checked.append(ImageInputError(str(exc)))
            except F.FilterError as exc:
                checked.append(ImageInputError(f"filter: {exc}"))
            except Exception as exc:
                checked.append(exc)
        good = [i for i, c in enumerate(checked) if not isinstance(c, Exception)]
        if len(good) < 2:
            return [c if isinstance(c, Exception) else self._search_one(*c) for c in checked]
        t0 = time.perf_counter()
        try:
            vecs, cached, _, _, timing = self._features([checked[i][0] for i in good],
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
                "indexed": self._index.count() if self._index is not None else 0,
                "dim": self.dim, "model_tag": self._tag, "data_dir": str(self.data_dir),
                "max_megapixels": self.max_megapixels, "ef": self.ef, "cache": self.cache is not None}

    # -- lifecycle -----------------------------------------------------------------------

    def save(self) -> None:
        """Snapshots the index now (atomically) if anything changed since the last save."""
        self._check_open()
        with self._write_lock:
            if self._index is not None and self._unsaved:
                self._index.save()
                self._unsaved = 0

    def _check_open(self) -> None:
        if self._closed:
            raise ImageSearchError("the image search is closed")

    def close(self) -> None:
        """Saves and closes the index; closes the store only if this object opened it."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._index is not None:
                    if self._unsaved:
                        self._index.save()
                        self._unsaved = 0
                    self._index.close()
            finally:
                if self._owns_store:
                    self.store.close()

    def __enter__(self) -> "ImageSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
