"""``tallow fn run`` and ``tallow fn compile`` (registered by tallow.cli)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    p_fn = sub.add_parser("fn", help="WebAssembly functions: try a module, fill the compiled cache")
    fsub = p_fn.add_subparsers(dest="fn_command", required=True)
    p_run = fsub.add_parser("run", help="run a module's handle() on one request, without a server")
    p_run.add_argument("module", help=".wasm or .wat file (tallow:v1)")
    p_run.add_argument("--request", default="{}",
                       help='JSON: {"method", "path", "query", "headers": {..}, "body" (text) or "body_base64"}')
    p_run.add_argument("--kv", default=":memory:",
                       help="libSQL file for its key-value stores (default: in memory, gone at exit)")
    p_run.add_argument("--kv-store", action="append", dest="kv_stores",
                       help="grant this store (repeatable; default: default)")
    p_run.add_argument("--host-function", action="append", dest="host_functions", default=[],
                       help="grant embed_text, classify_text or preprocess_image (repeatable)")
    p_run.add_argument("--embedder", help="BERT embedding directory for embed_text (\"default\": all-MiniLM-L6-v2)")
    p_run.add_argument("--deadline-ms", type=float)
    p_run.add_argument("--fuel", type=int)
    p_run.add_argument("--memory-mib", type=int)
    p_run.add_argument("--raw", action="store_true", help="print only the response body, as is")
    p_run.add_argument("--no-cache", action="store_true", help="compile without the on-disk cache")
    p_comp = fsub.add_parser("compile", help="compile modules into the on-disk cache (the server then starts "
                                             "without compiling)")
    p_comp.add_argument("modules", nargs="*", help=".wasm / .wat files")
    p_comp.add_argument("--config", help="also every [[functions]] module of this tallow.toml")
    p_comp.add_argument("--cache-dir", help="default: $TALLOW_WASM_CACHE or ~/.cache/tallow/wasm")


class _CliHost:
    """embed_text with a model loaded on first use (--embedder); preprocess_image as the server's."""

    def __init__(self, embedder: str | None):
        from .runtime import Host

        self._base = Host()
        self._path = embedder
        self._model = None

    def embed_text(self, text, timeout_s):
        from .runtime import HostUnavailable

        if not self._path:
            raise HostUnavailable("tallow fn run was given no --embedder")
        if self._model is None:
            from ..models import load, minilm_path

            self._model = load(minilm_path() if self._path == "default" else self._path, task="embed")
        return self._model.embed([text]).numpy()[0]

    def classify_text(self, text, timeout_s):
        return self._base.classify_text(text, timeout_s)

    def preprocess_image(self, data, timeout_s):
        return self._base.preprocess_image(data, timeout_s)


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.fn_command == "compile":
        return _compile(args)
    from .kv import KV
    from .manifest import parse_function
    from .runtime import FnRequest, FunctionError, Runtime
    from .limits import KVConfig

    try:
        req = json.loads(args.request)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--request is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise ValueError("--request must be a JSON object")
    limits = {k: v for k, v in (("deadline_ms", args.deadline_ms), ("fuel", args.fuel),
                                ("memory_mib", args.memory_mib)) if v is not None}
    stores = args.kv_stores or ["default"]
    kv_config = KVConfig(stores=sorted(set(stores) | {"default"}))
    spec = parse_function({"name": "cli", "route": "/...", "module": str(Path(args.module).resolve()),
                           "methods": ["GET", "POST", "PUT", "PATCH", "DELETE"], "kv_stores": stores,
                           "host_functions": args.host_functions, "limits": limits}, 0, Path.cwd(), kv_config)
    runtime = Runtime(kv=KV(args.kv, kv_config), host=_CliHost(args.embedder), cache=not args.no_cache)
    runtime.load(spec)
    if "preprocess_image" in args.host_functions:
        from ..ops import preprocess as _warm  # noqa: F401  (torch's import is not the guest's deadline)
    body = base64.b64decode(req["body_base64"]) if "body_base64" in req else str(req.get("body", "")).encode()
    headers = [(str(k), str(v)) for k, v in (req.get("headers") or {}).items()]
    fn_req = FnRequest(str(req.get("method", "GET")).upper(), str(req.get("path", "/")), str(req.get("query", "")),
                       headers, body)
    try:
        out = runtime.call("cli", fn_req)
    except FunctionError as exc:
        print(json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}))
        return 1
    finally:
        runtime.kv.close()
    if args.raw:
        sys.stdout.buffer.write(out.body)
        return 0
    try:
        text = {"body": out.body.decode("utf-8")}
    except UnicodeDecodeError:
        text = {"body_base64": base64.b64encode(out.body).decode()}
    print(json.dumps({"status": out.status, "headers": dict(out.headers), **text, "fuel_used": out.fuel_used,
                      "elapsed_ms": round(out.elapsed_ms, 3)}, indent=2))
    return 0


def _compile(args) -> int:
    from .runtime import ModuleCache, read_module, shared_engine

    paths = [Path(m) for m in args.modules]
    if args.config:  # only its [kv] and [[functions]]: this package does not import tallow.serve
        import tomllib

        from .limits import KVConfig
        from .manifest import parse_functions

        config = Path(args.config)
        values = tomllib.loads(config.read_text())
        kv = KVConfig(**values.get("kv", {}))
        paths += [spec.module for spec in parse_functions(values.get("functions"), config.parent, kv)]
    if not paths:
        raise ValueError("nothing to compile: give modules or --config tallow.toml")
    engine, _ = shared_engine()
    cache = ModuleCache(args.cache_dir)
    for path in paths:
        wasm = read_module(path)
        t0 = time.perf_counter()
        _, _, hit = cache.get_or_compile(engine, wasm)
        ms = (time.perf_counter() - t0) * 1000
        print(f"{path}: {'already cached' if hit else 'compiled'} in {ms:.1f} ms -> "
              f"{cache.dir / ModuleCache.names(ModuleCache.key(wasm))[0]}")
    return 0
