"""Embedded replicas against a real libSQL server (sqld): read local, write global."""

from __future__ import annotations

import numpy as np
import pytest

from tallow.store import SCHEMA_VERSION, MetadataStore, StoreError, StoreUnavailableError
from tallow.testing import needs_libsql

pytestmark = needs_libsql()  # embedded replicas are libSQL's own

DIM = 4


def doc(i: int, text: str = "hello replicated world"):
    return {"id": f"d{i}", "title": f"T{i}", "category": "c", "timestamp": i, "payload": {"i": i},
            "text": text, "content_hash": f"h{i}"}


def chunk(text: str = "hello replicated world", v: float = 1.0):
    return [{"seq": 0, "text": text, "start": 0, "end": len(text), "embedding": np.full(DIM, v, np.float32)}]


@pytest.fixture
def replicas(sqld, tmp_path):
    a = MetadataStore(tmp_path / "a" / "replica.db", sync_url=sqld.url, embedding_dim=DIM)
    b = MetadataStore(tmp_path / "b" / "replica.db", sync_url=sqld.url, embedding_dim=DIM)
    yield a, b
    a.close()
    b.close()


def test_write_through_one_replica_is_read_through_another_after_sync(replicas):
    a, b = replicas
    assert a.stats()["mode"] == "replica" and a.schema_version() == b.schema_version() == SCHEMA_VERSION
    a.put_document(doc(1), chunk())
    a.put_image("img", "ab" * 32, {"label": "cat"}, 2, 3, np.arange(6, dtype=np.float32))
    assert a.get_document("d1")["payload"] == {"i": 1}       # the writer reads its own write
    assert b.get_document("d1") is None                      # b has not pulled yet
    b.sync()
    assert b.get_document("d1")["text"] == "hello replicated world"
    assert b.fts_search("replicated", 5) == a.fts_search("replicated", 5) != []   # FTS triggers ran on the primary
    [(ids, mat)] = list(b.iter_chunk_vectors())
    assert ids == ["d1#0"] and np.array_equal(mat, np.ones((1, DIM), np.float32))
    assert np.array_equal(b.image_by_sha("ab" * 32)["feature"], np.arange(6, dtype=np.float32))
    # and back the other way, including a delete
    b.put_document(doc(2, "second text"), chunk("second text"))
    assert b.delete_document("d1") is True
    a.sync()
    assert a.get_document("d1") is None and a.get_document("d2")["text"] == "second text"
    assert a.chunk_count() == 1 and a.fts_search("replicated", 5) == []


def test_replica_serves_reads_while_the_server_is_down_and_refuses_writes(replicas, sqld, tmp_path):
    a, b = replicas
    a.put_document(doc(1), chunk())
    b.sync()
    sqld.stop()

    # reads keep working from the local replica
    assert b.get_document("d1")["title"] == "T1"
    assert [h[0] for h in b.fts_search("hello", 3)] == ["d1#0"]
    assert b.get_chunks(["d1#0"])[0]["payload"] == {"i": 1}

    # writes fail loudly, naming the primary, and leave nothing half-written
    with pytest.raises(StoreUnavailableError, match=rf"{sqld.url}.*nothing was written"):
        b.put_document(doc(2, "written while down"), chunk("written while down"))
    with pytest.raises(StoreUnavailableError, match=sqld.url):
        b.delete_document("d1")
    with pytest.raises(StoreUnavailableError, match=sqld.url):
        b.sync()
    assert b.get_document("d2") is None and b.get_document("d1") is not None and b.chunk_count() == 1

    # back up on the same address: the refused write was not queued and replayed behind
    # the caller's back, and the one written before the outage survived on the primary
    sqld.start()
    b.sync()
    assert b.get_document("d2") is None and b.document_count() == 1
    b.put_document(doc(2, "written after restart"), chunk("written after restart"))
    c = MetadataStore(tmp_path / "c" / "replica.db", sync_url=sqld.url)   # a fresh replica sees both
    try:
        assert c.document_count() == 2 and c.get_document("d2")["text"] == "written after restart"
        assert c.stats()["embedding_dim"] == DIM
    finally:
        c.close()


def test_a_replica_cannot_be_opened_while_the_primary_is_down(sqld, tmp_path):
    sqld.stop()
    with pytest.raises(StoreUnavailableError, match=sqld.url):
        MetadataStore(tmp_path / "r.db", sync_url=sqld.url)


def test_put_document_through_a_replica_is_atomic_on_the_primary(replicas):
    """A statement failing on the primary mid-transaction rolls the whole
    document back there; the error is an SQL error, not 'unavailable'."""
    a, b = replicas
    a.put_document(doc(1, "first version"), chunk("first version"))
    a._write([("CREATE TRIGGER boom BEFORE INSERT ON chunks WHEN new.text = 'boom' "
               "BEGIN SELECT RAISE(ABORT, 'boom'); END", ())])
    with pytest.raises(StoreError, match="boom") as err:
        a.put_document(doc(1, "boom"), chunk("boom"))
    assert not isinstance(err.value, StoreUnavailableError)
    for s in (a, b):
        s.sync()
        assert s.get_document("d1")["text"] == "first version"
        assert [c["text"] for c in s.get_chunks(["d1#0"])] == ["first version"]
        assert [h[0] for h in s.fts_search("first", 3)] == ["d1#0"] and s.fts_search("boom", 3) == []
    a.put_document(doc(2, "still writable"), chunk("still writable"))   # the connection is usable after it
    b.sync()
    assert b.document_count() == 2


def test_sync_learns_the_embedding_dimension_another_replica_fixed(sqld, tmp_path):
    # Regression: the dimension was read only at open, so a replica opened before
    # the first embedding existed accepted vectors of another dimension after sync.
    a = MetadataStore(tmp_path / "a2" / "replica.db", sync_url=sqld.url)
    b = MetadataStore(tmp_path / "b2" / "replica.db", sync_url=sqld.url)
    try:
        assert b.stats()["embedding_dim"] is None
        a.put_document(doc(1), chunk())
        b.sync()
        assert b.stats()["embedding_dim"] == DIM
        bad = [{**chunk()[0], "embedding": np.ones(DIM + 1, np.float32)}]
        with pytest.raises(StoreError, match="dimension"):
            b.put_document(doc(2), bad)
    finally:
        a.close()
        b.close()
