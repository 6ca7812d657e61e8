"""What a request puts in the server's log: the guest's ``log`` calls, its
stdout and stderr (``fd_write``), and the host's notes about its calls.

Each request has a budget of ``limits.max_log_bytes`` for all of it; past
the budget one line says so and the rest is dropped. Guest text is escaped
before it is logged: control characters (CR, LF, ESC, NUL, ...), Unicode line
and paragraph separators and bidirectional overrides become ``\\xNN`` /
``\\uNNNN``, so a guest cannot end the line it is on and forge another one.
"""

from __future__ import annotations

import logging
import re

from .context import CallContext

log = logging.getLogger("tallow.functions")

_UNSAFE_CHARS = [*range(0x20), *range(0x7F, 0xA0),  # C0 and C1 controls: CR, LF, NUL, ESC, NEL, ...
                 0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A),  # bidi controls
                 0x2028, 0x2029, 0xFEFF]  # line and paragraph separators, BOM
_UNSAFE = re.compile("[" + "".join(re.escape(chr(c)) for c in _UNSAFE_CHARS) + "]")
# str.translate, not re.sub with a callback: a guest can send 64 KiB of control bytes (40x faster)
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE_CHARS}


def escape(text: str) -> str:
    """``text`` on one line, with nothing a terminal or a log reader would act on."""
    return text.translate(_ESCAPES) if _UNSAFE.search(text) else text


def take(ctx: CallContext, n: int) -> int:
    """How many of ``n`` bytes still fit in the request's log budget (and takes them);
    the first time something does not fit, logs that the rest is dropped."""
    k = min(n, ctx.log_room)
    ctx.log_room -= k
    if k < n:
        full(ctx)
    return k


def full(ctx: CallContext) -> None:
    """Says, once per request, that its log budget is spent."""
    if not ctx.log_full:
        ctx.log_full = True
        log.warning("function %s: its log output reached limits.max_log_bytes (%d bytes per request); "
                    "the rest of this request's log output is dropped", ctx.name, ctx.limits.max_log_bytes)


def emit(ctx: CallContext, level: int, source: str | None, data: bytes | bytearray) -> None:
    """Logs guest bytes already counted by ``take`` (``source``: stdout, stderr, or None for ``log``)."""
    if not log.isEnabledFor(level):
        return
    text = escape(bytes(data).decode("utf-8", "replace"))
    if source is None:
        log.log(level, "function %s: %s", ctx.name, text)
    else:
        log.log(level, "function %s %s: %s", ctx.name, source, text)


def note(ctx: CallContext, level: int, message: str) -> None:
    """A host-side note about one of the guest's calls (a refused argument, an
    unavailable model): counted in the budget, as a guest can cause one per call."""
    if log.isEnabledFor(level) and take(ctx, len(message)) == len(message):
        log.log(level, "function %s: %s", ctx.name, escape(message))


def stream(ctx: CallContext, fd: int, data: bytes | bytearray) -> None:
    """stdout (1) / stderr (2) bytes already counted by ``take``: logged a line at a time."""
    buf = ctx.out if fd == 1 else ctx.err
    buf += data
    if b"\n" in buf:
        *lines, rest = bytes(buf).split(b"\n")
        buf[:] = rest
        for line in lines:
            emit(ctx, logging.INFO, "stdout" if fd == 1 else "stderr", line)


def flush(ctx: CallContext) -> None:
    """The last partial line of stdout and stderr, at the end of the request."""
    for fd, buf in ((1, ctx.out), (2, ctx.err)):
        if buf:
            emit(ctx, logging.INFO, "stdout" if fd == 1 else "stderr", buf)
            buf.clear()
