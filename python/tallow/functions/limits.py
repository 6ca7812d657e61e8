"""Per-function limits, with their defaults.

A function's limits are checked on every request: ``fuel`` is deterministic
CPU (WebAssembly instructions, plus a price per host call); ``deadline_ms`` is
wall clock (an epoch ticker interrupts the guest; host calls check it too);
``memory_mib``, ``table_elements``, ``instances``, ``tables`` and
``memories`` are wasmtime store limits; ``max_body_bytes``,
``max_response_bytes``, ``max_response_headers``,
``max_response_header_bytes`` and ``max_log_bytes`` bound what crosses the
boundary (the fixed per-call sizes are in abi.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class FunctionConfigError(ValueError):
    """A bad ``[[functions]]`` entry (or ``[kv]`` setting); the message names it."""


@dataclass
class Limits:
    fuel: int = 2_000_000_000          # ~1-2 s of guest CPU here; out of fuel answers 504
    deadline_ms: float = 1000.0        # wall clock per request; past it the guest is interrupted: 504
    memory_mib: int = 64               # linear memory per request (memory.grow fails beyond it)
    table_elements: int = 10_000
    instances: int = 1
    tables: int = 4
    memories: int = 1
    max_body_bytes: int = 1 << 20      # request body; 413 above it
    max_response_bytes: int = 4 << 20  # body + header bytes; resp_write / resp_header fail with E_LIMIT beyond it
    max_response_headers: int = 64
    # name + value + 4 per header, as sent; 16 KiB is what common HTTP clients (h11, Node) accept in all
    max_response_header_bytes: int = 16 << 10
    max_log_bytes: int = 64 << 10      # per request: log() + stdout + stderr + notes on its calls; then dropped

    def check(self, where: str) -> "Limits":
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise FunctionConfigError(f"{where}.limits.{f.name} must be a positive number, got {v!r}")
        if self.memory_mib > 4096:
            raise FunctionConfigError(f"{where}.limits.memory_mib must be <= 4096 (32-bit memory), "
                                      f"got {self.memory_mib}")
        return self

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mib) << 20

    @classmethod
    def parse(cls, values: Any, where: str) -> "Limits":
        if values is None:
            return cls().check(where)
        if not isinstance(values, dict):
            raise FunctionConfigError(f"{where}.limits must be a table, got {values!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        out = cls()
        for key, value in values.items():
            if key not in known:
                raise FunctionConfigError(f"unknown setting {where}.limits.{key} (known: {', '.join(known)})")
            default = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FunctionConfigError(f"{where}.limits.{key} must be a number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                raise FunctionConfigError(f"{where}.limits.{key} must be an integer, got {value!r}")
            setattr(out, key, float(value) if isinstance(default, float) else value)
        return out.check(where)


@dataclass
class KVConfig:
    """``[kv]`` in tallow.toml: the stores that exist and Spin's limits."""

    stores: list = dataclasses.field(default_factory=lambda: ["default"])
    max_keys: int = 1024
    max_key_bytes: int = 256
    max_value_bytes: int = 1 << 20

    def check(self) -> "KVConfig":
        if not isinstance(self.stores, list) or not all(isinstance(s, str) and s for s in self.stores):
            raise FunctionConfigError(f"kv.stores must be a list of non-empty names, got {self.stores!r}")
        for key in ("max_keys", "max_key_bytes", "max_value_bytes"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FunctionConfigError(f"kv.{key} must be a positive integer, got {v!r}")
        return self
