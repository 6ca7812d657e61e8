"""The WebAssembly runtime: an ``InstancePre`` per function and a fresh
``Store`` per request (so nothing a request leaves in memory, globals or
tables is seen by the next one).

``Runtime.call(name, request)`` runs synchronously on the calling thread;
the server calls it from worker threads (wasmtime runs guest code without
the GIL). Guest failures become ``FunctionError`` with the HTTP status to
answer: a trap 500, a deadline or exhausted fuel 504.

The rest lives in modules of one job each, re-exported here for the code
that imports them from this module:

- ``api``: FnRequest, FnResponse, FunctionError, Host and its errors;
- ``engine``: the shared Engine, its epoch ticker, the Linker;
- ``cache``: the compiled-module cache (ModuleCache);
- ``modules``: reading, describing and checking a module;
- ``context``: one request's state, the deadline and fuel checks;
- ``memory``: guest memory, the one copy-in helper;
- ``hostcalls``: the tallow:v1 imports; ``wasi``: tallow's WASI shims;
- ``guestlog``: what a request writes to the log (bounded, escaped);
- ``traps``: how a run ended, as a FunctionError.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
from wasmtime import ExitTrap, InstancePre, Module, Store, Trap, WasiConfig, WasmtimeError

from . import abi, context, guestlog, traps
from .api import FnRequest, FnResponse, FunctionError, Host, HostInputError, HostUnavailable
from .cache import ModuleCache, UnsafeCacheError
from .engine import epoch_deadline, shared_engine
from .kv import KV
from .limits import FunctionConfigError
from .manifest import FunctionSpec
from .modules import check_module, describe_module, read_module

__all__ = ["FnRequest", "FnResponse", "FunctionError", "Host", "HostInputError", "HostUnavailable",
           "LoadedFunction", "ModuleCache", "Runtime", "UnsafeCacheError", "describe_module", "read_module",
           "shared_engine"]

log = logging.getLogger("tallow.functions")


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
        has_init = check_module(spec, description)
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
        store.set_epoch_deadline(epoch_deadline(lim.deadline_ms))
        store.set_wasi(WasiConfig())  # no preopened directories, no environment, no arguments; fd_write: the log
        # wasmtime's monotonic clock for the guest starts as its WASI context is made (just now):
        # the context, made after it, takes its clock origin then, so an absolute sleep never
        # wakes before the guest's clock says.
        ctx = context.CallContext(fn, req, deadline=t0 + lim.deadline_ms / 1000.0, kv=self.kv, host=self.host)
        context.bind(ctx)
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
            traps.release(exc)
            if exc.code != 0:
                failure = traps.failure(ctx, exc, t0)
        except WasmtimeError as exc:
            traps.release(exc)
            if not instantiated and not isinstance(exc, Trap) and ctx.abort is None:  # e.g. over its memory limit
                failure = FunctionError(500, f"function {fn.spec.name!r} could not be instantiated: "
                                        f"{traps.trap_message(exc)}", function=fn.spec.name, kind="instantiate")
            else:
                failure = traps.failure(ctx, exc, t0)
        except BaseException as exc:  # Trap, or a host function's Abort
            traps.release(exc)
            failure = traps.failure(ctx, exc, t0)
        finally:
            context.bind(None)
            guestlog.flush(ctx)
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
