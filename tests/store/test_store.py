"""MetadataStore on an embedded libSQL file: schema, documents/chunks, FTS5,
filters, images, transactions, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tallow.index import FilterError
from tallow.store import MIGRATIONS, SCHEMA_VERSION, MetadataStore, StoreError
from tallow.store import migrations as M
from tallow.store.store import _fts_query
from tallow.testing import libsql_available

DIM = 8


@pytest.fixture(autouse=True, params=["libsql", "sqlite3"])
def store_driver(request, monkeypatch):
    """Every store test runs on both drivers: the libsql package (x86-64) and
    the stdlib's sqlite3 (its fallback where libsql has no build, e.g. aarch64)."""
    if request.param == "libsql" and not libsql_available():
        pytest.skip("the libsql package is not installed on this platform (no aarch64 build)")
    monkeypatch.setenv("TALLOW_STORE_DRIVER", request.param)
    return request.param


def make_doc(i: int, text: str | None = None, **fields):
    text = text if text is not None else f"Document {i} talks about topic{i % 3}. It has a second sentence."
    doc = {"id": f"doc-{i}", "title": f"Title {i}", "category": ["news", "programming", "science"][i % 3],
           "timestamp": 1_700_000_000 + i, "payload": {"lang": "en" if i % 2 else "de", "n": i},
           "text": text, "content_hash": f"hash-{i}-{len(text)}"}
    doc.update(fields)
    return doc


def chunks_of(doc, dim=DIM, seed=0):
    """Splits the text into sentences, with a deterministic embedding each."""
    rng = np.random.default_rng(seed)
    out, start = [], 0
    text = doc["text"]
    for seq, part in enumerate(p for p in text.split(". ") if p):
        s = text.index(part, start)
        e = s + len(part)
        out.append({"seq": seq, "text": part, "start": s, "end": e,
                    "embedding": rng.standard_normal(dim).astype(np.float32)})
        start = e
    return out


@pytest.fixture
def store(tmp_path):
    s = MetadataStore(tmp_path / "sub" / "tallow.db", embedding_dim=DIM)
    yield s
    s.close()


# -- schema -------------------------------------------------------------------------------

