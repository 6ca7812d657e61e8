"""The ``tallow:v1`` host calls (docs/functions-abi.md), one function each.

Every call goes through ``hostfn``: it checks the deadline and charges the
call's base price before the call does anything, maps refusals to the
guest's error codes, and checks the deadline again when the call returns
(a call that blocked past it answers 504). Guest bytes come in only through
``memory.copy_in`` (size checked against a limit, fuel charged, then
copied); work that can wait (the key-value store, models) is given the time
left before the deadline and no more.
"""

from __future__ import annotations

import hashlib
import json
import logging

from . import abi, guestlog
from .api import HostInputError, HostUnavailable
from .context import Abort, CallContext, Refused, charge, check_deadline, current, remaining
from .kv import KVError
from .memory import U32, Bounds, check_out, copy_in, output, read, text, write_out

log = logging.getLogger("tallow.functions")


def hostfn(name: str, cost: int = abi.FUEL_BASE):
    def wrap(impl):
        def call(caller, *args):
            ctx = current()
            try:
                charge(caller, ctx, cost)
                rc = impl(caller, ctx, *args)
            except Bounds:
                rc = abi.E_BOUNDS
            except Refused as exc:
                guestlog.note(ctx, logging.INFO, f"{name}: {exc}")
                rc = exc.code
            except KVError as exc:
                guestlog.note(ctx, logging.INFO, f"{name}: {exc}")
                rc = exc.code
            except HostUnavailable as exc:
                guestlog.note(ctx, logging.WARNING, f"{name} unavailable: {exc}")
                rc = abi.E_UNAVAILABLE
            except (HostInputError, UnicodeDecodeError) as exc:
                guestlog.note(ctx, logging.INFO, f"{name}: {exc}")
                rc = abi.E_INVALID
            except TimeoutError:
                ctx.abort = "deadline"
                raise Abort("deadline") from None
            except Abort:
                raise
            except Exception:  # a bug on the host side: the guest traps (500); the details go to the log
                log.exception("function %s: host function %s failed", ctx.name, name)
                raise
            check_deadline(ctx)  # the call may have blocked past it
            return rc
        call.__name__ = name
        return call
    return wrap


# -- request ------------------------------------------------------------------------------------

@hostfn("req_method")
def _req_method(caller, ctx, buf, cap):
    return output(caller, ctx, "method", lambda: ctx.req.method.encode(), buf, cap)


@hostfn("req_path")
def _req_path(caller, ctx, buf, cap):
    return output(caller, ctx, "path", lambda: ctx.req.path.encode(), buf, cap)


@hostfn("req_query")
def _req_query(caller, ctx, buf, cap):
    return output(caller, ctx, "query", lambda: ctx.req.query.encode(), buf, cap)


@hostfn("req_header")
def _req_header(caller, ctx, name, name_len, buf, cap):
    want = text(caller, ctx, name, name_len, limit=abi.MAX_NAME_BYTES, what="the header name").lower()
    for k, v in ctx.req.headers:
        if k.lower() == want:
            return output(caller, ctx, ("header", want), lambda: v.encode("latin-1"), buf, cap)
    return abi.E_NOT_FOUND


@hostfn("req_headers")
def _req_headers(caller, ctx, buf, cap):
    return output(caller, ctx, "headers",
                  lambda: "".join(f"{k.lower()}: {v}\n" for k, v in ctx.req.headers).encode("latin-1"), buf, cap)


@hostfn("req_body_len")
def _req_body_len(caller, ctx):
    return len(ctx.req.body)


@hostfn("req_body_read")
def _req_body_read(caller, ctx, offset, buf, cap):
    offset &= U32
    cap &= U32
    body = ctx.req.body
    n = max(0, min(cap, len(body) - offset))
    write_out(caller, ctx, buf, body[offset:offset + n] if n else b"")
    return n


# -- response -----------------------------------------------------------------------------------

@hostfn("resp_status")
def _resp_status(caller, ctx, status):
    if not 100 <= status <= 599:
        return abi.E_INVALID
    ctx.status = status
    return abi.OK


def _token(s: str) -> bool:
    return bool(s) and all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={} ' for c in s)


