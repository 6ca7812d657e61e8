"""Helpers for the tallow.functions tests (a module of its own, imported by
name: every folder's conftest.py is named ``conftest``, so ``from conftest
import ...`` finds whichever was loaded first)."""

from __future__ import annotations

import struct
from pathlib import Path

GUESTS = Path(__file__).parent / "guests"
EXAMPLES = Path(__file__).parents[2] / "examples" / "functions"


def spec(name: str, module: str | Path | None = None, **entry):
    from tallow.functions import KVConfig, parse_functions

    module = module or GUESTS / f"{name}.wat"
    return parse_functions([{"name": name, "route": f"/{name}", "module": str(module), **entry}], ".",
                           KVConfig(stores=["default", "other"]))[0]


def kv_body(op: str, store: str, key: bytes = b"", value: bytes = b"") -> bytes:
    """A request for guests/kv.wat."""
    return op.encode() + bytes([len(store)]) + store.encode() + struct.pack("<H", len(key)) + key + value


def kv_answer(body: bytes) -> tuple[int, bytes]:
    return struct.unpack("<i", body[:4])[0], body[4:]
