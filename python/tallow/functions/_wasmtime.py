"""Imported first by every module of tallow.functions that uses wasmtime: without
the ``functions`` extra the first use names it (MissingExtraError), instead of a
bare ModuleNotFoundError from deep inside the runtime."""

from .._extras import import_extra

wasmtime = import_extra("wasmtime", "functions", "tallow.functions (WebAssembly functions)")
