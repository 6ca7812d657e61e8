"""``[[functions]]`` entries of tallow.toml, checked at start.

    [[functions]]
    name = "todo"
    route = "/todos/..."            # a trailing "/..." also matches every path below
    methods = ["GET", "POST", "PUT", "DELETE"]
    module = "examples/functions/todo/todo.wasm"   # .wasm or .wat, relative to tallow.toml
    kv_stores = ["default"]         # granted KV stores (default: ["default"])
    host_functions = []             # granted: embed_text, classify_text, preprocess_image
    [functions.limits]              # see tallow.functions.limits.Limits
    deadline_ms = 500

Every error names the entry (``functions[0] (todo)``). What needs the module
itself (its exports and imports) is checked when the server compiles it, and
route clashes when it mounts the routes; both happen before it serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .abi import GRANTABLE
from .limits import FunctionConfigError, KVConfig, Limits

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_ROUTE = re.compile(r"^(/[A-Za-z0-9._~\-]+)+(/\.\.\.)?$|^/\.\.\.$")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_KNOWN = ("name", "route", "methods", "module", "kv_stores", "host_functions", "limits", "description")


@dataclass
class FunctionSpec:
    name: str
    route: str
    module: Path
    methods: list[str] = field(default_factory=lambda: ["GET", "POST"])
    kv_stores: list[str] = field(default_factory=lambda: ["default"])
    host_functions: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    description: str = ""

    @property
    def where(self) -> str:
        return f"function {self.name!r}"

    @property
    def wildcard(self) -> bool:
        return self.route.endswith("/...")

    @property
    def base_route(self) -> str:
        return self.route[: -len("/...")] or "/" if self.wildcard else self.route


def _str_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FunctionConfigError(f"{where}.{key} must be a list of strings, got {value!r}")
    return list(value)


def parse_function(entry: Any, index: int, base_dir: Path, kv: KVConfig) -> FunctionSpec:
    where = f"functions[{index}]"
    if not isinstance(entry, dict):
        raise FunctionConfigError(f"{where} must be a table, got {entry!r}")
    name = entry.get("name")
    if isinstance(name, str):
        where = f"functions[{index}] ({name})"
    for key in entry:
        if key not in _KNOWN:
            raise FunctionConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(_KNOWN)})")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FunctionConfigError(f"{where}.name must match {_NAME.pattern} (lower case, digits, - and _), "
                                  f"got {name!r}")
    route = entry.get("route")
    if not isinstance(route, str) or not _ROUTE.match(route):
        raise FunctionConfigError(f"{where}.route must be an absolute path of plain segments, optionally ending "
                                  f"in '/...' (e.g. \"/todos/...\"), got {route!r}")
    module = entry.get("module")
    if not isinstance(module, str) or not module:
        raise FunctionConfigError(f"{where}.module must be the path of a .wasm or .wat file, got {module!r}")
    path = Path(module).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.suffix not in (".wasm", ".wat"):
        raise FunctionConfigError(f"{where}.module must end in .wasm or .wat, got {module!r}")
    if not path.is_file():
        raise FunctionConfigError(f"{where}.module: no such file {str(path)!r}")
    methods = [m.upper() for m in _str_list(entry.get("methods", ["GET", "POST"]), where, "methods")]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise FunctionConfigError(f"{where}.methods must be some of {', '.join(METHODS)}, got {entry.get('methods')!r}")
    stores = _str_list(entry.get("kv_stores", ["default"]), where, "kv_stores")
    unknown = [s for s in stores if s not in kv.stores]
    if unknown:
        raise FunctionConfigError(f"{where}.kv_stores: no store named {unknown[0]!r} (kv.stores: "
                                  f"{', '.join(kv.stores)})")
    hosts = _str_list(entry.get("host_functions", []), where, "host_functions")
    unknown = [h for h in hosts if h not in GRANTABLE]
    if unknown:
        raise FunctionConfigError(f"{where}.host_functions: unknown host function {unknown[0]!r} "
                                  f"(known: {', '.join(GRANTABLE)})")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise FunctionConfigError(f"{where}.description must be a string, got {description!r}")
    return FunctionSpec(name=name, route=route, module=path, methods=sorted(set(methods), key=METHODS.index),
                        kv_stores=stores, host_functions=hosts, limits=Limits.parse(entry.get("limits"), where),
                        description=description)


def parse_functions(entries: Any, base_dir: str | Path = ".", kv: KVConfig | None = None) -> list[FunctionSpec]:
    """The ``functions`` array of tallow.toml -> checked specs (names and routes unique)."""
    kv = (kv or KVConfig()).check()
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FunctionConfigError(f"functions must be an array of tables ([[functions]]), got {entries!r}")
    specs = [parse_function(e, i, Path(base_dir), kv) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    routes: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.name in seen:
            raise FunctionConfigError(f"functions[{i}] ({s.name}): the name is also used by functions[{seen[s.name]}]")
        seen[s.name] = i
        if s.base_route in routes:
            raise FunctionConfigError(f"functions[{i}] ({s.name}): route {s.route!r} clashes with "
                                      f"functions[{routes[s.base_route]}] ({specs[routes[s.base_route]].name})")
        routes[s.base_route] = i
    return specs