def test_migrations_are_versioned_and_applied_once(tmp_path):
    path = tmp_path / "a" / "b" / "t.db"       # parent directories are created
    s = MetadataStore(path)
    assert s.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1].version
    rows = s._read("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
    s.close()
    s = MetadataStore(path)                    # reopening applies nothing twice
    assert len(s._read("SELECT * FROM schema_migrations")) == len(MIGRATIONS)
    s.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "t.db"
    s = MetadataStore(path)
    s._write([("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
               (SCHEMA_VERSION + 1, "from the future", 0.0))])
    s.close()
    with pytest.raises(StoreError, match="newer than this tallow"):
        MetadataStore(path)


def test_a_later_migration_is_applied_to_an_old_database(tmp_path, monkeypatch):
    path = tmp_path / "t.db"
    MetadataStore(path).close()
    extra = M.Migration(SCHEMA_VERSION + 1, "add a column", ("ALTER TABLE documents ADD COLUMN lang TEXT",))
    monkeypatch.setattr(M, "MIGRATIONS", M.MIGRATIONS + (extra,))
    monkeypatch.setattr(M, "LATEST", extra.version)
    s = MetadataStore(path)
    assert s.schema_version() == extra.version
    assert "lang" in [r[1] for r in s._read("PRAGMA table_info(documents)")]
    s.close()


def test_failed_migration_leaves_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "t.db"
    MetadataStore(path).close()
    bad = M.Migration(SCHEMA_VERSION + 1, "half broken",
                      ("CREATE TABLE new_table (x INTEGER)", "THIS IS NOT SQL"))
    monkeypatch.setattr(M, "MIGRATIONS", M.MIGRATIONS + (bad,))
    monkeypatch.setattr(M, "LATEST", bad.version)
    with pytest.raises(StoreError):
        MetadataStore(path)
    monkeypatch.undo()
    s = MetadataStore(path)
    assert s.schema_version() == SCHEMA_VERSION
    assert not s._read("SELECT name FROM sqlite_master WHERE name = 'new_table'")  # rolled back with it
    s.close()


def test_migration_list_must_be_in_order():
    with pytest.raises(AssertionError, match="1, 2, 3"):
        M.check_sequence((M.Migration(1, "a", ()), M.Migration(3, "c", ())))


def test_embedding_dim_is_checked_against_the_stored_one(tmp_path):
    path = tmp_path / "t.db"
    s = MetadataStore(path, embedding_dim=DIM)
    s.close()
    with pytest.raises(StoreError, match=f"dimension {DIM}.*embedding_dim=16"):
        MetadataStore(path, embedding_dim=16)
    s = MetadataStore(path)                    # no dim asked: the stored one is used
    assert s.stats()["embedding_dim"] == DIM
    s.close()
    with pytest.raises(StoreError, match="positive int"):
        MetadataStore(tmp_path / "u.db", embedding_dim=0)


def test_dim_is_learnt_from_the_first_document(tmp_path):
    s = MetadataStore(tmp_path / "t.db")
    doc = make_doc(1)
    s.put_document(doc, chunks_of(doc, dim=5))
    assert s.stats()["embedding_dim"] == 5
    with pytest.raises(StoreError, match="dimension 6, the store holds dimension 5"):
        s.put_document(make_doc(2), chunks_of(make_doc(2), dim=6))
    s.close()
    with pytest.raises(StoreError, match="dimension 5"):
        MetadataStore(tmp_path / "t.db", embedding_dim=6)


# -- documents and chunks -----------------------------------------------------------------

def test_document_round_trip(store):
    doc = make_doc(1)
    chunks = chunks_of(doc)
    store.put_document(doc, chunks)
    got = store.get_document("doc-1")
    for key in ("id", "title", "category", "timestamp", "payload", "text", "content_hash"):
        assert got[key] == doc[key], key
    assert store.document_hash("doc-1") == doc["content_hash"]
    assert store.document_hash("nope") is None and store.get_document("nope") is None
    assert store.document_count() == 1 and store.chunk_count() == len(chunks) == 2

    ids = [f"doc-1#{c['seq']}" for c in chunks]
    got = store.get_chunks(list(reversed(ids)) + ["missing#0"])
    assert [c["id"] for c in got] == list(reversed(ids))   # asked order, unknown ids left out
    for c in got:
        assert doc["text"][c["start"]:c["end"]] == c["text"]
        assert c["doc_id"] == "doc-1" and c["title"] == doc["title"] and c["category"] == doc["category"]
        assert c["timestamp"] == doc["timestamp"] and c["payload"] == doc["payload"]


def test_reput_replaces_all_chunks_and_fts(store):
    doc = make_doc(1, "alpha beta. gamma delta. epsilon zeta")
    store.put_document(doc, chunks_of(doc))
    assert store.chunk_count() == 3
    new = make_doc(1, "omega only", title="New title", payload={"v": 2})
    store.put_document(new, chunks_of(new))
    assert store.chunk_count() == 1
    assert store.get_chunks(["doc-1#1", "doc-1#2"]) == []
    assert store.fts_search("gamma", 5) == [] and store.fts_search("alpha", 5) == []
    assert [h[0] for h in store.fts_search("omega", 5)] == ["doc-1#0"]
    got = store.get_document("doc-1")
    assert got["title"] == "New title" and got["payload"] == {"v": 2} and got["text"] == "omega only"


def test_delete_document_removes_its_chunks(store):
    for i in range(3):
        d = make_doc(i)
        store.put_document(d, chunks_of(d, seed=i))
    assert store.delete_document("doc-1") is True
    assert store.delete_document("doc-1") is False
    assert store.get_document("doc-1") is None and store.document_count() == 2
    assert store.chunk_count() == 4
    assert all(c["doc_id"] != "doc-1" for c in store.get_chunks([f"doc-{i}#{s}" for i in range(3) for s in range(2)]))
    assert "doc-1#0" not in [h[0] for h in store.fts_search("topic1 document", 10)]


def test_put_document_is_atomic(store):
    """A failure mid-transaction leaves the previous version whole."""
    doc = make_doc(1, "first version. still first")
    store.put_document(doc, chunks_of(doc))
    bad = make_doc(1, "second version. half written")
    chunks = chunks_of(bad)
    chunks[1]["embedding"] = b"\x00" * 3       # fails in Python before anything is written
    with pytest.raises(StoreError):
        store.put_document(bad, chunks)
    # Now a failure inside SQL, after the document row and the chunk delete ran:
    store._write([("CREATE TRIGGER boom BEFORE INSERT ON chunks WHEN new.text = 'boom' "
                   "BEGIN SELECT RAISE(ABORT, 'boom'); END", ())])
    bad = make_doc(1, "second version. boom")
    with pytest.raises(StoreError, match="boom"):
        store.put_document(bad, chunks_of(bad))
    got = store.get_document("doc-1")
    assert got["text"] == "first version. still first"
    assert [c["text"] for c in store.get_chunks(["doc-1#0", "doc-1#1"])] == ["first version", "still first"]
    assert [h[0] for h in store.fts_search("still", 3)] == ["doc-1#1"]
    assert store.fts_search("second", 3) == []


@pytest.mark.parametrize("change, match", [
    (lambda d, c: d.pop("id"), "non-empty str"),
    (lambda d, c: d.update(payload={"x": float("nan")}), "JSON"),
    (lambda d, c: d.update(payload={"x": object()}), "JSON"),
    (lambda d, c: d.update(timestamp="yesterday"), "timestamp"),
    (lambda d, c: c[0].update(end=10_000), "offsets"),
    (lambda d, c: c[0].update(start=-1), "offsets"),
    (lambda d, c: c[1].update(seq=c[0]["seq"]), "unique"),
    (lambda d, c: c[0].update(embedding=np.ones(DIM + 1)), f"dimension {DIM + 1}"),
    (lambda d, c: c[0].update(embedding=np.full(DIM, np.nan)), "NaN"),
    (lambda d, c: c[0].update(embedding=np.full(DIM, np.inf)), "NaN or inf"),
])
def test_bad_documents_are_refused_with_the_reason(store, change, match):
    doc = make_doc(1)
    chunks = chunks_of(doc)
    change(doc, chunks)
    with pytest.raises(StoreError, match=match):
        store.put_document(doc, chunks)
    assert store.document_count() == 0 and store.chunk_count() == 0


def test_iter_chunk_vectors_batches(store):
    expect = {}
    for i in range(7):
        d = make_doc(i)
        cs = chunks_of(d, seed=i)
        store.put_document(d, cs)
        expect.update({f"{d['id']}#{c['seq']}": c["embedding"] for c in cs})
    seen = {}
    sizes = []
    for ids, mat in store.iter_chunk_vectors(batch=4):
        assert mat.dtype == np.float32 and mat.shape == (len(ids), DIM)
        sizes.append(len(ids))
        seen.update(zip(ids, mat))
    assert sizes == [4, 4, 4, 2]
    assert seen.keys() == expect.keys()
    for k in expect:
        np.testing.assert_array_equal(seen[k], expect[k])


# -- full-text search ---------------------------------------------------------------------

@pytest.fixture
def corpus(store):
    texts = {
        0: "Rust has ownership and borrowing. The borrow checker rejects data races",
        1: "Python is dynamically typed. Python has a global interpreter lock",
        2: "Photosynthesis turns light into chemical energy. Plants need light",
        3: "Rust and Python can work together through PyO3 bindings",
    }
    for i, t in texts.items():
        d = make_doc(i, t)
        store.put_document(d, chunks_of(d, seed=i))
    return store


def test_fts_ranks_by_bm25_higher_is_better(corpus):
    hits = corpus.fts_search("python", 10)
    ids = [h[0] for h in hits]
    assert set(ids) == {"doc-1#0", "doc-1#1", "doc-3#0"}
    scores = [h[1] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # A chunk matching more query words ranks above one matching fewer.
    hits = corpus.fts_search("rust python bindings", 10)
    assert hits[0][0] == "doc-3#0"
    assert len(corpus.fts_search("light", 1)) == 1


@pytest.mark.parametrize("query", ['"', "AND", "OR NOT", "NEAR(", "*", "text:", "(((", "a\"b", "^", "-python",
                                   "python AND", "python\x00", "'; DROP TABLE chunks; --"])
def test_fts_query_text_cannot_break_fts5_syntax(corpus, query):
    hits = corpus.fts_search(query, 5)          # no exception whatever the text
    assert isinstance(hits, list)
    assert corpus.chunk_count() == 7


def test_fts_punctuation_only_returns_nothing(corpus):
    assert corpus.fts_search("?!.,;:()[]{}*\"'", 5) == []
    assert corpus.fts_search("", 5) == []
    assert _fts_query("Rust's *borrow* \"checker\"") == '"rust" OR "s" OR "borrow" OR "checker"'


def test_fts_filters_on_document_fields_and_payload(corpus):
    # categories: i % 3 -> 0 news, 1 programming, 2 science; lang: odd en, even de
    assert {h[0] for h in corpus.fts_search("python", 10, {"category": "programming"})} == {"doc-1#0", "doc-1#1"}
    assert {h[0] for h in corpus.fts_search("python", 10, {"lang": "de"})} == set()
    assert {h[0] for h in corpus.fts_search("rust python", 10, {"n": {"gte": 3}})} == {"doc-3#0"}
    assert {h[0] for h in corpus.fts_search("rust python", 10, {"id": {"in": ["doc-0", "doc-3"]}})} == \
        {"doc-0#0", "doc-3#0"}
    assert {h[0] for h in corpus.fts_search("rust", 10, {"must_not": [{"timestamp": 1_700_000_000}]})} == {"doc-3#0"}
    assert {h[0] for h in corpus.fts_search("light", 10, {"should": [{"category": "science"}, {"lang": "en"}]})} \
        == {"doc-2#0", "doc-2#1"}
    with pytest.raises(FilterError, match="'like'"):
        corpus.fts_search("rust", 10, {"title": {"like": "R%"}})
    with pytest.raises(StoreError, match="k must be"):
        corpus.fts_search("rust", 0)


def test_filter_field_names_cannot_inject_sql(corpus):
    evil = "x') OR 1=1; DROP TABLE documents; --"
    assert corpus.fts_search("rust", 10, {evil: "y"}) == []
    assert corpus.document_count() == 4


# -- images -------------------------------------------------------------------------------

def test_images(store):
    rng = np.random.default_rng(0)
    feats = {f"img-{i}": rng.standard_normal(16).astype(np.float32) for i in range(5)}
    shas = {k: f"{i:064x}" for i, k in enumerate(feats)}
    for k, f in feats.items():
        store.put_image(k, shas[k], {"label": k, "source": "test"}, 640, 480, f)
    got = store.get_images(["img-3", "nope", "img-1"])
    assert [g["id"] for g in got] == ["img-3", "img-1"]
    np.testing.assert_array_equal(got[0]["feature"], feats["img-3"])
    assert got[0]["payload"] == {"label": "img-3", "source": "test"} and (got[0]["width"], got[0]["height"]) == (640, 480)
    assert store.image_by_sha(shas["img-2"])["id"] == "img-2"
    assert store.image_by_sha("f" * 64) is None
    ids, mats = [], []
    for i, m in store.iter_image_features(batch=2):
        ids += i
        mats.append(m)
    assert ids == list(feats) and np.array_equal(np.concatenate(mats), np.stack(list(feats.values())))
    assert store.delete_image("img-2") is True and store.delete_image("img-2") is False
    assert store.stats()["images"] == 4
    with pytest.raises(StoreError, match="dimension 8, the store holds dimension 16"):
        store.put_image("x", "0" * 64, {}, 1, 1, np.ones(8))
    with pytest.raises(StoreError, match="sha256"):
        store.put_image("x", "not-a-sha", {}, 1, 1, np.ones(16))
    store.put_image("img-0", shas["img-0"], {"label": "updated"}, 1, 2, np.zeros(16))  # upsert
    assert store.get_images(["img-0"])[0]["payload"] == {"label": "updated"}


# -- misc ---------------------------------------------------------------------------------

def test_stats_sync_noop_and_close(tmp_path):
    s = MetadataStore(tmp_path / "t.db", embedding_dim=DIM)
    d = make_doc(1)
    s.put_document(d, chunks_of(d))
    s.sync()                                   # embedded file: nothing to do
    st = s.stats()
    assert st["mode"] == "embedded" and st["documents"] == 1 and st["chunks"] == 2 and st["schema_version"] == SCHEMA_VERSION
    s.close()
    s.close()                                  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.get_document("doc-1")


def test_concurrent_writers_and_readers(store):
    errors = []

    def writer(t):
        try:
            for i in range(t * 10, t * 10 + 10):
                d = make_doc(i)
                store.put_document(d, chunks_of(d, seed=i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(30):
                store.fts_search("document topic1", 5)
                store.get_chunks(["doc-1#0", "doc-11#1"])
                for _ids, _m in store.iter_chunk_vectors(batch=7):
                    pass
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)] + \
              [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.document_count() == 30 and store.chunk_count() == 60
    assert len(store.fts_search("document", 100)) == 30   # every first sentence, FTS in step with chunks


# -- drivers ---------------------------------------------------------------------------

def test_driver_is_the_one_asked_for_and_files_are_interchangeable(tmp_path, store_driver, monkeypatch):
    """The store reports its driver; a database written through one driver
    opens through the other (libSQL's file format is SQLite's)."""
    path = tmp_path / "t.db"
    s = MetadataStore(path, embedding_dim=DIM)
    assert s.driver.name == store_driver
    doc = make_doc(1)
    s.put_document(doc, chunks_of(doc))
    s.close()
    other = "sqlite3" if store_driver == "libsql" else "libsql"
    if other == "libsql" and not libsql_available():
        return
    monkeypatch.setenv("TALLOW_STORE_DRIVER", other)
    s = MetadataStore(path)
    assert s.driver.name == other
    assert s.get_document("doc-1")["title"] == "Title 1"
    assert [cid for cid, _ in s.fts_search("topic1", k=5)]
    s.close()


def test_sqlite3_driver_refuses_what_needs_libsql_by_name(tmp_path, monkeypatch):
    from tallow.index import LibsqlVectorIndex
    from tallow.store.driver import DriverUnavailable

    monkeypatch.setenv("TALLOW_STORE_DRIVER", "sqlite3")
    with pytest.raises(DriverUnavailable, match="embedded replica .*needs the libsql package"):
        MetadataStore(tmp_path / "r.db", sync_url="http://127.0.0.1:1")
    with pytest.raises(DriverUnavailable, match="vector index .*needs the libsql package"):
        LibsqlVectorIndex(4, path=tmp_path / "v.db")
    monkeypatch.setenv("TALLOW_STORE_DRIVER", "sqlite9")
    with pytest.raises(StoreError, match="TALLOW_STORE_DRIVER must be libsql or sqlite3"):
        MetadataStore(tmp_path / "x.db")
