"""The ``tallow`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from ._extras import MissingExtraError
from .errors import InputError


def _print_info(as_json: bool) -> int:
    from . import info

    report = info()
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tallow {report['version']} (torch {report['torch']})")
    nat = report["native"]
    if nat["available"]:
        print(f"native module : {nat['module']}")
        print(f"compiler      : {nat['compiler']}")
        print(f"cpu features  : {nat['cpu_features']}")
        print(f"isa           : {nat['isa']} (best on this CPU: {nat['best_isa']}; "
              f"{nat['arch']} build tiers: {', '.join(nat['isa_levels'])})")
        print(f"threads       : {nat['threads']}")
    else:
        print(f"native module : NOT AVAILABLE ({nat['error']})")
    cm = report.get("cuda_module", {})
    if cm.get("built"):
        print(f"cuda module   : {cm['module']} ({cm['devices']} device(s)"
              + (f"; {cm['error']}" if cm.get("error") else "") + ")")
    else:
        print(f"cuda module   : not built ({cm.get('error')})")
    backends = ", ".join(name for name, ok in report["backends"].items() if ok)
    print(f"backends      : {backends}")
    extras = report["extras"]
    missing = [name for name, ok in extras.items() if not ok]
    print(f"extras        : {', '.join(name for name, ok in extras.items() if ok) or 'none'}"
          + (f" (not installed: {', '.join(missing)})" if missing else ""))
    print(f"gpu kernels   : {report['gpu_kernels']}")
    if report.get("backend_override"):
        print(f"TALLOW_BACKEND: {report['backend_override']}")
    return 0


class DocumentFileError(InputError):
    """A document file the command refused before anything was written; the
    message names the file and line."""


def read_documents(paths: list[str]) -> list[dict]:
    """txt / md files: one document each (id = the path as given, title = the
    file name). jsonl: one document per line {id?, title?, text, category?,
    timestamp?, payload?}; a missing id becomes "<path>:<line number>".
    Every document is checked here, where its file and line are known, with
    the engine's own rules (``normalize_document``), and with the server's rule
    for repeated ids (``unique_documents``: an exact repeat is kept once, two
    different documents with one id are refused naming both places)."""
    from pathlib import Path

    from .engine.documents import RepeatedId, normalize_document, unique_documents

    docs: list[dict] = []
    normalized: list[dict] = []
    places: list[str] = []  # "file:line" (or file) of each document

    def take(doc: dict, place: str) -> None:
        try:
            normalized.append(normalize_document(doc))
        except ValueError as exc:
            # the engine numbers documents within a call ("document 0: ..."): the place says more
            message = str(exc).removeprefix("document 0: ").removeprefix("document 0 ")
            raise DocumentFileError(f"{place}: {message}") from None
        docs.append(doc)
        places.append(place)

    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DocumentFileError(f"{p}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".txt", ".md", ".markdown"):
            take({"id": str(p), "title": path.name, "text": path.read_text(encoding="utf-8")}, str(p))
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DocumentFileError(f"{p}:{n}: not valid JSON ({exc})") from None
                    if not isinstance(doc, dict):
                        raise DocumentFileError(f"{p}:{n}: a line must be a JSON object, got {type(doc).__name__}")
                    doc.setdefault("id", f"{p}:{n}")
                    take(doc, f"{p}:{n}")
        else:
            raise DocumentFileError(f"{p}: unsupported file type {suffix or '(none)'} (txt, md, jsonl)")
    try:
        return [docs[i] for i in unique_documents(normalized)]
    except RepeatedId as exc:
        raise DocumentFileError(f"{places[exc.index]}: id {exc.doc_id!r} was already used at "
                                f"{places[exc.earlier]} by a document with other content") from None


def _engine(args, **kw):
    import os

    from .engine import Engine

    generator = getattr(args, "generator", None) or os.environ.get("TALLOW_GENERATOR")
    return Engine(args.data_dir, index=args.index, quantize="int8" if args.int8 else None,
                  generator_path=generator, sync_url=args.sync_url or os.environ.get("TALLOW_SYNC_URL"),
                  auth_token=os.environ.get("TALLOW_AUTH_TOKEN"), **kw)


def _parse_filter(text: str | None):
    if text is None:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--filter must be JSON, e.g. '{{\"category\": \"news\"}}' ({exc})") from exc
    return spec


def _existing_data(args) -> None:
    """search / stats / rag read an index: a data directory that does not exist
    is a mistake to report (a typo in --data-dir), not one to create empty."""
    from pathlib import Path

    if not Path(args.data_dir).is_dir():
        raise ValueError(f"no data directory {args.data_dir!r}: add documents first "
                         f"(tallow index add FILE... --data-dir {args.data_dir}), or pass the --data-dir "
                         "that holds them")


def _empty_index_message(eng, data_dir: str) -> str | None:
    if eng.store.document_count() == 0:
        return (f"the index in {data_dir!r} holds no documents: add some with "
                f"tallow index add FILE... --data-dir {data_dir}")
    return None


def _index_cmd(args) -> int:
    if args.index_command == "add":
        try:
            docs = read_documents(args.files)
        except DocumentFileError as exc:
            raise DocumentFileError(f"{exc} (nothing was ingested: every document is checked before any is written)") \
                from None
        with _engine(args) as eng:
            summary = eng.ingest(docs, batch_size=args.batch_size, progress=not args.no_progress)
        s = summary.to_dict()
        if args.json:
            print(json.dumps(s))
        else:
            print(f"{s['documents']} documents: {s['added']} added, {s['updated']} updated, "
                  f"{s['unchanged']} unchanged; {s['chunks']} chunks in {s['seconds']:.1f} s")
        return 0
    if args.index_command == "search":
        _existing_data(args)
        with _engine(args) as eng:
            empty = _empty_index_message(eng, args.data_dir)
            if empty is not None:
                print(f"tallow index: {empty}", file=sys.stderr)
                return 1
            results = eng.search(args.query, k=args.k, filter=_parse_filter(args.filter),
                                 score_threshold=args.threshold, hybrid=args.hybrid)
        if args.json:
            print(json.dumps([r.to_dict() for r in results]))
        else:
            if not results:
                print("no results")
            for i, r in enumerate(results, start=1):
                text = " ".join(r.text.split())
                print(f"{i:2d}. {r.score:.4f}  {r.doc_id}" + (f" — {r.title}" if r.title else "")
                      + f"  [{r.start}:{r.end}]\n    {text[:200]}{'…' if len(text) > 200 else ''}")
        return 0
    if args.index_command == "stats":
        _existing_data(args)
        with _engine(args) as eng:
            st = eng.stats()
        if args.json:
            print(json.dumps(st))
        else:
            for key in ("data_dir", "index", "documents", "chunks", "indexed_chunks", "embedding_dim",
                        "chunk_tokens", "overlap"):
                print(f"{key:15s}: {st[key]}")
            print(f"{'store file':15s}: {st['store']['path']} ({st['store']['file_bytes']} bytes)")
        return 0
    raise ValueError(f"unknown index command {args.index_command}")


def _rag_cmd(args) -> int:
    _existing_data(args)
    with _engine(args) as eng:
        empty = _empty_index_message(eng, args.data_dir)
        if empty is not None:
            print(f"tallow rag: {empty}", file=sys.stderr)
            return 1
        ans = eng.rag(args.question, k=args.k, max_new_tokens=args.max_new_tokens,
                      filter=_parse_filter(args.filter))
    if args.json:
        print(json.dumps(ans.to_dict()))
        return 0
    print(ans.answer if ans.mode == "generative" else f"(extractive: no generator set) {ans.answer}")
    print("\nsources:")
    for i, s in enumerate(ans.sources, start=1):
        print(f"[{i}] {s['doc_id']}" + (f" — {s['title']}" if s["title"] else "")
              + f" (score {s['score']:.4f}{', trimmed' if s['trimmed'] else ''})")
    return 0


def _common(p) -> None:
    p.add_argument("--data-dir", default="data", help="data directory (default ./data)")
    p.add_argument("--index", default="hnsw", choices=["hnsw", "qdrant", "libsql"], help="vector index backend")
    p.add_argument("--int8", action="store_true", help="INT8 embedding model")
    p.add_argument("--sync-url", help="libSQL primary to replicate (or TALLOW_SYNC_URL; token: TALLOW_AUTH_TOKEN)")
    p.add_argument("--json", action="store_true", help="print as JSON")


def _serve_cmd(args) -> int:
    import os

    from .serve import ConfigError, ListenError, load_config, serve
    from .serve.config import find_config_file

    path, reason = find_config_file(args.config, no_config=args.no_config)
    try:
        config = load_config(
            path,
            **{"server.host": args.host, "server.port": args.port, "data.dir": args.data_dir,
               "models.embedder": args.embedder, "models.classifier": args.classifier,
               "models.generator": args.generator, "models.image": args.image_model,
               "models.quantize": "int8" if args.int8 else None, "cache.url": args.cache_url,
               "server.api_key": args.api_key or os.environ.get("TALLOW_API_KEY"),
               "server.read_only_api_keys": (args.read_only_api_keys
                                             or os.environ.get("TALLOW_READ_ONLY_API_KEYS") or None),
               "server.insecure_no_auth": True if args.insecure_no_auth else None,
               "data.demo_corpus": False if args.no_demo else None, "workers.mode": args.workers})
    except ConfigError as exc:
        print(f"tallow serve: error: {exc}", file=sys.stderr)
        return 2
    from .functions import FunctionConfigError

    try:
        serve(config, config_reason=reason)
    except FunctionConfigError as exc:  # a [[functions]] module or route refused at start
        print(f"tallow serve: error: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"tallow serve: error: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


def _pull_cmd(args) -> int:
    from .models.hub import pull

    path = pull(args.model_id, args.revision, allow_pickle=args.allow_pickle)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="tallow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tallow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, native build, ISA, threads, backends")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_check = sub.add_parser("selfcheck", help="every op of this build against its reference, on this CPU")
    p_check.add_argument("--isa", help="run on this ISA tier (e.g. scalar, avx2); default: the one this CPU runs")
    p_check.add_argument("--json", action="store_true", help="print as JSON")

    p_index = sub.add_parser("index", help="add documents to, search and inspect the index")
    isub = p_index.add_subparsers(dest="index_command", required=True)
    p_add = isub.add_parser("add", help="ingest txt, md and jsonl files")
    p_add.add_argument("files", nargs="+")
    p_add.add_argument("--batch-size", type=int, default=64)
    p_add.add_argument("--no-progress", action="store_true")
    _common(p_add)
    p_search = isub.add_parser("search", help="search the index")
    p_search.add_argument("query")
    p_search.add_argument("--k", type=int, default=10)
    p_search.add_argument("--filter", help='JSON filter, e.g. \'{"category": "news"}\'')
    p_search.add_argument("--threshold", type=float, help="minimum score")
    p_search.add_argument("--hybrid", action="store_true", help="fuse BM25 keyword and vector results (RRF)")
    _common(p_search)
    p_stats = isub.add_parser("stats", help="documents, chunks, index size")
    _common(p_stats)

    p_rag = sub.add_parser("rag", help="answer a question from the indexed documents (GPT-2, or the closest "
                                       "sentences without a generator)")
    p_rag.add_argument("question")
    p_rag.add_argument("--k", type=int, default=4)
    p_rag.add_argument("--max-new-tokens", type=int, default=64)
    p_rag.add_argument("--filter")
    p_rag.add_argument("--generator", help="GPT-2 model directory or Hub id (or TALLOW_GENERATOR)")
    _common(p_rag)

    p_pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub into its cache",
                            description="Downloads the files tallow reads (config.json, tokenizer.json, safetensors "
                                        "weights, sentence-transformers pooling) of a Hub model into the Hugging Face "
                                        "cache (HF_HOME) and prints the snapshot directory. Honours HF_ENDPOINT, "
                                        "HF_TOKEN and HF_HUB_OFFLINE. Afterwards the id works offline wherever a "
                                        "model path does.")
    p_pull.add_argument("model_id", help="e.g. openai-community/gpt2 (or ID@REVISION)")
    p_pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    p_pull.add_argument("--allow-pickle", action="store_true",
                        help="also fetch pytorch_model.bin (a pickle) when the model has no safetensors weights")

    p_serve = sub.add_parser("serve", help="run the HTTP server (FastAPI on uvicorn)")
    p_serve.add_argument("--config", help="the settings file (default: $TALLOW_CONFIG, else ./tallow.toml if there "
                                          "is one, else the embedded defaults; flags override the file)")
    p_serve.add_argument("--no-config", action="store_true",
                         help="ignore ./tallow.toml and TALLOW_CONFIG: the embedded defaults and the flags only")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--data-dir", help="index and libSQL file (default ./data)")
    p_serve.add_argument("--embedder", help="BERT embedding model directory or Hub id (default: all-MiniLM-L6-v2)")
    p_serve.add_argument("--classifier", help="BERT sequence-classification directory or Hub id (default: "
                                              "tallow:sentiment, the shipped head; '' for none)")
    p_serve.add_argument("--generator", help="GPT-2 or Llama-family directory, .gguf file, Hub id, or "
                                             "tallow:smollm2-135m-instruct (the default); '' for none")
    p_serve.add_argument("--image-model", help="ResNet-50 directory, torchvision .pth or Hub id (microsoft/resnet-50)")
    p_serve.add_argument("--int8", action="store_true", default=None, help="INT8 linear layers for every model")
    p_serve.add_argument("--cache-url", help="redis://host:port/db for the feature cache (default: in-process LRU)")
    p_serve.add_argument("--api-key", help="a full API key: every route then needs a key (or TALLOW_API_KEY; "
                                           "more in server.api_keys)")
    p_serve.add_argument("--read-only-api-keys", metavar="KEY[,KEY...]",
                         help="comma-separated keys for the reading routes only (or TALLOW_READ_ONLY_API_KEYS)")
    p_serve.add_argument("--insecure-no-auth", action="store_true", default=None,
                         help="serve without any API key on an address other than loopback, on purpose")
    p_serve.add_argument("--no-demo", action="store_true", default=None, help="do not index the demo corpus")
    p_serve.add_argument("--workers", choices=["process", "inline"],
                         help="models in worker processes of their own (default) or inside the server process")

    from .functions import cli as fn_cli

    fn_cli.add_parser(sub)

    from .train.cli import add_parser as _add_train_parser

    _add_train_parser(sub)

    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except MissingExtraError as exc:  # a feature of an extra that is not installed: say which, no traceback
        print(f"tallow {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args) -> int:
    if args.command == "serve":
        return _serve_cmd(args)
    if args.command == "info":
        return _print_info(args.json)
    if args.command == "selfcheck":
        from . import NativeUnavailableError, selfcheck

        try:
            return selfcheck.main(args.isa, args.json)
        except (ValueError, NativeUnavailableError) as exc:  # an ISA this CPU lacks; no native module
            print(f"tallow selfcheck: error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "index":
            return _index_cmd(args)
        if args.command == "rag":
            return _rag_cmd(args)
        if args.command == "fn":
            from .functions import cli as fn_cli

            return fn_cli.run(args)
        if args.command == "pull":
            return _pull_cmd(args)
        if args.command == "train":
            from .train.cli import run as _train_cmd

            return _train_cmd(args)
    except (ValueError, RuntimeError) as exc:  # EngineError, FilterError, StoreError, ...
        print(f"tallow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
