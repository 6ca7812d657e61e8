"""The state of one request while its guest runs, and the two checks every
host call makes before it does any work: the deadline, then fuel.

A context is bound to the thread that entered the guest (wasmtime calls host
functions on that thread), so host calls find it without a lookup table.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
from wasmtime import Store

if TYPE_CHECKING:
    from .api import FnRequest, Host
    from .kv import KV
    from .runtime import LoadedFunction


class Abort(Exception):
    """Raised by a host call to stop the guest (deadline, fuel); the reason is in ``ctx.abort``
    (wasmtime-py may surface a host exception in another thread's call: the context is the truth)."""


class Refused(Exception):
    """A host call refuses its arguments before doing anything; the guest gets ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class CallContext:
    __slots__ = ("fn", "limits", "req", "status", "headers", "header_bytes", "body", "pending", "stores",
                 "abort", "deadline", "clock_origin_ns", "log_room", "log_full", "out", "err", "kv", "host",
                 "memory")

    def __init__(self, fn: "LoadedFunction", req: "FnRequest", *, deadline: float, kv: "KV | None",
                 host: "Host"):
        self.fn = fn
        self.limits = fn.spec.limits
        self.req = req
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0  # name + value + 4 (": ", CRLF) per header, as they go on the wire
        self.body = bytearray()
        self.pending: dict = {}
        self.stores: list[str] = []
        self.abort: str | None = None
        self.deadline = deadline
        self.clock_origin_ns = time.monotonic_ns()  # made right after the guest's WASI clock started
        self.log_room = fn.spec.limits.max_log_bytes
        self.log_full = False
        self.out = bytearray()  # a partial stdout line
        self.err = bytearray()
        self.kv = kv
        self.host = host
        self.memory: Any = None  # the guest's exported memory, looked up on the first host call

    @property
    def name(self) -> str:
        return self.fn.spec.name


_local = threading.local()


def bind(ctx: CallContext | None) -> None:
    _local.ctx = ctx


def current() -> CallContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:  # a host function called outside a request (cannot happen through Runtime.call)
        raise Abort("no request")
    return ctx


def check_deadline(ctx: CallContext) -> None:
    if time.monotonic() >= ctx.deadline:
        ctx.abort = "deadline"
        raise Abort("deadline")


def remaining(ctx: CallContext) -> float:
    """Seconds left before the deadline (> 0), for host work that can wait."""
    left = ctx.deadline - time.monotonic()
    if left <= 0:
        ctx.abort = "deadline"
        raise Abort("deadline")
    return left


def charge(caller, ctx: CallContext, amount: int) -> None:
    """Takes ``amount`` fuel from the guest, or stops it (504) when it has less.
    Called before the work it pays for, so an unpaid copy never happens."""
    check_deadline(ctx)
    if amount <= 0:
        return
    fuel = Store.get_fuel(caller)
    if fuel < amount:
        Store.set_fuel(caller, 0)
        ctx.abort = "fuel"
        raise Abort("fuel")
    Store.set_fuel(caller, fuel - amount)
