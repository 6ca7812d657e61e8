"""The WebAssembly runtime: one wasmtime Engine (fuel + epoch interruption)
with one epoch ticker thread, one Linker holding the ``tallow:v1`` imports
and WASI preview 1, an ``InstancePre`` per function, and a fresh ``Store``
per request (so nothing a request leaves in memory, globals or tables is
seen by the next one).

``Runtime.call(name, request)`` runs synchronously on the calling thread;
the server calls it from worker threads (wasmtime runs guest code without
the GIL). Guest failures become ``FunctionError`` with the HTTP status to
answer: a trap 500, a deadline or exhausted fuel 504.

Compiled modules are cached on disk (``ModuleCache``): keyed by the SHA-256
of the module, the wasmtime version and the engine configuration; the
directory is made mode 0700 and a file is deserialised only when its
HMAC-SHA256, under a key tallow generated in that directory, matches (a
serialised module is native code: a file tallow did not write is never
loaded).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import wasmtime
from wasmtime import (Config, Engine, ExitTrap, FuncType, InstancePre, Linker, Module, Store, Trap, TrapCode,
                      ValType, WasiConfig, WasmtimeError)

from . import abi
from .kv import KV, KVError
from .limits import FunctionConfigError
from .manifest import FunctionSpec

log = logging.getLogger("tallow.functions")

TICK_MS = 5.0  # epoch ticker period: a deadline is enforced within one tick
_ENGINE_SETTINGS = "consume_fuel=1;epoch_interruption=1;cranelift_opt_level=speed;abi=" + abi.ABI_VERSION


@functools.cache
def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


# -- errors, requests, responses ------------------------------------------------------------

class FunctionError(Exception):
    """A request a function could not answer; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, function: str, kind: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.function = function
        self.kind = kind  # trap | deadline | fuel | instantiate | error_code | bad_request


class HostUnavailable(Exception):
    """A host function's model is not loaded (the guest gets E_UNAVAILABLE)."""


class HostInputError(ValueError):
    """The guest passed input the model or op refuses (the guest gets E_INVALID)."""


class Host:
    """The narrow API functions reach tallow's models and ops through. The
    server passes one backed by its models; this default has no models."""

    def embed_text(self, text: str, timeout_s: float):  # -> 1-D float32 numpy array
        raise HostUnavailable("no embedder here")

    def classify_text(self, text: str, timeout_s: float) -> dict:
        raise HostUnavailable("no classifier here")

    def preprocess_image(self, data: bytes, timeout_s: float):  # -> float32 array [3, 224, 224]
        import numpy as np

        from ..ops.preprocess import preprocess

        try:
            return np.ascontiguousarray(preprocess([bytes(data)], num_threads=1)[0].numpy(), dtype="<f4")
        except ValueError as exc:
            raise HostInputError(str(exc)) from None


@dataclass
class FnRequest:
    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class FnResponse:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    fuel_used: int = 0
    elapsed_ms: float = 0.0


# -- the shared engine -----------------------------------------------------------------------

class _Shared:
    lock = threading.Lock()
    engine: Engine | None = None
    linker: Linker | None = None
    ticker: threading.Thread | None = None


def _tick(engine: Engine) -> None:
    """Advances the epoch by one per TICK_MS of wall clock. A sleep that ran
    late (a busy machine, the GIL) is caught up with several increments, so
    epochs keep to the clock and a deadline is never pushed back."""
    period = TICK_MS / 1000.0
    start, ticks = time.monotonic(), 0
    while True:
        time.sleep(max(0.0, start + (ticks + 1) * period - time.monotonic()))
        due = int((time.monotonic() - start) / period)
        while ticks < due:
            engine.increment_epoch()
            ticks += 1


