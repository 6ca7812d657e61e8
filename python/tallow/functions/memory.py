"""Guest memory: the one way bytes cross the boundary in each direction.

``copy_in`` is the only function that copies guest memory into the host. It
works in the order that keeps a hostile guest from making the host allocate
or copy what it did not pay for: the length is computed from the (pointer,
length) pairs alone, each pair is checked against the memory, the total is
checked against the caller's limit, fuel is charged for it, and only then are
bytes copied. ``write_out`` / ``output`` are the other direction (charged
before writing, too).
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Iterable

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
import wasmtime

from . import abi
from .context import CallContext, Refused, charge

U32 = 0xFFFFFFFF


class Bounds(Exception):
    """A (pointer, length) pair outside the guest's memory (the guest gets E_BOUNDS / EFAULT)."""


def _memory(caller, ctx: CallContext) -> tuple[int, int]:
    mem = ctx.memory
    if mem is None:
        mem = ctx.memory = caller.get("memory")
        if mem is None or not isinstance(mem, wasmtime.Memory):
            ctx.memory = None
            raise Bounds()
    size = mem.data_len(caller)
    base = ctypes.addressof(mem.data_ptr(caller).contents) if size else 0
    return base, size


def copy_in(caller, ctx: CallContext, spans: Iterable[tuple[int, int]], *, limit: int, what: str,
            code: int = abi.E_LIMIT, truncate: bool = False) -> bytes | bytearray:
    """The bytes of ``spans`` (pointer, length pairs), concatenated.

    More than ``limit`` bytes in all is refused (``Refused(code)``, nothing
    charged, nothing copied), or, with ``truncate``, cut to the first
    ``limit`` bytes. Every pair must lie inside the memory even where it is
    cut (``Bounds``)."""
    base, size = _memory(caller, ctx)
    checked = []
    total = 0
    for ptr, n in spans:
        ptr &= U32
        n &= U32
        if ptr + n > size:
            raise Bounds()
        checked.append((ptr, n))
        total += n
    limit = max(0, limit)
    if total > limit:
        if not truncate:
            raise Refused(code, f"{what}: {total} bytes, more than the limit of {limit}")
        total, left = limit, limit
        for i, (ptr, n) in enumerate(checked):
            checked[i] = (ptr, min(n, left))
            left -= checked[i][1]
    charge(caller, ctx, total * abi.FUEL_PER_BYTE)
    if total == 0:
        return b""
    chunks = [(p, n) for p, n in checked if n]
    if len(chunks) == 1:
        return ctypes.string_at(base + chunks[0][0], chunks[0][1])
    out = bytearray(total)  # one allocation of the size charged for
    dst = ctypes.addressof((ctypes.c_char * total).from_buffer(out))
    for ptr, n in chunks:
        ctypes.memmove(dst, base + ptr, n)
        dst += n
    return out


def read(caller, ctx: CallContext, ptr: int, n: int, *, limit: int, what: str,
         code: int = abi.E_LIMIT) -> bytes:
    """One (pointer, length) pair through ``copy_in``."""
    return copy_in(caller, ctx, ((ptr, n),), limit=limit, what=what, code=code)


def text(caller, ctx: CallContext, ptr: int, n: int, *, limit: int, what: str) -> str:
    """A UTF-8 string argument (bad UTF-8: UnicodeDecodeError, which host calls answer E_INVALID)."""
    return bytes(read(caller, ctx, ptr, n, limit=limit, what=what)).decode("utf-8")


def check_out(caller, ctx: CallContext, ptr: int, n: int) -> int:
    """The address of guest bytes [ptr, ptr + n), or Bounds."""
    ptr &= U32
    base, size = _memory(caller, ctx)
    if ptr + n > size:
        raise Bounds()
    return base + ptr


def write_out(caller, ctx: CallContext, ptr: int, data: bytes, *, charged: bool = True) -> None:
    """Copies ``data`` into guest memory at ``ptr``, charging its length first (unless ``charged=False``:
    a fixed-size result such as a count, paid for by the call's base price)."""
    addr = check_out(caller, ctx, ptr, len(data))
    if charged:
        charge(caller, ctx, len(data) * abi.FUEL_PER_BYTE)
    if data:
        ctypes.memmove(addr, data, len(data))


def output(caller, ctx: CallContext, key: Any, compute: Callable[[], bytes], buf: int, cap: int) -> int:
    """The two-call pattern: returns the length needed; writes only when it fits."""
    cap &= U32
    data = ctx.pending.pop(key, None)
    if data is None:
        data = compute()
    if len(data) > 0x7FFFFFFF:
        return abi.E_LIMIT
    if len(data) > cap:
        ctx.pending = {key: data}  # kept for the second call only
        return len(data)
    write_out(caller, ctx, buf, data)
    return len(data)
