"""A model host: one loaded model and the calls the server makes on it —
run either inside the server's process or as a worker process of its own
(``tallow.worker.main([FD])``, started by ``tallow.serve.workers``).

The worker process talks to the server over one socket pair with
``multiprocessing.connection`` framing: each message is a pickle (protocol
5) of one of the named tuples below. Tensors cross through shared memory: an
array of 256 KiB or more (images) is written into a pre-allocated
shared-memory ``Arena`` and only its offset, shape and dtype travel
(``to_wire`` / ``from_wire``); smaller ones (a batch of embeddings) ride in
the pickle as raw bytes, which measured cheaper at that size. No JSON, no
per-element encoding; ``benchmarks/bench_transport.py`` measures the choices.

Server → worker: ``Start`` first, then ``Call`` (a model method: embed_ids,
classify_ids, features...), ``Generate`` (continuous batching, GPT-2: one
row per prompt), ``Cancel``, ``Stop``.

Worker → server: ``Ready`` (loaded and warmed up) or ``LoadFailed``, then
``Result`` / ``Error`` (one per ``Call``) and ``Events`` (one decode step's
tokens, every request of the batch).

Only this module imports in the worker (torch and the model code, not the
web framework), so a worker starts in the time it takes to load its model.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

# Methods the server may call on a model: nothing else crosses the pipe.
CALLABLE = ("embed", "embed_ids", "classify", "classify_ids", "features")
# What a chat route reads from a generator (tallow.engine.chat): copied to the server with its info.
CHAT_ATTRS = ("chat_template", "special_tokens", "bos_token_id", "eos_token_id")


@dataclass
class WorkerSpec:
    """What one model host loads: a serve slot's model and its settings."""

    slot: str                  # embedder | classifier | generator | image
    path: str
    quantize: Optional[str] = None
    task: Optional[str] = None  # load(..., task=) for BERT models
    warmup: bool = True
    threads: int = 0           # torch intra-op threads in a worker process; 0: torch's default
    max_rows: int = 32         # generation: rows decoded together
    kv_cache_mb: int = 0       # generation: KV pool budget; 0: the scheduler's default
    prefill_tokens_per_step: int = 512  # generation: prompt tokens prefilled per step
    # embedder: classification heads trained on this very encoder, served from it
    # (slot -> head directory; see models.bert.EmbedderWithHeads)
    heads: dict = field(default_factory=dict)


# -- messages ---------------------------------------------------------------------------------

class Start(NamedTuple):
    """Server → worker, first: what to load, and the arenas' files to map."""
    spec: "WorkerSpec"
    arena_paths: dict          # "server" / "worker" -> a file in /dev/shm (absent: no arena)


class Call(NamedTuple):
    """Server → worker: ``model.method(*args, **kwargs)``, answered by ``Result`` or ``Error``."""
    call_id: int
    method: str
    payload: Any               # (args, kwargs) through ``to_wire``
    answers_read: int          # how many of the worker's arena answers the server has copied out


class Generate(NamedTuple):
    """Server → worker: start a request's rows in the continuous-batching loop."""
    request_id: Any
    prompt_ids: list
    params: list               # one SamplingParams per row


class Cancel(NamedTuple):
    request_id: Any


class Stop(NamedTuple):
    pass


class Ready(NamedTuple):
    """Worker → server: the model loaded and warmed up (info: see ``ModelHost.info``)."""
    info: dict


class LoadFailed(NamedTuple):
    message: str


class Result(NamedTuple):
    call_id: int
    value: Any                 # through ``to_wire``
    in_arena: int              # 1 when part of value is in the worker's arena


class Error(NamedTuple):
    call_id: int
    exception: BaseException


class Events(NamedTuple):
    events: list               # RowEvent, every request of one decode step


def load_model(spec: WorkerSpec) -> Any:
    from .models import load

    kwargs = {"task": spec.task} if spec.task else {}
    model = load(spec.path, spec.quantize, **kwargs)
    if spec.heads:
        from .models._checkpoint import resolve_model_path
        from .models.bert import EmbedderWithHeads, head_on

        model = EmbedderWithHeads(model, head_on(model, resolve_model_path(spec.heads["classifier"]),
                                                 spec.quantize))
    if spec.warmup:
        warm_up(spec.slot, model)
        if spec.heads:
            warm_up("classifier", model)
    return model


def warm_up(slot: str, model: Any) -> None:
    """One small batch, so the first request does not pay for lazy set-up."""
    import torch

    if slot == "embedder":
        model.embed(["warm up"], truncation=True)
    elif slot == "classifier":
        model.classify(["warm up"], truncation=True)
    elif slot == "generator":
        from .models.generation import SamplingParams

        list(model.generate_ids([[0]], SamplingParams(max_new_tokens=2, temperature=0.0)))
    elif slot == "image":
        model.features(torch.zeros(1, 3, 64, 64))


# -- tensors on the wire ----------------------------------------------------------------------

