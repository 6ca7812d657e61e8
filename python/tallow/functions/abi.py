"""The ``tallow:v1`` guest ABI: error codes, imports and their costs.

The full description, for guest authors, is docs/functions-abi.md. In short:
a core WebAssembly module (a "reactor") exports ``memory`` and
``handle() -> i32`` (and ``_initialize`` when its toolchain makes one); it
imports the functions below from the module ``"tallow"``. Every argument and
result is an i32 except ``kv_increment``'s delta (i64). Strings and byte
strings are (pointer, length) pairs into the guest's memory. Outputs of a
size the guest cannot know take a (buffer, capacity) pair and return the
length needed: when it is larger than the capacity nothing is written and
the guest calls again with a buffer that large (the host keeps the value
between the two calls, so the second call computes nothing). Errors are
negative results (``ERRORS``).
"""

from __future__ import annotations

ABI_VERSION = "tallow:v1"
IMPORT_MODULE = "tallow"

OK = 0
E_INVALID = -1          # a bad argument: bad UTF-8, unknown handle, bad status code
E_BOUNDS = -2           # a pointer/length pair outside the guest's memory
E_NOT_FOUND = -3        # no such key / header
E_NO_SUCH_STORE = -4    # kv_open: no store of that name on this server
E_ACCESS_DENIED = -5    # kv_open: the store exists but is not granted to this function
E_STORE_FULL = -6       # kv_set / kv_increment of a new key: the store holds max_keys keys
E_KEY_TOO_LARGE = -7    # key longer than kv.max_key_bytes
E_VALUE_TOO_LARGE = -8  # value longer than kv.max_value_bytes
E_UNAVAILABLE = -9      # host function not granted, or its model not loaded
E_LIMIT = -10           # a size limit: response body / header bytes / header count, log bytes, an argument
E_IO = -11              # the store failed (disk, replica primary unreachable)
E_NOT_INTEGER = -12     # kv_increment of a value that is not a decimal i64

ERRORS: dict[int, str] = {
    E_INVALID: "invalid_argument", E_BOUNDS: "out_of_bounds", E_NOT_FOUND: "not_found",
    E_NO_SUCH_STORE: "no_such_store", E_ACCESS_DENIED: "access_denied", E_STORE_FULL: "store_full",
    E_KEY_TOO_LARGE: "key_too_large", E_VALUE_TOO_LARGE: "value_too_large", E_UNAVAILABLE: "unavailable",
    E_LIMIT: "limit_exceeded", E_IO: "io_error", E_NOT_INTEGER: "not_an_integer",
}

I32, I64 = "i32", "i64"

# name -> (parameter types, result types). Order is the order in docs/functions-abi.md.
IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # request (read-only)
    "req_method": ((I32, I32), (I32,)),                    # (buf, cap) -> len
    "req_path": ((I32, I32), (I32,)),                      # (buf, cap) -> len
    "req_query": ((I32, I32), (I32,)),                     # (buf, cap) -> len (no leading '?')
    "req_header": ((I32, I32, I32, I32), (I32,)),          # (name, name_len, buf, cap) -> len | E_NOT_FOUND
    "req_headers": ((I32, I32), (I32,)),                   # (buf, cap) -> len of "name: value\n"*
    "req_body_len": ((), (I32,)),                          # () -> body length
    "req_body_read": ((I32, I32, I32), (I32,)),            # (offset, buf, cap) -> bytes copied (0 at end)
    # response
    "resp_status": ((I32,), (I32,)),                       # (status 100..599) -> 0
    "resp_header": ((I32, I32, I32, I32), (I32,)),         # (name, name_len, value, value_len) -> 0
    "resp_write": ((I32, I32), (I32,)),                    # (ptr, len) -> 0; appends to the body
    # key-value store
    "kv_open": ((I32, I32), (I32,)),                       # (name, name_len) -> handle > 0
    "kv_get": ((I32, I32, I32, I32, I32), (I32,)),         # (h, key, key_len, buf, cap) -> len | E_NOT_FOUND
    "kv_set": ((I32, I32, I32, I32, I32), (I32,)),         # (h, key, key_len, value, value_len) -> 0
    "kv_delete": ((I32, I32, I32), (I32,)),                # (h, key, key_len) -> 0 (also for a missing key)
    "kv_exists": ((I32, I32, I32), (I32,)),                # (h, key, key_len) -> 1 | 0
    "kv_get_keys": ((I32, I32, I32), (I32,)),              # (h, buf, cap) -> len of (u32 LE len, bytes)*
    "kv_increment": ((I32, I32, I32, I64, I32), (I32,)),   # (h, key, key_len, delta, out_i64_ptr) -> 0
    # models and ops (granted per function)
    "embed_text": ((I32, I32, I32, I32), (I32,)),          # (text, len, buf, cap) -> bytes of f32 LE vector
    "classify_text": ((I32, I32, I32, I32), (I32,)),       # (text, len, buf, cap) -> bytes of JSON
    "preprocess_image": ((I32, I32, I32, I32), (I32,)),    # (img, len, buf, cap) -> bytes of f32 [3,224,224]
    # diagnostics
    "log": ((I32, I32, I32), (I32,)),                      # (level 0..3, msg, len) -> 0
}

# Host functions a manifest grants by name (the others are always linked).
GRANTABLE = ("embed_text", "classify_text", "preprocess_image")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Fuel charged by a host call (on top of the guest's own instructions): a
# base price, one unit per byte copied across the boundary, and a flat price
# for the calls that run a model or an op (roughly their CPU time in
# instruction-equivalents on a 2-core machine).
FUEL_BASE = 1_000
FUEL_PER_BYTE = 1
FUEL_KV = 50_000
FUEL_MODEL = 20_000_000

# Sizes of what a guest can hand the host in one call: each is checked
# before anything is charged or copied (docs/functions-abi.md, "Limits").
# The per-function ones (response body and headers, log) are in limits.Limits.
MAX_NAME_BYTES = 1024             # req_header's name, kv_open's store name
MAX_TEXT_BYTES = 1 << 20          # embed_text / classify_text (the models cut far sooner, at their token limit)
MAX_IMAGE_BYTES = 32 << 20        # preprocess_image's encoded image
MAX_FD_WRITE_BYTES = 64 << 10     # WASI fd_write: taken per call (a longer write is a short write)
MAX_IOVECS = 1024                 # WASI fd_write: iovecs per call (IOV_MAX)
MAX_POLL_SUBSCRIPTIONS = 1024     # WASI poll_oneoff: subscriptions per call

REQUIRED_EXPORTS = ("memory", "handle")
