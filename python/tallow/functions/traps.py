"""How a guest's run ended, as the FunctionError the server answers with:
a trap 500, the deadline or exhausted fuel 504."""

from __future__ import annotations

import logging
import time

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
from wasmtime import Trap, TrapCode, WasmtimeError

from .api import FunctionError
from .context import Abort, CallContext

log = logging.getLogger("tallow.functions")


def release(exc: BaseException) -> None:
    """Breaks the reference cycle a trap makes (the exception's traceback holds
    wasmtime-py's frames, one of which holds the exception): without this the
    Store, and the guest's whole linear memory, lives until a cyclic GC pass."""
    import traceback

    tb, exc.__traceback__ = exc.__traceback__, None
    if tb is not None:
        traceback.clear_frames(tb)
    exc.__context__ = exc.__cause__ = None


def trap_message(exc: BaseException) -> str:
    """The cause of a trap in one line (wasmtime's text starts with a backtrace)."""
    text = str(exc).strip()
    if "Caused by:" in text:
        cause = text.split("Caused by:", 1)[1].strip().splitlines()[0].strip()
        return cause.split(": ", 1)[1] if cause[:1].isdigit() and ": " in cause else cause
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines and lines[0].startswith("error while executing") else (lines[0] if lines else
                                                                                       type(exc).__name__)


def failure(ctx: CallContext, exc: BaseException, t0: float) -> FunctionError:
    name, lim = ctx.name, ctx.limits
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
    if isinstance(exc, Abort) or not isinstance(exc, (Trap, WasmtimeError)):
        # wasmtime-py keeps a host function's exception in one global: with several
        # threads it may surface in another thread's call. Ours carry their reason
        # in the context (checked above); anything else is this guest's trap.
        message = "trapped"
    else:
        message = f"trapped: {trap_message(exc)}"
    log.warning("function %s %s (%.1f ms)", name, message, (time.monotonic() - t0) * 1000)
    return FunctionError(500, f"function {name!r} {message}", function=name, kind="trap")
