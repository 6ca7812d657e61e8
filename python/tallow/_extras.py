"""The optional parts of tallow and the pip extras that install them.

``pip install tallow`` is the core: the native module, ``tallow.ops`` and
``tallow.models`` (torch, numpy, pillow, tokenizers, safetensors, gguf,
jinja2). Everything else is an extra (pyproject.toml
``[project.optional-dependencies]``, README "Install"); a feature whose extra
is missing raises :class:`MissingExtraError` where it is used — never at
``import tallow`` — with the one command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# extra -> the modules a feature of that extra imports (import name: distribution).
# Keep in step with pyproject.toml's extras; tests/test_extras.py checks both ways.
EXTRAS: dict[str, dict[str, str]] = {
    "search": {"hnswlib": "hnswlib"},  # + libsql on x86-64 (the store's driver; sqlite3 elsewhere)
    "qdrant": {"qdrant_client": "qdrant-client"},
    "serve": {"fastapi": "fastapi", "starlette": "starlette", "pydantic": "pydantic", "uvicorn": "uvicorn",
              "orjson": "orjson", "multipart": "python-multipart", "prometheus_client": "prometheus-client",
              "hnswlib": "hnswlib"},
    "redis": {"redis": "redis"},
    "functions": {"wasmtime": "wasmtime"},
    "hub": {"huggingface_hub": "huggingface_hub"},
    "train": {"rich": "rich", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
              "vaderSentiment": "vaderSentiment"},
}


class MissingExtraError(ImportError):
    """A feature needs a pip extra of tallow that is not installed. ``extra``
    names it; the message says what to run."""

    def __init__(self, extra: str, feature: str, module: str):
        self.extra, self.feature, self.module = extra, feature, module
        dist = EXTRAS.get(extra, {}).get(module, module)
        super().__init__(f"{feature} needs tallow's '{extra}' extra ({dist} is not installed): "
                         f"pip install 'tallow[{extra}]'", name=module)


def _missing(extra: str) -> str | None:
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def require(extra: str, feature: str) -> None:
    """Raises MissingExtraError unless every module of ``extra`` is installed."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    module = _missing(extra)
    if module is not None:
        raise MissingExtraError(extra, feature, module)


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """``import module``, or MissingExtraError naming ``extra`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.split(".")[0] != exc.name.split(".")[0]:
            raise  # the module is there but one of *its* imports is missing: a broken install, say so as is
        raise MissingExtraError(extra, feature, module.split(".")[0]) from None


def installed() -> dict[str, bool]:
    """Which extras are fully installed here (for ``tallow info``)."""
    return {extra: _missing(extra) is None for extra in EXTRAS}
