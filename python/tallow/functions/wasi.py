"""tallow's versions of the WASI preview 1 calls whose wasmtime versions
would let a guest make the host copy or wait without bounds. Everything
else in ``wasi_snapshot_preview1`` is wasmtime's (with no preopened
directory, no environment, no arguments and no socket).

- ``fd_write``: wasmtime's would gather every iovec into one host buffer
  (1,024 iovecs each covering a 4 MiB memory is 4 GiB). Here stdout and
  stderr go to the server's log, at most ``abi.MAX_FD_WRITE_BYTES`` per
  call: a longer write is a short write, as POSIX allows (libc writes the
  rest in further calls, each paid for in fuel). Any other descriptor is
  EBADF, as none is ever open. (wasmtime-py's output callbacks would also
  run on wasmtime's tokio threads, which can fire during interpreter
  shutdown and abort the process.)
- ``poll_oneoff``: wasmtime's sleeps on the host for as long as the guest
  asks, past the deadline. Here a sleep ends at the request's deadline at
  the latest (then 504). Clocks: realtime (0) and monotonic (1); fds 0-2
  are always ready (stdin is empty), others EBADF; as in wasmtime.
"""

from __future__ import annotations

import struct
import time

from . import abi, guestlog
from .context import Abort, charge, check_deadline, current
from .memory import U32, Bounds, check_out, copy_in, write_out

ESUCCESS, EBADF, EFAULT, EINVAL = 0, 8, 21, 28

_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, clock id / fd, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")                # userdata, error, type, nbytes, flags
_CLOCK, _FD_READ, _FD_WRITE = 0, 1, 2
_REALTIME, _MONOTONIC = 0, 1
_ABSTIME = 1


def fd_write(caller, fd, iovs, iovs_len, nwritten):
    ctx = current()
    try:
        charge(caller, ctx, abi.FUEL_BASE)
        if fd not in (1, 2):
            return EBADF
        iovs_len &= U32
        if iovs_len > abi.MAX_IOVECS:
            return EINVAL
        check_out(caller, ctx, nwritten, 4)
        raw = copy_in(caller, ctx, ((iovs, 8 * iovs_len),), limit=8 * abi.MAX_IOVECS, what="fd_write's iovecs")
        spans = [(int.from_bytes(raw[i:i + 4], "little"), int.from_bytes(raw[i + 4:i + 8], "little"))
                 for i in range(0, len(raw), 8)]
        accepted = min(sum(n for _, n in spans), abi.MAX_FD_WRITE_BYTES)
        keep = min(accepted, ctx.log_room)
        # The part the log has no room for is paid for too (dropping it must not be a free loop),
        # and never copied.
        charge(caller, ctx, (accepted - keep) * abi.FUEL_PER_BYTE)
        data = copy_in(caller, ctx, spans, limit=keep, truncate=True, what="fd_write")
        guestlog.take(ctx, accepted)
        guestlog.stream(ctx, fd, data)
        write_out(caller, ctx, nwritten, accepted.to_bytes(4, "little"), charged=False)
        rc = ESUCCESS
    except Bounds:
        rc = EFAULT
    check_deadline(ctx)
    return rc


def poll_oneoff(caller, in_, out, nsubscriptions, nevents):
    ctx = current()
    try:
        charge(caller, ctx, abi.FUEL_BASE)
        n = nsubscriptions & U32
        if n == 0 or n > abi.MAX_POLL_SUBSCRIPTIONS:
            return EINVAL
        raw = copy_in(caller, ctx, ((in_, n * _SUBSCRIPTION.size),), limit=abi.MAX_POLL_SUBSCRIPTIONS *
                      _SUBSCRIPTION.size, what="poll_oneoff's subscriptions")
        check_out(caller, ctx, out, n * _EVENT.size)  # before any wait: a bad buffer fails at once
        check_out(caller, ctx, nevents, 4)
        now, now_real = time.monotonic(), time.time_ns()
        clocks: list[tuple[int, float]] = []   # (userdata, when, on time.monotonic())
        ready: list[bytes] = []
        for userdata, tag, ident, timeout, _precision, flags in _SUBSCRIPTION.iter_unpack(raw):
            if tag == _CLOCK:
                if ident not in (_REALTIME, _MONOTONIC) or flags & ~_ABSTIME:
                    return EINVAL
                if not flags & _ABSTIME:
                    when = now + timeout / 1e9
                elif ident == _MONOTONIC:  # the guest's monotonic clock starts when its WASI context is made
                    when = (ctx.clock_origin_ns + timeout) / 1e9
                else:
                    when = now + (timeout - now_real) / 1e9
                clocks.append((userdata, when))
            elif tag in (_FD_READ, _FD_WRITE):
                if ident not in (0, 1, 2):
                    return EBADF
                ready.append(_EVENT.pack(userdata, 0, tag, 0, 0))
            else:
                return EINVAL
        if not ready:
            wake = min(when for _, when in clocks)
            while (now := time.monotonic()) < wake:
                if now >= ctx.deadline:
                    ctx.abort = "deadline"
                    raise Abort("deadline")
                time.sleep(min(wake, ctx.deadline) - now)
        now = time.monotonic()
        events = ready + [_EVENT.pack(userdata, 0, _CLOCK, 0, 0) for userdata, when in clocks if when <= now]
        write_out(caller, ctx, out, b"".join(events))
        write_out(caller, ctx, nevents, len(events).to_bytes(4, "little"), charged=False)
        rc = ESUCCESS
    except Bounds:
        rc = EFAULT
    check_deadline(ctx)
    return rc


SHIMS = {
    "fd_write": ((abi.I32,) * 4, (abi.I32,), fd_write),
    "poll_oneoff": ((abi.I32,) * 4, (abi.I32,), poll_oneoff),
}
