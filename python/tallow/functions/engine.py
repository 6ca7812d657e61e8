"""The process's one wasmtime Engine (fuel + epoch interruption), its epoch
ticker thread, and the one Linker holding WASI preview 1 (with tallow's
shims over the calls that would copy or sleep without bounds) and the
``tallow:v1`` imports."""

from __future__ import annotations

import functools
import math
import threading
import time

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
from wasmtime import Config, Engine, FuncType, Linker, ValType

from . import abi

TICK_MS = 5.0  # epoch ticker period: a deadline is enforced within one tick
ENGINE_SETTINGS = "consume_fuel=1;epoch_interruption=1;cranelift_opt_level=speed;abi=" + abi.ABI_VERSION

_VAL = {abi.I32: ValType.i32(), abi.I64: ValType.i64()}


@functools.cache
def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


class _Shared:
    lock = threading.Lock()
    engine: Engine | None = None
    linker: Linker | None = None
    ticker: threading.Thread | None = None
    tick_start: float = 0.0  # monotonic time of epoch 0
    ticks: int = 0           # increments made so far (the engine's epoch)


def _tick(engine: Engine) -> None:
    """Advances the epoch by one per TICK_MS of wall clock. A sleep that ran
    late (a busy machine, the GIL) is caught up with several increments, so
    epochs keep to the clock and a deadline is never pushed back; a deadline
    set while the ticker lags is set that much further (``epoch_deadline``),
    so the catch-up never brings one forward either."""
    period = TICK_MS / 1000.0
    while True:
        time.sleep(max(0.0, _Shared.tick_start + (_Shared.ticks + 1) * period - time.monotonic()))
        due = int((time.monotonic() - _Shared.tick_start) / period)
        while _Shared.ticks < due:
            engine.increment_epoch()
            _Shared.ticks += 1


def epoch_deadline(deadline_ms: float) -> int:
    """The epochs from now (wasmtime's ``set_epoch_deadline``) that end a
    request ``deadline_ms`` from now: never before, at most one tick after.
    The epoch in progress may be nearly over (+1), and the ticker may lag the
    clock by some epochs it will catch up in a burst (+ that lag)."""
    due = int((time.monotonic() - _Shared.tick_start) / (TICK_MS / 1000.0))
    lag = max(0, due - _Shared.ticks)
    return math.ceil(deadline_ms / TICK_MS) + 1 + lag


def _functype(params, results) -> FuncType:
    return FuncType([_VAL[p] for p in params], [_VAL[r] for r in results])


def shared_engine() -> tuple[Engine, Linker]:
    """The process's one Engine and Linker (made on first use, with the ticker)."""
    from .hostcalls import HOST_FUNCS
    from .wasi import SHIMS

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
            for name, (params, results, impl) in SHIMS.items():
                linker.define_func("wasi_snapshot_preview1", name, _functype(params, results), impl,
                                   access_caller=True)
            linker.allow_shadowing = False
            for name, (params, results) in abi.IMPORTS.items():
                linker.define_func(abi.IMPORT_MODULE, name, _functype(params, results), HOST_FUNCS[name],
                                   access_caller=True)
            _Shared.engine, _Shared.linker = engine, linker
            _Shared.tick_start, _Shared.ticks = time.monotonic(), 0
            _Shared.ticker = threading.Thread(target=_tick, args=(engine,), name="tallow-wasm-epoch", daemon=True)
            _Shared.ticker.start()
        return _Shared.engine, _Shared.linker