@hostfn("resp_header")
def _resp_header(caller, ctx, name, name_len, value, value_len):
    lim = ctx.limits
    name_len &= U32
    size = name_len + (value_len & U32) + 4  # "name: value\r\n" on the wire
    if len(ctx.headers) >= lim.max_response_headers:
        raise Refused(abi.E_LIMIT, f"more than limits.max_response_headers={lim.max_response_headers} headers")
    room = min(lim.max_response_header_bytes - ctx.header_bytes,
               lim.max_response_bytes - ctx.header_bytes - len(ctx.body))
    raw = copy_in(caller, ctx, ((name, name_len), (value, value_len)), limit=room - 4,
                  what=f"a header of {size} bytes with {ctx.header_bytes} already sent "
                       f"(limits.max_response_header_bytes={lim.max_response_header_bytes}, counted in "
                       f"limits.max_response_bytes={lim.max_response_bytes})")
    k = bytes(raw[:name_len]).decode("utf-8")
    v = bytes(raw[name_len:]).decode("latin-1")
    if not _token(k) or any(c in v for c in "\r\n\0"):
        return abi.E_INVALID
    ctx.headers.append((k, v))
    ctx.header_bytes += size
    return abi.OK


@hostfn("resp_write")
def _resp_write(caller, ctx, ptr, n):
    lim = ctx.limits
    room = lim.max_response_bytes - len(ctx.body) - ctx.header_bytes
    ctx.body += read(caller, ctx, ptr, n, limit=room,
                     what=f"the response body would pass limits.max_response_bytes={lim.max_response_bytes} "
                          f"(headers included)")
    return abi.OK


# -- key-value stores ---------------------------------------------------------------------------

def _store(ctx: CallContext, handle: int) -> str:
    if not 1 <= handle <= len(ctx.stores):
        raise KVError(abi.E_INVALID, f"no open key-value store with handle {handle}")
    if ctx.kv is None:
        raise KVError(abi.E_IO, "key-value stores are not available here")
    return ctx.stores[handle - 1]


def _key(caller, ctx: CallContext, ptr: int, n: int) -> bytes:
    cfg = ctx.kv.config
    return bytes(read(caller, ctx, ptr, n, limit=cfg.max_key_bytes, code=abi.E_KEY_TOO_LARGE,
                      what=f"key larger than kv.max_key_bytes={cfg.max_key_bytes}"))


def _kv(ctx: CallContext, op: str, *args):
    """A store operation that returns by the deadline (TimeoutError: 504)."""
    return ctx.kv.within(remaining(ctx), op, *args)


@hostfn("kv_open")
def _kv_open(caller, ctx, name, name_len):
    if ctx.kv is None:
        raise KVError(abi.E_NO_SUCH_STORE, "key-value stores are not available here")
    store = ctx.kv.open(text(caller, ctx, name, name_len, limit=abi.MAX_NAME_BYTES, what="the store name"),
                        ctx.fn.spec.kv_stores)
    if store not in ctx.stores:
        ctx.stores.append(store)
    return ctx.stores.index(store) + 1


@hostfn("kv_get", abi.FUEL_KV)
def _kv_get(caller, ctx, h, key, key_len, buf, cap):
    store = _store(ctx, h)
    k = _key(caller, ctx, key, key_len)
    data = ctx.pending.get(("kv", store, k))  # kept by a first call whose buffer was too small
    if data is None:
        data = _kv(ctx, "get", store, k)
        if data is None:
            return abi.E_NOT_FOUND
    return output(caller, ctx, ("kv", store, k), lambda: data, buf, cap)


@hostfn("kv_set", abi.FUEL_KV)
def _kv_set(caller, ctx, h, key, key_len, value, value_len):
    store = _store(ctx, h)
    k = _key(caller, ctx, key, key_len)
    cfg = ctx.kv.config
    v = bytes(read(caller, ctx, value, value_len, limit=cfg.max_value_bytes, code=abi.E_VALUE_TOO_LARGE,
                   what=f"value larger than kv.max_value_bytes={cfg.max_value_bytes}"))
    ctx.pending.pop(("kv", store, k), None)
    _kv(ctx, "set", store, k, v)
    return abi.OK


@hostfn("kv_delete", abi.FUEL_KV)
def _kv_delete(caller, ctx, h, key, key_len):
    store = _store(ctx, h)
    k = _key(caller, ctx, key, key_len)
    ctx.pending.pop(("kv", store, k), None)
    _kv(ctx, "delete", store, k)
    return abi.OK