def shared_engine() -> tuple[Engine, Linker]:
    """The process's one Engine and Linker (made on first use, with the ticker)."""
    with _Shared.lock:
        if _Shared.engine is None:
            cfg = Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            cfg.cranelift_opt_level = "speed"
            engine = Engine(cfg)
            linker = Linker(engine)
            linker.define_wasi()
            linker.allow_shadowing = True
            linker.define_func("wasi_snapshot_preview1", "fd_write", FuncType([_VAL[abi.I32]] * 4, [_VAL[abi.I32]]),
                               _fd_write, access_caller=True)
            linker.allow_shadowing = False
            for name, (params, results) in abi.IMPORTS.items():
                ty = FuncType([_VAL[p] for p in params], [_VAL[r] for r in results])
                linker.define_func(abi.IMPORT_MODULE, name, ty, _HOST_FUNCS[name], access_caller=True)
            _Shared.engine, _Shared.linker = engine, linker
            _Shared.ticker = threading.Thread(target=_tick, args=(engine,), name="tallow-wasm-epoch", daemon=True)
            _Shared.ticker.start()
        return _Shared.engine, _Shared.linker


_VAL = {abi.I32: ValType.i32(), abi.I64: ValType.i64()}


# -- the compiled-module cache ---------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get("TALLOW_WASM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tallow" / "wasm"


class ModuleCache:
    def __init__(self, directory: str | Path | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.dir.stat()
        if st.st_uid != os.geteuid():
            raise PermissionError(f"the module cache {self.dir} belongs to another user: not using it")
        if st.st_mode & 0o077:
            os.chmod(self.dir, 0o700)
        self._mac_key = self._key_file()

    def _key_file(self) -> bytes:
        path = self.dir / "cache.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            data = path.read_bytes()
            if len(data) != 32:
                raise PermissionError(f"{path} is not a key tallow wrote: remove the directory {self.dir}")
            return data
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    @staticmethod
    def key(wasm: bytes) -> str:
        h = hashlib.sha256(wasm)
        h.update(b"\0wasmtime=" + wasmtime_version().encode() + b"\0" + _ENGINE_SETTINGS.encode())
        return h.hexdigest()

    def _mac(self, key: str, data: bytes, manifest: bytes) -> bytes:
        h = hmac.new(self._mac_key, key.encode() + b"\0", hashlib.sha256)
        h.update(hashlib.sha256(data).digest())
        h.update(manifest)
        return h.digest()

    def paths(self, key: str) -> tuple[Path, Path]:
        """The serialised module, and tallow's manifest: 32 bytes of HMAC, then the
        module's imports and exports as JSON (so a load needs no introspection)."""
        return self.dir / f"{key}.cwasm", self.dir / f"{key}.manifest"

    def load(self, engine: Engine, key: str) -> tuple[Module, dict] | None:
        """The cached module and its description, or None (absent, or not written by tallow: ignored)."""
        data_path, manifest_path = self.paths(key)
        try:
            data = data_path.read_bytes()
            raw = manifest_path.read_bytes()
        except OSError:
            return None
        mac, manifest = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, self._mac(key, data, manifest)):
            log.warning("ignoring %s: its HMAC does not match (not written by this tallow)", data_path)
            return None
        try:
            return Module.deserialize(engine, data), json.loads(manifest)
        except (WasmtimeError, ValueError) as exc:
            log.warning("ignoring %s: %s", data_path, exc)
            return None

    def store(self, key: str, module: Module, description: dict) -> None:
        data = bytes(module.serialize())
        manifest = json.dumps(description, sort_keys=True).encode()
        for path, blob in zip(self.paths(key), (data, self._mac(key, data, manifest) + manifest)):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)

    def get_or_compile(self, engine: Engine, wasm: bytes) -> tuple[Module, dict, bool]:
        """(module, its description, True when it came from the cache)."""
        key = self.key(wasm)
        hit = self.load(engine, key)
        if hit is not None:
            return hit[0], hit[1], True
        module = Module(engine, wasm)
        description = describe_module(module)
        try:
            self.store(key, module, description)
        except OSError as exc:
            log.warning("cannot write the compiled module to %s: %s", self.dir, exc)
        return module, description, False


def _sig(ty: Any) -> Any:
    if isinstance(ty, FuncType):
        return {"params": [str(t) for t in ty.params], "results": [str(t) for t in ty.results]}
    if isinstance(ty, wasmtime.MemoryType):
        return "memory"
    return type(ty).__name__