SHM_DIR = "/dev/shm"  # POSIX shared memory on Linux (tmpfs); without it arrays ride in the pickle
# Smaller arrays ride in the pickle. Measured round trips (bench_transport.py,
# AMD EPYC, quiet): 32x384 float32 (48 KiB) 224 µs in the pickle vs 285 µs
# through the arena (the bookkeeping costs more than the socket copy it
# saves); one 224x224 image (588 KiB) 555 vs 528 µs; eight 13.0 vs 3.6 ms.
SHM_MIN_BYTES = 256 << 10
ARENA_BYTES = 16 << 20   # per direction per worker; pages are only used when touched


@dataclass
class ArenaRef:
    """An array in the sender's arena: where, what type, what shape."""

    offset: int
    dtype: str
    shape: tuple


class Arena:
    """A shared-memory buffer (a file in /dev/shm, mapped by both processes)
    that carries the arrays of one message at a time, one direction.

    The sender writes a message's arrays into it and marks it busy; the
    receiver copies them out when the message arrives. No acknowledgement
    travels on its own (an extra message each way cost more than the copy
    saved): the server's arena (a call's inputs) is free again when that
    call's answer arrives — a worker copies its inputs out before it runs
    the call —, the worker's (an answer) when a later call says the server
    has read that many answers (``answers_read``). A message sent while its
    arena is busy, or too big for it, carries its arrays in the pickle: no
    side ever waits for an arena. Calls run one at a time in a worker, and a
    lane's next call follows the answer it read, so the arena is nearly
    always free."""

    def __init__(self, path: str, size: int, create: bool):
        import mmap

        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path, self.size, self.busy = path, size, False
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name: str) -> "Arena | None":
        """A new arena, or None where there is no room for one (no /dev/shm,
        or less than 8 arenas' worth free: touching a page past a full tmpfs
        would kill the process with SIGBUS)."""
        try:
            st = os.statvfs(SHM_DIR)
            if st.f_bavail * st.f_frsize < 8 * ARENA_BYTES:
                return None
            return cls(os.path.join(SHM_DIR, name), ARENA_BYTES, create=True)
        except OSError:
            return None

    def reserve(self) -> bool:
        with self._lock:
            if self.busy:
                return False
            self.busy = True
            return True

    def release(self) -> None:
        self.busy = False

    def close(self) -> None:
        self.buf.close()

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _arrays(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_arrays(v) for v in value)
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    return value