@hostfn("kv_exists", abi.FUEL_KV)
def _kv_exists(caller, ctx, h, key, key_len):
    store = _store(ctx, h)
    return int(_kv(ctx, "exists", store, _key(caller, ctx, key, key_len)))


@hostfn("kv_get_keys", abi.FUEL_KV)
def _kv_get_keys(caller, ctx, h, buf, cap):
    store = _store(ctx, h)

    def compute():
        return b"".join(len(k).to_bytes(4, "little") + k for k in _kv(ctx, "keys", store))

    return output(caller, ctx, ("keys", store), compute, buf, cap)


@hostfn("kv_increment", abi.FUEL_KV)
def _kv_increment(caller, ctx, h, key, key_len, delta, out):
    store = _store(ctx, h)
    k = _key(caller, ctx, key, key_len)
    check_out(caller, ctx, out, 8)  # bounds first: nothing is stored for a bad pointer
    ctx.pending.pop(("kv", store, k), None)
    new = _kv(ctx, "increment", store, k, delta)
    write_out(caller, ctx, out, new.to_bytes(8, "little", signed=True), charged=False)
    return abi.OK


# -- models and ops -----------------------------------------------------------------------------

def _granted(ctx: CallContext, name: str) -> None:
    if name not in ctx.fn.spec.host_functions:
        raise HostUnavailable(f"{name} is not granted to this function (host_functions)")


@hostfn("embed_text", abi.FUEL_MODEL)
def _embed_text(caller, ctx, ptr, n, buf, cap):
    _granted(ctx, "embed_text")
    t = text(caller, ctx, ptr, n, limit=abi.MAX_TEXT_BYTES, what="embed_text's text")

    def compute():
        import numpy as np

        return np.ascontiguousarray(ctx.host.embed_text(t, remaining(ctx)), dtype="<f4").tobytes()

    return output(caller, ctx, ("embed", t), compute, buf, cap)


@hostfn("classify_text", abi.FUEL_MODEL)
def _classify_text(caller, ctx, ptr, n, buf, cap):
    _granted(ctx, "classify_text")
    t = text(caller, ctx, ptr, n, limit=abi.MAX_TEXT_BYTES, what="classify_text's text")

    def compute():
        return json.dumps(ctx.host.classify_text(t, remaining(ctx)), separators=(",", ":")).encode()

    return output(caller, ctx, ("classify", t), compute, buf, cap)


@hostfn("preprocess_image", abi.FUEL_MODEL)
def _preprocess_image(caller, ctx, img, n, buf, cap):
    _granted(ctx, "preprocess_image")
    data = bytes(read(caller, ctx, img, n, limit=abi.MAX_IMAGE_BYTES, what="preprocess_image's image"))
    digest = hashlib.sha256(data).digest()

    def compute():
        import numpy as np

        return np.ascontiguousarray(ctx.host.preprocess_image(data, remaining(ctx)), dtype="<f4").tobytes()

    return output(caller, ctx, ("image", digest), compute, buf, cap)


# -- diagnostics --------------------------------------------------------------------------------

@hostfn("log")
def _log(caller, ctx, level, msg, n):
    n &= U32
    if n > ctx.log_room:  # refused whole: the guest can log a shorter message
        guestlog.full(ctx)
        return abi.E_LIMIT
    data = read(caller, ctx, msg, n, limit=ctx.log_room, what="log message")
    guestlog.take(ctx, len(data))
    lvl = abi.LOG_LEVELS[level] if 0 <= level < len(abi.LOG_LEVELS) else "info"
    guestlog.emit(ctx, logging.getLevelName(lvl.upper()), None, data)
    return abi.OK


HOST_FUNCS = {
    "req_method": _req_method, "req_path": _req_path, "req_query": _req_query, "req_header": _req_header,
    "req_headers": _req_headers, "req_body_len": _req_body_len, "req_body_read": _req_body_read,
    "resp_status": _resp_status, "resp_header": _resp_header, "resp_write": _resp_write,
    "kv_open": _kv_open, "kv_get": _kv_get, "kv_set": _kv_set, "kv_delete": _kv_delete, "kv_exists": _kv_exists,
    "kv_get_keys": _kv_get_keys, "kv_increment": _kv_increment,
    "embed_text": _embed_text, "classify_text": _classify_text, "preprocess_image": _preprocess_image,
    "log": _log,
}
assert set(HOST_FUNCS) == set(abi.IMPORTS)