def describe_module(module: Module) -> dict:
    """Exports and imports as plain data (what _check_module reads)."""
    return {"exports": {e.name: _sig(e.type) for e in module.exports},
            "imports": [[i.module, i.name, _sig(i.type)] for i in module.imports]}


def read_module(path: str | Path) -> bytes:
    """A module's binary: .wasm as is, .wat compiled to binary by wasmtime."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".wat" or not raw.startswith(b"\0asm"):
        try:
            return bytes(wasmtime.wat2wasm(raw.decode("utf-8")))
        except (WasmtimeError, UnicodeDecodeError) as exc:
            raise FunctionConfigError(f"{path}: not valid WebAssembly text: {exc}") from None
    return raw


# -- per-request state -----------------------------------------------------------------------

class _Abort(Exception):
    """Raised by a host function to stop the guest (deadline, fuel); the reason is in the context."""


class _Ctx:
    __slots__ = ("fn", "req", "status", "headers", "body", "body_len", "pending", "stores", "abort",
                 "deadline", "out", "err", "kv", "host", "memory")

    def __init__(self, fn: "LoadedFunction", req: FnRequest, deadline: float, kv: KV | None, host: Host):
        self.fn = fn
        self.req = req
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.pending: dict = {}
        self.stores: list[str] = []
        self.abort: str | None = None
        self.deadline = deadline
        self.out = bytearray()
        self.err = bytearray()
        self.kv = kv
        self.host = host
        self.memory = None  # the guest's exported memory, looked up on the first host call


_local = threading.local()


def _ctx() -> _Ctx:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:  # a host function called outside a request (cannot happen through Runtime.call)
        raise _Abort("no request")
    return ctx


class _Bounds(Exception):
    pass


def _memory(caller) -> tuple[int, int]:
    ctx = _local.ctx
    mem = ctx.memory
    if mem is None:
        mem = ctx.memory = caller.get("memory")
        if mem is None or not isinstance(mem, wasmtime.Memory):
            ctx.memory = None
            raise _Bounds()
    size = mem.data_len(caller)
    base = ctypes.addressof(mem.data_ptr(caller).contents) if size else 0
    return base, size


def _read(caller, ptr: int, n: int) -> bytes:
    ptr &= 0xFFFFFFFF
    n &= 0xFFFFFFFF
    base, size = _memory(caller)
    if ptr + n > size:
        raise _Bounds()
    return ctypes.string_at(base + ptr, n) if n else b""


def _write(caller, ptr: int, data: bytes) -> None:
    ptr &= 0xFFFFFFFF
    base, size = _memory(caller)
    if ptr + len(data) > size:
        raise _Bounds()
    if data:
        ctypes.memmove(base + ptr, data, len(data))


def _charge(caller, ctx: _Ctx, amount: int) -> None:
    if time.monotonic() > ctx.deadline:
        ctx.abort = "deadline"
        raise _Abort("deadline")
    fuel = Store.get_fuel(caller)
    if fuel < amount:
        Store.set_fuel(caller, 0)
        ctx.abort = "fuel"
        raise _Abort("fuel")
    Store.set_fuel(caller, fuel - amount)


def _output(caller, ctx: _Ctx, key: Any, compute: Callable[[], bytes], buf: int, cap: int) -> int:
    """The two-call pattern: returns the length needed; writes only when it fits."""
    cap &= 0xFFFFFFFF
    data = ctx.pending.pop(key, None)
    if data is None:
        data = compute()
    if len(data) > 0x7FFFFFFF:
        return abi.E_LIMIT
    if len(data) > cap:
        ctx.pending = {key: data}  # kept for the second call only
        return len(data)
    _charge(caller, ctx, len(data))
    _write(caller, buf, data)
    return len(data)


def _hostfn(name: str, cost: int = abi.FUEL_BASE):
    def wrap(impl):
        def call(caller, *args):
            ctx = _ctx()
            try:
                _charge(caller, ctx, cost)
                return impl(caller, ctx, *args)
            except _Bounds:
                return abi.E_BOUNDS
            except KVError as exc:
                log.info("function %s: %s: %s", ctx.fn.spec.name, name, exc)
                return exc.code
            except HostUnavailable as exc:
                log.warning("function %s: %s unavailable: %s", ctx.fn.spec.name, name, exc)
                return abi.E_UNAVAILABLE
            except (HostInputError, UnicodeDecodeError) as exc:
                log.info("function %s: %s: %s", ctx.fn.spec.name, name, exc)
                return abi.E_INVALID
            except TimeoutError:
                ctx.abort = "deadline"
                raise _Abort("deadline") from None
            except _Abort:
                raise
            except Exception:  # a bug on the host side: the guest traps (500); the details go to the log
                log.exception("function %s: host function %s failed", ctx.fn.spec.name, name)
                raise
        call.__name__ = name
        return call
    return wrap


def _text(caller, ptr: int, n: int) -> str:
    return _read(caller, ptr, n).decode("utf-8")


@_hostfn("req_method")
def _req_method(caller, ctx, buf, cap):
    return _output(caller, ctx, "method", lambda: ctx.req.method.encode(), buf, cap)


@_hostfn("req_path")
def _req_path(caller, ctx, buf, cap):
    return _output(caller, ctx, "path", lambda: ctx.req.path.encode(), buf, cap)


@_hostfn("req_query")
def _req_query(caller, ctx, buf, cap):
    return _output(caller, ctx, "query", lambda: ctx.req.query.encode(), buf, cap)


@_hostfn("req_header")
def _req_header(caller, ctx, name, name_len, buf, cap):
    want = _text(caller, name, name_len).lower()
    for k, v in ctx.req.headers:
        if k.lower() == want:
            return _output(caller, ctx, ("header", want), lambda: v.encode("latin-1"), buf, cap)
    return abi.E_NOT_FOUND


@_hostfn("req_headers")
def _req_headers(caller, ctx, buf, cap):
    return _output(caller, ctx, "headers",
                   lambda: "".join(f"{k.lower()}: {v}\n" for k, v in ctx.req.headers).encode("latin-1"), buf, cap)


@_hostfn("req_body_len")
def _req_body_len(caller, ctx):
    return len(ctx.req.body)


@_hostfn("req_body_read")
def _req_body_read(caller, ctx, offset, buf, cap):
    offset &= 0xFFFFFFFF
    cap &= 0xFFFFFFFF
    chunk = ctx.req.body[offset: offset + cap]
    _charge(caller, ctx, len(chunk))
    _write(caller, buf, chunk)
    return len(chunk)


@_hostfn("resp_status")
def _resp_status(caller, ctx, status):
    if not 100 <= status <= 599:
        return abi.E_INVALID
    ctx.status = status
    return abi.OK


def _token(s: str) -> bool:
    return bool(s) and all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={} ' for c in s)


@_hostfn("resp_header")
def _resp_header(caller, ctx, name, name_len, value, value_len):
    k = _text(caller, name, name_len)
    v = _read(caller, value, value_len).decode("latin-1")
    if not _token(k) or any(c in v for c in "\r\n\0"):
        return abi.E_INVALID
    if len(ctx.headers) >= ctx.fn.spec.limits.max_response_headers:
        return abi.E_LIMIT
    ctx.headers.append((k, v))
    return abi.OK


@_hostfn("resp_write")
def _resp_write(caller, ctx, ptr, n):
    data = _read(caller, ptr, n)
    if len(ctx.body) + len(data) > ctx.fn.spec.limits.max_response_bytes:
        return abi.E_LIMIT
    _charge(caller, ctx, len(data))
    ctx.body += data
    return abi.OK


def _store(ctx: _Ctx, handle: int) -> str:
    if not 1 <= handle <= len(ctx.stores):
        raise KVError(abi.E_INVALID, f"no open key-value store with handle {handle}")
    if ctx.kv is None:
        raise KVError(abi.E_IO, "key-value stores are not available here")
    return ctx.stores[handle - 1]


@_hostfn("kv_open")
def _kv_open(caller, ctx, name, name_len):
    if ctx.kv is None:
        raise KVError(abi.E_NO_SUCH_STORE, "key-value stores are not available here")
    store = ctx.kv.open(_text(caller, name, name_len), ctx.fn.spec.kv_stores)
    if store not in ctx.stores:
        ctx.stores.append(store)
    return ctx.stores.index(store) + 1


@_hostfn("kv_get", abi.FUEL_KV)
def _kv_get(caller, ctx, h, key, key_len, buf, cap):
    store, k = _store(ctx, h), _read(caller, key, key_len)
    missing = object()

    def compute():
        v = ctx.kv.get(store, k)
        return missing if v is None else v

    data = ctx.pending.pop(("kv", store, k), None)
    if data is None:
        data = compute()
    if data is missing:
        return abi.E_NOT_FOUND
    ctx.pending[("kv", store, k)] = data
    return _output(caller, ctx, ("kv", store, k), lambda: data, buf, cap)


@_hostfn("kv_set", abi.FUEL_KV)
def _kv_set(caller, ctx, h, key, key_len, value, value_len):
    store, k = _store(ctx, h), _read(caller, key, key_len)
    v = _read(caller, value, value_len)
    _charge(caller, ctx, len(v))
    ctx.pending.pop(("kv", store, k), None)
    ctx.kv.set(store, k, v)
    return abi.OK


@_hostfn("kv_delete", abi.FUEL_KV)
def _kv_delete(caller, ctx, h, key, key_len):
    store, k = _store(ctx, h), _read(caller, key, key_len)
    ctx.pending.pop(("kv", store, k), None)
    ctx.kv.delete(store, k)
    return abi.OK


@_hostfn("kv_exists", abi.FUEL_KV)
def _kv_exists(caller, ctx, h, key, key_len):
    return int(ctx.kv.exists(_store(ctx, h), _read(caller, key, key_len)))


@_hostfn("kv_get_keys", abi.FUEL_KV)
def _kv_get_keys(caller, ctx, h, buf, cap):
    store = _store(ctx, h)

    def compute():
        return b"".join(len(k).to_bytes(4, "little") + k for k in ctx.kv.keys(store))

    return _output(caller, ctx, ("keys", store), compute, buf, cap)


@_hostfn("kv_increment", abi.FUEL_KV)
def _kv_increment(caller, ctx, h, key, key_len, delta, out):
    store, k = _store(ctx, h), _read(caller, key, key_len)
    _write(caller, out, b"\0" * 8)  # bounds first: nothing is written to the store for a bad pointer
    ctx.pending.pop(("kv", store, k), None)
    new = ctx.kv.increment(store, k, delta)
    _write(caller, out, new.to_bytes(8, "little", signed=True))
    return abi.OK


def _granted(ctx: _Ctx, name: str) -> None:
    if name not in ctx.fn.spec.host_functions:
        raise HostUnavailable(f"{name} is not granted to this function (host_functions)")


def _remaining(ctx: _Ctx) -> float:
    left = ctx.deadline - time.monotonic()
    if left <= 0:
        ctx.abort = "deadline"
        raise _Abort("deadline")
    return left


@_hostfn("embed_text", abi.FUEL_MODEL)
def _embed_text(caller, ctx, text, n, buf, cap):
    _granted(ctx, "embed_text")
    t = _text(caller, text, n)

    def compute():
        import numpy as np

        return np.ascontiguousarray(ctx.host.embed_text(t, _remaining(ctx)), dtype="<f4").tobytes()

    return _output(caller, ctx, ("embed", t), compute, buf, cap)


@_hostfn("classify_text", abi.FUEL_MODEL)
def _classify_text(caller, ctx, text, n, buf, cap):
    _granted(ctx, "classify_text")
    t = _text(caller, text, n)

    def compute():
        import json

        return json.dumps(ctx.host.classify_text(t, _remaining(ctx)), separators=(",", ":")).encode()

    return _output(caller, ctx, ("classify", t), compute, buf, cap)


@_hostfn("preprocess_image", abi.FUEL_MODEL)
def _preprocess_image(caller, ctx, img, n, buf, cap):
    _granted(ctx, "preprocess_image")
    data = _read(caller, img, n)
    digest = hashlib.sha256(data).digest()

    def compute():
        import numpy as np

        return np.ascontiguousarray(ctx.host.preprocess_image(data, _remaining(ctx)), dtype="<f4").tobytes()

    return _output(caller, ctx, ("image", digest), compute, buf, cap)


@_hostfn("log")
def _log(caller, ctx, level, msg, n):
    text = _read(caller, msg, n).decode("utf-8", "replace")
    lvl = abi.LOG_LEVELS[level] if 0 <= level < len(abi.LOG_LEVELS) else "info"
    log.log(logging.getLevelName(lvl.upper()), "function %s: %s", ctx.fn.spec.name, text)
    return abi.OK


_HOST_FUNCS = {
    "req_method": _req_method, "req_path": _req_path, "req_query": _req_query, "req_header": _req_header,
    "req_headers": _req_headers, "req_body_len": _req_body_len, "req_body_read": _req_body_read,
    "resp_status": _resp_status, "resp_header": _resp_header, "resp_write": _resp_write,
    "kv_open": _kv_open, "kv_get": _kv_get, "kv_set": _kv_set, "kv_delete": _kv_delete, "kv_exists": _kv_exists,
    "kv_get_keys": _kv_get_keys, "kv_increment": _kv_increment,
    "embed_text": _embed_text, "classify_text": _classify_text, "preprocess_image": _preprocess_image,
    "log": _log,
}
assert set(_HOST_FUNCS) == set(abi.IMPORTS)


_WASI_EBADF = 8


def _fd_write(caller, fd, iovs, iovs_len, nwritten):
    """WASI fd_write, shadowing wasmtime's: stdout (1) and stderr (2) go to the
    log line by line, every other descriptor is EBADF (none is ever open).
    (wasmtime-py's custom output callbacks run on wasmtime's tokio threads and
    can fire during interpreter shutdown, which aborts the process.)"""
    ctx = _ctx()
    try:
        if fd not in (1, 2):
            return _WASI_EBADF
        iovs_len &= 0xFFFFFFFF
        if iovs_len > 1024:
            return 28  # EINVAL
        raw = _read(caller, iovs, 8 * iovs_len)
        data = b"".join(_read(caller, int.from_bytes(raw[i:i + 4], "little"), int.from_bytes(raw[i + 4:i + 8], "little"))
                        for i in range(0, len(raw), 8))
        _charge(caller, ctx, abi.FUEL_BASE + len(data))
        buf = ctx.out if fd == 1 else ctx.err
        room = 65536 - len(buf)
        buf += data[:max(0, room)]
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            log.info("function %s %s: %s", ctx.fn.spec.name, "stdout" if fd == 1 else "stderr",
                     line.decode("utf-8", "replace"))
        _write(caller, nwritten, len(data).to_bytes(4, "little"))
        return 0
    except _Bounds:
        return 21  # EFAULT


def _release(exc: BaseException) -> None:
    """Breaks the reference cycle a trap makes (the exception's traceback holds
    wasmtime-py's frames, one of which holds the exception): without this the
    Store, and the guest's whole linear memory, lives until a cyclic GC pass."""
    import traceback

    tb, exc.__traceback__ = exc.__traceback__, None
    if tb is not None:
        traceback.clear_frames(tb)
    exc.__context__ = exc.__cause__ = None


def _trap_message(exc: BaseException) -> str:
    """The cause of a trap in one line (wasmtime's text starts with a backtrace)."""
    text = str(exc).strip()
    if "Caused by:" in text:
        cause = text.split("Caused by:", 1)[1].strip().splitlines()[0].strip()
        return cause.split(": ", 1)[1] if cause[:1].isdigit() and ": " in cause else cause
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines and lines[0].startswith("error while executing") else (lines[0] if lines else
                                                                                       type(exc).__name__)


# -- functions ----------------------------------------------------------------------------------

@dataclass
class LoadedFunction:
    spec: FunctionSpec
    module: Module
    pre: InstancePre
    sha256: str
    has_initialize: bool
    from_cache: bool
    load_ms: float
    calls: int = 0
    errors: int = 0

    def describe(self) -> dict:
        s = self.spec
        return {"name": s.name, "route": s.route, "methods": s.methods, "module": str(s.module),
                "sha256": self.sha256, "abi": abi.ABI_VERSION, "kv_stores": s.kv_stores,
                "host_functions": s.host_functions, "description": s.description,
                "limits": {k: getattr(s.limits, k) for k in s.limits.__dataclass_fields__},
                "compiled_from_cache": self.from_cache, "load_ms": round(self.load_ms, 3),
                "calls": self.calls, "errors": self.errors}


def _check_module(spec: FunctionSpec, desc: dict) -> bool:
    """Exports and imports against tallow:v1; returns whether _initialize is exported."""
    where = f"function {spec.name!r} ({spec.module})"
    exports = desc["exports"]
    if exports.get("memory") != "memory":
        raise FunctionConfigError(f"{where}: the module does not export 'memory' ({abi.ABI_VERSION} needs it)")
    if exports.get("handle") != {"params": [], "results": ["i32"]}:
        raise FunctionConfigError(f"{where}: the module does not export 'handle: () -> i32' "
                                  f"({abi.ABI_VERSION} needs it)")
    init = exports.get("_initialize")
    if init is not None and init != {"params": [], "results": []}:
        raise FunctionConfigError(f"{where}: '_initialize' must be () -> ()")
    for module, name, ty in desc["imports"]:
        if module == "wasi_snapshot_preview1":
            continue
        if module != abi.IMPORT_MODULE or name not in abi.IMPORTS:
            raise FunctionConfigError(f"{where}: imports {module}.{name}, which {abi.ABI_VERSION} does not provide")
        params, results = abi.IMPORTS[name]
        if ty != {"params": list(params), "results": list(results)}:
            raise FunctionConfigError(f"{where}: imports tallow.{name} with the wrong type "
                                      f"(expected {list(params)} -> {list(results)})")
        if name in abi.GRANTABLE and name not in spec.host_functions:
            raise FunctionConfigError(f"{where}: imports tallow.{name}, which is not granted: add "
                                      f"\"{name}\" to its host_functions")
    return init is not None


class Runtime:
    def __init__(self, *, kv: KV | None = None, host: Host | None = None, cache_dir: str | Path | None = None,
                 cache: bool = True):
        self.engine, self.linker = shared_engine()
        self.kv = kv
        self.host = host or Host()
        self.cache = ModuleCache(cache_dir) if cache else None
        self.functions: dict[str, LoadedFunction] = {}

    def compile(self, wasm: bytes) -> tuple[Module, dict, bool]:
        if self.cache is None:
            module = Module(self.engine, wasm)
            return module, describe_module(module), False
        return self.cache.get_or_compile(self.engine, wasm)

    def load(self, spec: FunctionSpec) -> LoadedFunction:
        t0 = time.perf_counter()
        try:
            wasm = read_module(spec.module)
        except OSError as exc:
            raise FunctionConfigError(f"function {spec.name!r}: cannot read {spec.module}: {exc}") from None
        try:
            module, description, hit = self.compile(wasm)
        except WasmtimeError as exc:
            raise FunctionConfigError(f"function {spec.name!r}: {spec.module} is not a valid module: "
                                      f"{str(exc).splitlines()[0]}") from None
        has_init = _check_module(spec, description)
        pre = self.linker.instantiate_pre(module)
        fn = LoadedFunction(spec, module, pre, hashlib.sha256(wasm).hexdigest(), has_init, hit,
                            (time.perf_counter() - t0) * 1000)
        self.functions[spec.name] = fn
        return fn

    def call(self, name: str, req: FnRequest) -> FnResponse:
        fn = self.functions[name]
        fn.calls += 1
        try:
            return self._call(fn, req)
        except FunctionError:
            fn.errors += 1
            raise

    def _call(self, fn: LoadedFunction, req: FnRequest) -> FnResponse:
        lim = fn.spec.limits
        t0 = time.monotonic()
        store = Store(self.engine)
        store.set_limits(memory_size=lim.memory_bytes, table_elements=lim.table_elements,
                         instances=lim.instances, tables=lim.tables, memories=lim.memories)
        store.set_fuel(lim.fuel)
        store.set_epoch_deadline(max(1, math.ceil(lim.deadline_ms / TICK_MS)))
        store.set_wasi(WasiConfig())  # no preopened directories, no environment, no arguments; fd_write: the log
        ctx = _Ctx(fn, req, t0 + lim.deadline_ms / 1000.0, self.kv, self.host)
        _local.ctx = ctx
        failure: FunctionError | None = None
        rc = 0
        instantiated = False
        try:
            instance = fn.pre.instantiate(store)
            instantiated = True
            exports = instance.exports(store)
            if fn.has_initialize:
                exports["_initialize"](store)
            rc = exports["handle"](store)
        except ExitTrap as exc:
            _release(exc)
            if exc.code != 0:
                failure = self._failure(fn, ctx, exc, t0)
        except WasmtimeError as exc:
            _release(exc)
            if not instantiated and not isinstance(exc, Trap) and ctx.abort is None:  # e.g. over its memory limit
                failure = FunctionError(500, f"function {fn.spec.name!r} could not be instantiated: "
                                        f"{_trap_message(exc)}", function=fn.spec.name, kind="instantiate")
            else:
                failure = self._failure(fn, ctx, exc, t0)
        except BaseException as exc:  # Trap, or a host function's _Abort
            _release(exc)
            failure = self._failure(fn, ctx, exc, t0)
        finally:
            _local.ctx = None
            for stream, buf in (("stdout", ctx.out), ("stderr", ctx.err)):
                if buf:
                    log.info("function %s %s: %s", fn.spec.name, stream, buf.decode("utf-8", "replace"))
        fuel_used = lim.fuel - store.get_fuel()
        # Drop the instance and the Store now: the exception caught above (and its
        # traceback, which holds this frame) must not keep the guest's memory alive.
        instance = exports = store = None  # noqa: F841
        if failure is not None:
            raise failure
        if rc != 0:
            raise FunctionError(500, f"function {fn.spec.name!r} failed: handle() returned {rc}",
                                function=fn.spec.name, kind="error_code")
        return FnResponse(ctx.status, ctx.headers, bytes(ctx.body), fuel_used, (time.monotonic() - t0) * 1000)

    def _failure(self, fn: LoadedFunction, ctx: _Ctx, exc: BaseException, t0: float) -> FunctionError:
        name, lim = fn.spec.name, fn.spec.limits
        reason = ctx.abort
        if reason is None and isinstance(exc, Trap):
            code = exc.trap_code
            if code == TrapCode.INTERRUPT:
                reason = "deadline"
            elif code == TrapCode.OUT_OF_FUEL:
                reason = "fuel"
        if reason == "deadline":
            return FunctionError(504, f"function {name!r} exceeded its deadline of {lim.deadline_ms:g} ms "
                                 f"(limits.deadline_ms)", function=name, kind="deadline")
        if reason == "fuel":
            return FunctionError(504, f"function {name!r} ran out of fuel ({lim.fuel} units, limits.fuel)",
                                 function=name, kind="fuel")
        if isinstance(exc, _Abort) or not isinstance(exc, (Trap, WasmtimeError)):
            # wasmtime-py keeps a host function's exception in one global: with several
            # threads it may surface in another thread's call. Ours carry their reason
            # in the context (checked above); anything else is this guest's trap.
            message = "trapped"
        else:
            message = f"trapped: {_trap_message(exc)}"
        log.warning("function %s %s (%.1f ms)", name, message, (time.monotonic() - t0) * 1000)
        return FunctionError(500, f"function {name!r} {message}", function=name, kind="trap")
