"""tallow.functions: sandboxed WebAssembly handlers mounted as HTTP routes
of ``tallow serve`` (issue 13; the seed's Spin / WasmEdge part).

- ``manifest``: ``[[functions]]`` entries of tallow.toml -> ``FunctionSpec``;
- ``abi``: the ``tallow:v1`` guest ABI (docs/functions-abi.md);
- ``runtime``: ``Runtime.call``, built from ``engine`` (wasmtime engine, epoch ticker),
  ``cache`` (compiled modules), ``modules``, ``context`` (deadline, fuel), ``memory`` (the one
  guest-to-host copy), ``hostcalls``, ``wasi`` (shims), ``guestlog``, ``traps``;
- ``kv``: Spin-style key-value stores in the libSQL metadata store;
- ``limits``: per-function limits and their defaults;
- ``routes``: ``mount_functions(app, specs, ...)``, called by tallow.serve.

Serve calls this package; it reaches the models only through ``Host``.
"""

from .abi import ABI_VERSION, ERRORS
from .limits import FunctionConfigError, KVConfig, Limits
from .manifest import FunctionSpec, parse_functions

__all__ = ["ABI_VERSION", "ERRORS", "FunctionConfigError", "FunctionSpec", "KVConfig", "Limits",
           "parse_functions"]
