"""A module's bytes and its shape: reading .wasm / .wat, describing its
imports and exports as plain data (what the compiled cache stores beside
the code), and checking that shape against ``tallow:v1``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
import wasmtime
from wasmtime import FuncType, Module, WasmtimeError

from . import abi
from .limits import FunctionConfigError
from .manifest import FunctionSpec


def _sig(ty: Any) -> Any:
    if isinstance(ty, FuncType):
        return {"params": [str(t) for t in ty.params], "results": [str(t) for t in ty.results]}
    if isinstance(ty, wasmtime.MemoryType):
        return "memory"
    return type(ty).__name__


def describe_module(module: Module) -> dict:
    """Exports and imports as plain data (what check_module reads)."""
    return {"exports": {e.name: _sig(e.type) for e in module.exports},
            "imports": [[i.module, i.name, _sig(i.type)] for i in module.imports]}


def read_module(path: str | Path) -> bytes:
    """A module's binary: .wasm as is, .wat compiled to binary by wasmtime."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".wat" or not raw.startswith(b"\0asm"):
        try:
            return bytes(wasmtime.wat2wasm(raw.decode("utf-8")))
        except (WasmtimeError, UnicodeDecodeError) as exc:
            raise FunctionConfigError(f"{path}: not valid WebAssembly text: {exc}") from None
    return raw


def check_module(spec: FunctionSpec, desc: dict) -> bool:
    """Exports and imports against tallow:v1; returns whether _initialize is exported."""
    where = f"function {spec.name!r} ({spec.module})"
    exports = desc["exports"]
    if exports.get("memory") != "memory":
        raise FunctionConfigError(f"{where}: the module does not export 'memory' ({abi.ABI_VERSION} needs it)")
    if exports.get("handle") != {"params": [], "results": ["i32"]}:
        raise FunctionConfigError(f"{where}: the module does not export 'handle: () -> i32' "
                                  f"({abi.ABI_VERSION} needs it)")
    init = exports.get("_initialize")
    if init is not None and init != {"params": [], "results": []}:
        raise FunctionConfigError(f"{where}: '_initialize' must be () -> ()")
    for module, name, ty in desc["imports"]:
        if module == "wasi_snapshot_preview1":
            continue
        if module != abi.IMPORT_MODULE or name not in abi.IMPORTS:
            raise FunctionConfigError(f"{where}: imports {module}.{name}, which {abi.ABI_VERSION} does not provide")
        params, results = abi.IMPORTS[name]
        if ty != {"params": list(params), "results": list(results)}:
            raise FunctionConfigError(f"{where}: imports tallow.{name} with the wrong type "
                                      f"(expected {list(params)} -> {list(results)})")
        if name in abi.GRANTABLE and name not in spec.host_functions:
            raise FunctionConfigError(f"{where}: imports tallow.{name}, which is not granted: add "
                                      f"\"{name}\" to its host_functions")
    return init is not None