def to_wire(value: Any, arena: "Arena | None") -> tuple[Any, bool]:
    """(what to pickle, whether the arena holds part of it). Tensors become
    numpy arrays; those of ``SHM_MIN_BYTES`` or more go into ``arena`` when
    it is free and they fit, the rest ride in the pickle (protocol 5: one
    raw copy of their bytes)."""
    import numpy as np

    value = _arrays(value)
    big: list = []

    def find(v):
        if isinstance(v, np.ndarray) and v.nbytes >= SHM_MIN_BYTES:
            big.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                find(x)
        elif isinstance(v, dict):
            for x in v.values():
                find(x)

    find(value)
    total = sum(-(-a.nbytes // 64) * 64 for a in big)
    if not big or arena is None or total > arena.size or not arena.reserve():
        return value, False
    offsets: dict[int, ArenaRef] = {}
    at = 0
    for a in big:
        np.ndarray(a.shape, dtype=a.dtype, buffer=arena.buf, offset=at)[...] = a
        offsets[id(a)] = ArenaRef(at, a.dtype.str, a.shape)
        at += -(-a.nbytes // 64) * 64

    def swap(v):
        if isinstance(v, np.ndarray) and id(v) in offsets:
            return offsets[id(v)]
        if isinstance(v, (list, tuple)):
            return type(v)(swap(x) for x in v)
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return v

    return swap(value), True


def from_wire(value: Any, arena: "Arena | None") -> Any:
    """The receiver's side: arrays (in the pickle or copied out of the
    sender's arena) back to tensors. The caller acks the arena afterwards."""
    import numpy as np
    import torch

    if isinstance(value, ArenaRef):
        view = np.ndarray(value.shape, dtype=np.dtype(value.dtype), buffer=arena.buf, offset=value.offset)
        return torch.from_numpy(view.copy())
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(from_wire(v, arena) for v in value)
    if isinstance(value, dict):
        return {k: from_wire(v, arena) for k, v in value.items()}
    return value


class ModelHost:
    """One model and, for a generator, the continuous-batching loop over it.
    ``emit(events)`` receives every decode step's ``RowEvent`` list."""

    def __init__(self, spec: WorkerSpec, model: Any, emit: Callable[[list], None]):
        self.spec = spec
        self.model = model
        self._emit = emit
        self._loop = None
        if spec.slot == "generator":
            from .models.scheduler import GenerationLoop, GenerationScheduler

            budget = spec.kv_cache_mb << 20 if spec.kv_cache_mb else None
            scheduler = GenerationScheduler(model, max_rows=spec.max_rows, kv_budget_bytes=budget,
                                            prefill_tokens_per_step=spec.prefill_tokens_per_step)
            self._loop = GenerationLoop(scheduler, emit)

    def info(self) -> dict:
        """What the server needs without the weights: tokenizer, config,
        identity; and the threads this process computes with."""
        from .engine.derived_index import model_identity

        def describe(m: Any) -> dict:
            return {"class": type(m).__name__, "repr": repr(m), "config": getattr(m, "config", None),
                    "tokenizer": getattr(m, "tokenizer", None),
                    "attrs": {a: getattr(m, a) for a in ("pooling", "normalize", "kv_cache_dtype", "quantization",
                                                         "architecture", *CHAT_ATTRS) if hasattr(m, a)}}

        m = self.model
        base = getattr(m, "embedder", m)
        # The identity (a hash of every weight) names the vectors the engine stores: the
        # model's own, never a head's (which would hash the shared encoder once more).
        heads = getattr(m, "heads", None) or {}
        return {"slot": self.spec.slot, "pid": os.getpid(), "threads": compute_threads(),
                **describe(base), "identity": model_identity(base),
                "heads": {name: describe(head) for name, head in heads.items()}}

    def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        if method not in CALLABLE or not callable(getattr(self.model, method, None)):
            raise AttributeError(f"{type(self.model).__name__} has no method {method!r} to call")
        return getattr(self.model, method)(*args, **kwargs)

    def generate(self, request_id: Any, prompt_ids: list, params: list) -> None:
        if self._loop is None:
            raise TypeError(f"the {self.spec.slot} model does not generate")
        self._loop.submit(request_id, prompt_ids, params)

    def cancel(self, request_id: Any) -> None:
        if self._loop is not None:
            self._loop.cancel(request_id)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()


# -- the worker process ---------------------------------------------------------------------

def compute_threads() -> dict:
    """The threads this process's forward passes use: tallow's kernels
    (None when its native library did not load) and torch's."""
    import torch

    import tallow

    ours = tallow.get_num_threads() if tallow.native_available() else None
    return {"tallow": ours, "torch": torch.get_num_threads()}


def serve(conn, spec: WorkerSpec, arenas: dict) -> None:
    """The worker's main loop: calls run one at a time in this thread;
    generation steps run in the host's loop thread and are sent from there
    (one lock keeps the frames whole)."""
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        data = pickle.dumps(message, protocol=5)
        with send_lock:
            conn.send_bytes(data)

    ours, theirs = arenas.get("worker"), arenas.get("server")  # we write ours, read theirs
    answers_written = 0  # answers that went through our arena
    try:
        host = ModelHost(spec, load_model(spec), lambda events: send(Events(events)))
        reply = Ready(host.info())
    except Exception as exc:
        host, reply = None, LoadFailed(f"{type(exc).__name__}: {exc}")
    try:
        send(reply)
    except OSError:  # the server went away while we loaded: nobody to tell
        return
    if host is None:
        return
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the server went away: nothing left to serve
            break
        if isinstance(message, Call):
            if ours is not None and message.answers_read >= answers_written:
                ours.release()  # the server has copied out every answer we parked
            try:
                args, kwargs = from_wire(message.payload, theirs)
                value, used = to_wire(host.call(message.method, args, kwargs), ours)
                answers_written += used
                reply = Result(message.call_id, value, int(used))
            except Exception as exc:
                reply = Error(message.call_id, _picklable(exc))
            send(reply)
        elif isinstance(message, Generate):
            try:
                host.generate(message.request_id, message.prompt_ids, message.params)
            except Exception as exc:  # validation: the request fails, the worker goes on
                from .models.scheduler import RowEvent

                send(Events([RowEvent(message.request_id, row, -1, "", "error", f"{type(exc).__name__}: {exc}")
                             for row in range(len(message.prompt_ids))]))
        elif isinstance(message, Cancel):
            host.cancel(message.request_id)
        elif isinstance(message, Stop):
            break
    host.close()


def _picklable(exc: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def set_threads(n: int) -> None:
    """Sizes this process's compute threads — tallow's kernels and torch's —
    to ``n`` before the model loads: with several workers on a machine, each
    sized to every core would oversubscribe it."""
    import torch

    import tallow

    torch.set_num_threads(n)
    if tallow.native_available():  # without it the error comes at the first kernel call, not here
        tallow.set_num_threads(n)


def main(argv: list[str]) -> int:
    from multiprocessing.connection import Connection

    conn = Connection(int(argv[0]))
    start = pickle.loads(conn.recv_bytes())
    # The server made the arenas (and unlinks them); we map them.
    arenas = {side: Arena(path, ARENA_BYTES, create=False) for side, path in start.arena_paths.items()}
    if start.spec.threads:
        set_threads(start.spec.threads)
    serve(conn, start.spec, arenas)
    return 0
