"""Image features: the ResNet (loaded on first use) checked against the
features already stored, the record of which model made them
(``<data_dir>/image_model.json``), and features of encoded images computed
in batches (preprocess + forward, L2-normalised) or taken from a cache.

Features are cached by the SHA-256 of the encoded bytes, in two places:

- ``cache`` (anything with ``get(key) -> ndarray | None`` and ``put(key,
  value)``, e.g. ``tallow.cache.FeatureCache``), keyed ``"<model tag>:<sha>"``
  so two models never share features. A failing cache (Redis gone) is a miss,
  never an error.
- the store itself: an image already stored with the same bytes reuses its
  feature, but only when ``image_model.json`` says the stored features came
  from this model (the store records no model, and features of two models
  with the same width are silently incomparable). Opening a store whose
  images were indexed by another model raises ``ImageSearchError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .derived_index import model_identity
from .image_input import ImageInputError, probe

log = logging.getLogger("tallow.engine.images")

MODEL_FILE = "image_model.json"


class ImageSearchError(RuntimeError):
    """The pipeline cannot run: closed, a model that does not fit the stored features, ..."""


class ImageFeatures:
    """The model and its features for one ``ImageSearch`` (see the module docstring)."""

    def __init__(self, data_dir: Path, store: Any, model: Any, *, cache: Any, max_megapixels: float,
                 preprocess_mode: str, model_tag: str | None):
        self.data_dir = data_dir
        self.store = store
        self.cache = cache
        self.max_megapixels = max_megapixels
        self.preprocess_mode = preprocess_mode
        self._model_spec = model
        self._model = None if isinstance(model, (str, os.PathLike)) else model
        self._tag_override = model_tag
        self._tag: str | None = None
        self._dim: int | None = None
        self._store_features_ok = False  # may the store's features be reused as a cache (same model)?
        self._model_file_ok = False       # does image_model.json name this model?
        self._model_lock = threading.Lock()

    @property
    def model(self):
        """The model, loaded on first use when a path was given."""
        if self._model is None or self._tag is None:
            with self._model_lock:
                if self._model is None:
                    from ..models import load

                    self._model = load(self._model_spec)
                if self._tag is None:
                    self.bind(self._model)
        return self._model

    @property
    def model_tag(self) -> str:
        self.model  # noqa: B018 (loads it)
        return self._tag

    def bind(self, model: Any) -> None:
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

    def write_model_file(self) -> None:
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

    def compute(self, datas: list[bytes], names: list[str], batch_size: int = 32):
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

