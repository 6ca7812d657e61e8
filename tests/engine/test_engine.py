"""Ingestion, search, hybrid search, RAG and bad input on a small real corpus
(stdlib docstrings) with the real MiniLM embedder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tallow.testing import needs_libsql

from tallow.engine import Engine, EngineError, IndexRebuiltWarning, chunk_text, content_hash, rrf_fuse
from tallow.index import FilterError




def _q(eng_or_embedder, doc: dict, seq: int = 1) -> str:
    """The text of chunk ``seq`` of ``doc``: a query whose best match is known."""
    emb = eng_or_embedder.embedder if isinstance(eng_or_embedder, Engine) else eng_or_embedder
    chunks = chunk_text(emb.tokenizer._tok, doc["text"], 32, 8)
    return chunks[min(seq, len(chunks) - 1)].text


def _consistent(eng: Engine) -> None:
    """Every stored document has exactly the chunks its text chunks into, each
    in the index with the document's hash; the index holds nothing else."""
    entries = eng._index_entries()
    store_ids = set()
    for ids, vecs in eng.store.iter_chunk_vectors():
        store_ids.update(ids)
        assert np.isfinite(vecs).all()
    docs = {cid.rsplit("#", 1)[0] for cid in store_ids}
    assert eng.store.document_count() == len(docs)  # no document without chunks
    hf = eng.embedder.tokenizer._tok
    for d in docs:
        doc = eng.store.get_document(d)
        expected = chunk_text(hf, doc["text"], eng.chunk_tokens, eng.overlap)
        got = eng.store.get_chunks([f"{d}#{c.seq}" for c in expected])
        assert [(c["start"], c["end"], c["text"]) for c in got] == [(c.start, c.end, c.text) for c in expected], d
        assert len([x for x in store_ids if x.rsplit("#", 1)[0] == d]) == len(expected)
        for c in expected:
            assert entries.get(f"{d}#{c.seq}") == doc["content_hash"]
    assert set(entries) == store_ids


def test_chunks_are_exact_slices_with_overlap(embedder, docs):
    hf = embedder.tokenizer._tok
    text = docs[0]["text"] + " " + docs[1]["text"]
    chunks = chunk_text(hf, text, 20, 5)
    offsets = [o for o in hf.encode(text, add_special_tokens=False).offsets if o[1] > o[0]]
    assert len(chunks) == math.ceil((len(offsets) - 20) / 15) + 1
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert len(hf.encode(c.text, add_special_tokens=False).ids) <= 20 + 2  # re-tokenising a slice is stable
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # windows overlap
    assert chunks[0].start == offsets[0][0] and chunks[-1].end == offsets[-1][1]
    assert chunk_text(hf, "   ", 20, 5) == []
    with pytest.raises(ValueError, match="overlap"):
        chunk_text(hf, text, 8, 8)


def test_ingest_then_search_finds_the_source(engine, docs, sentences):
    st = engine.stats()
    assert st["documents"] == len(docs) and st["chunks"] == st["indexed_chunks"] > len(docs)
    query = _q(engine, docs[7])
    results = engine.search(query, k=5)
    assert len(results) == 5
    top = results[0]
    assert top.chunk_id == "doc-7#1" and top.text == query and top.score == pytest.approx(1.0, abs=1e-4)
    assert top.doc_id == "doc-7" and top.title == "Document 7" and top.category == "b"
    assert top.payload == {"n": 7, "even": False} and top.timestamp == 1007
    src = docs[7]["text"]
    assert src[top.start:top.end] == top.text and top.chunk_id.startswith("doc-7#")
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert all(r.score >= 0.5 for r in engine.search(query, k=5, score_threshold=0.5))
    _consistent(engine)


def test_reingest_same_content_adds_nothing(engine, docs):
    before = engine.stats()
    s = engine.ingest(docs, progress=False)
    assert (s.added, s.updated, s.unchanged, s.chunks) == (0, 0, len(docs), 0)
    after = engine.stats()
    assert (after["documents"], after["chunks"], after["indexed_chunks"]) == (
        before["documents"], before["chunks"], before["indexed_chunks"])


def test_changed_content_replaces_old_chunks(engine, docs, sentences):
    old = docs[4]["text"]
    new = "Completely different text about the zlib checksum functions, nothing else."
    s = engine.ingest([{**docs[4], "text": new}], progress=False)
    assert (s.added, s.updated) == (0, 1)
    doc4 = [r for r in engine.search(old, k=50) if r.doc_id == "doc-4"]
    assert doc4 and all(r.text == new for r in doc4)  # no old chunk is found any more
    hits = engine.search(sentences[6 * 4], k=10)
    assert all(old[:40] not in r.text for r in hits)
    assert engine.store.get_chunks(["doc-4#1", "doc-4#2"]) == []
    _consistent(engine)
    # a metadata-only change is a change too (filters must see it)
    engine.ingest([{**docs[4], "text": new, "category": "z"}], progress=False)
    assert {r.doc_id for r in engine.search("zlib checksum", k=3, filter={"category": "z"})} == {"doc-4"}
    assert engine.delete_document("doc-4") and not engine.delete_document("doc-4")
    assert all(r.doc_id != "doc-4" for r in engine.search(new, k=10))
    _consistent(engine)


def test_filters(engine, sentences):
    q = sentences[10]
    res = engine.search(q, k=8, filter={"category": "a"})
    assert len(res) == 8 and all(r.category == "a" for r in res)
    res = engine.search(q, k=50, filter={"timestamp": {"gte": 1010, "lt": 1013}})
    assert res and {r.doc_id for r in res} <= {"doc-10", "doc-11", "doc-12"}
    res = engine.search(q, k=50, filter={"even": True, "must_not": [{"n": {"in": [0, 2]}}]})
    assert res and all(r.payload["even"] and r.payload["n"] not in (0, 2) for r in res)
    assert engine.search(q, k=5, filter={"category": "nope"}) == []
    hyb = engine.search(q, k=6, filter={"category": "c"}, hybrid=True)
    assert hyb and all(r.category == "c" for r in hyb)
    with pytest.raises(FilterError, match="like"):
        engine.search(q, k=5, filter={"title": {"like": "Doc%"}})


def test_hybrid_finds_an_exact_keyword_that_vector_search_ranks_low(engine, docs):
    # Dense retrieval is weak on exact identifiers: three paraphrases about
    # failures with *other* numbers beat the document that has the exact code
    # buried in unrelated text; BM25 ranks that document first.
    distractors = ["The request failed and the server reported fault number 40418.",
                   "A failure status 50417 was returned when the call went wrong.",
                   "The operation raised an exception with failure number 40416."]
    engine.ingest([{"id": f"dis-{i}", "text": t} for i, t in enumerate(distractors)], progress=False)
    words = docs[5]["text"].split()
    cut = len(words) // 3
    engine.ingest([{"id": "kw", "text": " ".join(words[:cut] + ["(error code 40417)"] + words[cut:])}],
                  progress=False)
    query = "error code 40417"
    assert "kw" not in [r.doc_id for r in engine.search(query, k=10)]
    hyb = engine.search(query, k=5, hybrid=True)
    assert "kw" in [r.doc_id for r in hyb]
    assert "40417" in next(r for r in hyb if r.doc_id == "kw").text
    assert all(0 < r.score <= 2 / 61 for r in hyb)  # RRF scores, k_rrf = 60
    assert rrf_fuse([["a", "b"], ["b", "c"]])[0] == ("b", 1 / 62 + 1 / 61)


def test_rag_sources_and_prompt_budget(engine_factory, docs, gpt2_small_ctx, sentences):
    eng = engine_factory(generator_path=gpt2_small_ctx)
    eng.ingest(docs[:12], progress=False)
    question = " ".join(_q(eng, docs[3]).split()[:6])
    ans = eng.rag(question, k=4, max_new_tokens=16, seed=0)
    assert isinstance(ans.answer, str)
    n_ctx = 96
    assert 0 < ans.prompt_tokens <= n_ctx - 16
    hf = eng.generator.tokenizer._tok
    assert len(hf.encode(ans.prompt, add_special_tokens=False).ids) == ans.prompt_tokens
    assert ans.prompt.endswith("Answer:") and question in ans.prompt
    assert 1 <= len(ans.sources) <= 4
    # chunks of 32 MiniLM tokens do not all fit into 96 positions: the last one used is trimmed
    assert ans.sources[-1]["trimmed"] and not any(s["trimmed"] for s in ans.sources[:-1])
    hits = {r.chunk_id: r for r in eng.search(question, k=4)}
    for i, s in enumerate(ans.sources, start=1):
        full = hits[s["chunk_id"]]
        assert s["doc_id"] == full.doc_id and s["title"] == full.title and s["score"] == pytest.approx(full.score)
        assert f"[{i}] {s['text']}" in ans.prompt
        assert full.text.startswith(s["text"]) and (s["trimmed"] or s["text"] == full.text)
    assert list(hits)[:len(ans.sources)] == [s["chunk_id"] for s in ans.sources]  # best first
    with pytest.raises(EngineError, match="context window"):
        eng.rag("a question " * 60, k=2, max_new_tokens=16)
    with pytest.raises(EngineError, match="max_new_tokens"):
        eng.rag("question", max_new_tokens=96)


def test_rag_without_generator_names_the_setting(engine):
    with pytest.raises(EngineError, match="generator_path"):
        engine.rag("what is zlib?", mode="generative")
    with pytest.raises(EngineError, match="mode must be"):
        engine.rag("what is zlib?", mode="abstractive")


def test_rag_without_generator_answers_with_the_closest_sentences(engine, docs):
    """No generator: an extractive answer — the retrieved sentences most
    similar to the question, each traceable to a source chunk."""
    engine.ingest(docs, progress=False)
    target = next(s for d in docs for s in _split(d["text"]))
    ans = engine.rag(target, k=4)
    assert ans.mode == "extractive" and ans.prompt == "" and ans.finish_reason is None
    assert target in ans.answer  # the question's own sentence is the closest one
    assert 1 <= len(ans.sources) <= 4
    for s in ans.sources:
        assert s["sentences"] and all(x in s["text"] for x in s["sentences"])
    assert " ".join(x for s in ans.sources for x in s["sentences"]) == ans.answer
    assert engine.rag("question", k=2, filter={"category": "no such category"}).answer == ""


def _split(text):
    from tallow.engine.rag import split_sentences
    return split_sentences(text)


def test_bad_inputs_are_rejected_and_nothing_is_lost(engine, docs):
    before = engine.stats()
    with pytest.raises(EngineError, match="text is empty"):
        engine.ingest([docs[0] | {"id": "new"}, {"id": "empty", "text": "  \n"}], progress=False)
    with pytest.raises(EngineError, match="unknown fields"):
        engine.ingest([{"text": "x y z", "colour": "red"}], progress=False)
    with pytest.raises(EngineError, match="timestamp"):
        engine.ingest([{"text": "x y z", "timestamp": "yesterday"}], progress=False)
    with pytest.raises(EngineError, match="more than once"):
        engine.ingest([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], progress=False)
    for k in (0, -1, 10**6, 2.5):
        with pytest.raises(EngineError, match="k must"):
            engine.search("zlib", k=k)
    with pytest.raises(EngineError, match="empty"):
        engine.search("   ")
    with pytest.raises(EngineError, match="score_threshold"):
        engine.search("zlib", score_threshold=float("nan"))
    after = engine.stats()
    assert (after["documents"], after["chunks"]) == (before["documents"], before["chunks"])
    assert engine.store.get_document("new") is None


def test_settings_are_checked(engine_factory, tmp_path, docs):
    with pytest.raises(EngineError, match="chunk_tokens=600 does not fit"):
        engine_factory(tmp_path / "big", chunk_tokens=600, overlap=0).ingest(docs[:1], progress=False)
    for kw, msg in (({"overlap": 32}, "overlap"), ({"index": "faiss"}, "index must be"),
                    ({"save_every": 0}, "save_every")):
        with pytest.raises(ValueError, match=msg):
            engine_factory(tmp_path / "s", **kw)


class _Broken:
    """Wraps MiniLM: same tokenizer, vectors of the wrong dimension or with NaN."""

    def __init__(self, inner, mode):
        self.tokenizer, self._inner, self.mode = inner.tokenizer, inner, mode

    def embed(self, texts, batch_size=32, truncation=False):
        v = self._inner.embed(texts, batch_size=batch_size, truncation=truncation).clone()
        if self.mode == "nan":
            v[0, 3] = float("nan")
            return v
        return v[:, :100]


def test_nan_and_dimension_mismatch(engine, engine_factory, embedder, tmp_path):
    n = engine.stats()["chunks"]
    engine.close()
    for mode, msg in (("nan", "NaN or inf"), ("dim", "100-d vectors but")):
        eng = engine_factory(embedder=_Broken(embedder, mode))
        with pytest.raises(EngineError, match=msg):
            eng.ingest([{"id": "bad", "text": "some new text about sockets"}], progress=False)
        if mode == "dim":
            with pytest.raises(EngineError, match=msg):
                eng.search("sockets")
        assert eng.store.get_document("bad") is None and eng.stats()["chunks"] == n
        eng.close()


def test_corrupt_index_directory_is_rebuilt_from_the_store(engine, engine_factory, docs):
    n = engine.stats()["chunks"]
    index_dir = engine.data_dir / "index"
    engine.close()
    (index_dir / "CURRENT").write_text("snapshot-does-not-exist")
    with pytest.warns(IndexRebuiltWarning, match="rebuilding"):
        eng = engine_factory()
    assert eng.stats()["indexed_chunks"] == n
    assert eng.search(_q(eng, docs[7]), k=1)[0].chunk_id == "doc-7#1"
    assert any(p.name.startswith("index.corrupt-") for p in eng.data_dir.iterdir())


def test_corrupt_store_file_is_a_clear_error_and_left_alone(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    junk = bytes(range(256)) * 20
    (bad / "tallow.db").write_bytes(junk)
    with pytest.raises((EngineError, RuntimeError), match="tallow.db|database"):
        Engine(bad)
    assert (bad / "tallow.db").read_bytes() == junk


def test_crash_between_store_and_index_is_reconciled(engine, engine_factory, docs, monkeypatch):
    """Deterministic crash points: the store committed, the index write never
    happened (new and changed documents), and an index snapshot older than
    the store."""
    engine.close()
    eng = engine_factory()
    snapshot_hash = content_hash(docs[2], eng.chunk_tokens, eng.overlap, eng.embedder_id)

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(eng._index, "upsert", crash)
    monkeypatch.setattr(eng._index, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        eng.ingest([{**docs[2], "text": "A short replacement text."}], progress=False)
    with pytest.raises(KeyboardInterrupt):
        eng.ingest([{"id": "fresh", "text": "A brand new document about sockets and ports."}], progress=False)
    eng._closed = True  # abandon it like a killed process: no save, no close of the index
    eng.store.close()
    monkeypatch.undo()
    eng2 = engine_factory()
    assert eng2.store.document_hash("doc-2") != snapshot_hash
    _consistent(eng2)
    assert eng2.search("brand new document about sockets", k=1)[0].doc_id == "fresh"
    assert {r.text for r in eng2.search("A short replacement text.", k=20) if r.doc_id == "doc-2"} == {
        "A short replacement text."}


@pytest.mark.parametrize("backend", [pytest.param("libsql", marks=needs_libsql()), "qdrant"])
def test_other_index_backends(engine_factory, docs, sentences, backend, tmp_path):
    eng = engine_factory(tmp_path / backend, index=backend)
    eng.ingest(docs[:9], progress=False)
    assert eng.search(_q(eng, docs[5]), k=3)[0].chunk_id == "doc-5#1"
    assert all(r.category == "c" for r in eng.search(sentences[0], k=3, filter={"category": "c"}))
    eng.ingest([{**docs[5], "text": "Replaced."}], progress=False)
    _consistent(eng)
    eng.close()
    eng = engine_factory(tmp_path / backend, index=backend)
    _consistent(eng)


_CHILD = r"""
import itertools
import sys
from tallow.corpus import docstring_sentences
from tallow.engine import Engine

s = docstring_sentences(1500)
docs = [{"id": f"c{i}", "title": f"T{i}", "text": " ".join(s[6 * i:6 * i + 6]), "category": "abc"[i % 3]}
        for i in range(240)]
with Engine(sys.argv[1], chunk_tokens=32, overlap=8, save_every=5) as eng:
    for i, d in enumerate(docs):
        if i % 4 == 3:  # interleave replacements of earlier documents (changed text, fewer chunks)
            j = i // 2
            eng.ingest([{**docs[j], "text": s[6 * j] + " Updated " + str(i)}], progress=False)
        eng.ingest([d], progress=False)
        print(i, flush=True)
    # then replaces them round and round until killed: the kill always lands in a
    # running ingest, however fast this machine got through the first pass
    for i in itertools.count(len(docs)):
        j = i % len(docs)
        eng.ingest([{**docs[j], "text": docs[j]["text"] + " Again " + str(i)}], progress=False)
        print(i, flush=True)
"""


def test_killed_ingest_leaves_no_half_visible_document(tmp_path, engine_factory):
    """A subprocess ingesting documents is SIGKILLed mid-way; after reopening,
    every stored document is complete, searchable, and the index matches the store."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "crash"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(data)], stdout=subprocess.PIPE, text=True)
    done = 0
    try:
        for line in child.stdout:
            done = int(line)
            if done >= 30:
                break
        time.sleep(random.uniform(0, 0.3))  # land anywhere inside the next ingest
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and done >= 30
    eng = engine_factory(data)
    stored = eng.store.document_count()
    assert 30 <= stored <= 240
    _consistent(eng)
    rng = random.Random(0)
    for d in rng.sample(sorted({c.rsplit("#", 1)[0] for ids, _ in eng.store.iter_chunk_vectors() for c in ids}), 8):
        text = eng.store.get_document(d)["text"]
        first = chunk_text(eng.embedder.tokenizer._tok, text, 32, 8)[0].text
        assert eng.search(first, k=1)[0].chunk_id == f"{d}#0"


def test_another_embedding_model_re_embeds_the_same_text(engine_factory, embedder, docs, tmp_path):
    """The content hash names the embedder: the same text under another model of
    the same dimension (INT8 MiniLM, or weights changed by a fine-tune) is
    re-embedded; the same model loaded again is not."""
    import copy

    import torch

    from tallow.engine.engine import embedder_identity
    from tallow.models import load, minilm_path

    def stored(eng):
        return {cid: v.copy() for ids, vecs in eng.store.iter_chunk_vectors() for cid, v in zip(ids, vecs)}

    data = tmp_path / "models"
    eng = engine_factory(data)
    assert eng.ingest(docs[:3], progress=False).added == 3
    fp32 = stored(eng)
    eng.close()

    reloaded = load(minilm_path())
    assert embedder_identity(reloaded) == embedder_identity(embedder)
    eng = engine_factory(data, embedder=reloaded)
    s = eng.ingest(docs[:3], progress=False)
    assert (s.added, s.updated, s.unchanged, s.chunks) == (0, 0, 3, 0)
    eng.close()

    int8 = load(minilm_path(), "int8")
    assert embedder_identity(int8) != embedder_identity(embedder)
    eng = engine_factory(data, embedder=int8)
    s = eng.ingest(docs[:3], progress=False)
    assert (s.added, s.updated, s.unchanged) == (0, 3, 0)
    now = stored(eng)
    assert now.keys() == fp32.keys()
    assert all(not np.array_equal(now[c], fp32[c]) for c in now)  # every chunk re-embedded
    cid = sorted(now)[0]
    expected = int8.embed([eng.store.get_chunks([cid])[0]["text"]], truncation=True).numpy()[0]
    np.testing.assert_allclose(now[cid], expected, atol=1e-5)
    assert eng.search(_q(eng, docs[1], 0), k=1)[0].doc_id == "doc-1"
    _consistent(eng)
    eng.close()

    tuned = copy.deepcopy(embedder)  # same architecture and dimension, one tensor changed
    with torch.no_grad():
        tuned.bert.layers[-1].out_norm.weight.mul_(1.01)
    assert embedder_identity(tuned) != embedder_identity(embedder)
    eng = engine_factory(data, embedder=tuned)
    assert eng.ingest(docs[:3], progress=False).updated == 3


def test_int8_embedder_and_top_level_name(tmp_path, docs):
    import tallow

    assert tallow.Engine is Engine
    with Engine(tmp_path / "int8", quantize="int8", chunk_tokens=64, overlap=16) as eng:
        assert eng.embedder.quantization == "int8"
        s = eng.ingest(docs[:6], progress=False)
        assert s.added == 6 and s.chunks >= 6
        assert eng.search(_q(eng, docs[4], 0), k=1)[0].doc_id == "doc-4"
    with pytest.raises(EngineError, match="quantize"):
        Engine(tmp_path / "x", quantize="int4")


def _sqld_class():
    """tests/store/conftest.py's Sqld (a real libSQL server), or skip without its binary."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "store" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_store_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not mod.SQLD.is_file():
        pytest.skip(f"no sqld binary at {mod.SQLD} (`make tools`)")
    return mod.Sqld


@needs_libsql()
def test_engines_on_two_replicas_of_one_libsql_primary(tmp_path, embedder, docs):
    """Ingest through one node, search on another: each keeps its own HNSW
    index, derived from its replica of the store (sync = pull + reconcile)."""
    server = _sqld_class()(tmp_path / "sqld-data", tmp_path / "sqld.log")
    server.start()
    kw = {"embedder": embedder, "chunk_tokens": 32, "overlap": 8, "sync_url": server.url}
    try:
        with Engine(tmp_path / "a", **kw) as a, Engine(tmp_path / "b", **kw) as b:
            assert b.search("anything", k=3) == []
            a.ingest(docs[:5], progress=False)
            assert b.sync()["added"] == a.stats()["chunks"]
            assert b.search(_q(b, docs[3]), k=1)[0].chunk_id == "doc-3#1"
            a.ingest([{**docs[3], "text": "Replaced on node a."}], progress=False)
            a.delete_document("doc-4")
            b.sync()
            _consistent(b)
            assert {r.doc_id for r in b.search(_q(b, docs[4]), k=10)} <= {"doc-0", "doc-1", "doc-2", "doc-3"}
            assert b.search("Replaced on node a.", k=1)[0].text == "Replaced on node a."
    finally:
        server.stop()


def test_ingest_and_search_from_threads_at_once(engine_factory, sentences):
    """Engine as a library used from several threads: writers ingest (some ids
    by two writers, with different texts) while readers search; nothing is
    lost, no call fails, and the index matches the store exactly."""
    import threading

    eng = engine_factory(save_every=3)  # snapshots taken while others write and search
    writers, per_writer = 3, 8
    texts = [" ".join(sentences[i:i + 5]) for i in range(0, 5 * writers * per_writer, 5)]
    errors: list[BaseException] = []
    done = threading.Event()
    searched = [0]

    def write(w: int) -> None:
        try:
            for j in range(per_writer):
                text = texts[w * per_writer + j]
                batch = [{"id": f"w{w}-{j}", "text": text, "category": f"w{w}"},
                         {"id": f"shared-{j}", "text": text, "payload": {"writer": w}}]  # contended ids
                eng.ingest(batch, batch_size=4, progress=False)
                if j % 3 == 2:
                    eng.delete_document(f"w{w}-{j - 1}")
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    def read() -> None:
        try:
            while not done.is_set():
                for hybrid in (False, True):
                    for hit in eng.search(texts[searched[0] % len(texts)], k=5, hybrid=hybrid):
                        assert hit.text and hit.chunk_id.startswith(hit.doc_id + "#")
                    searched[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    done.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors
    assert searched[0] > 0
    deleted = {f"w{w}-{j - 1}" for w in range(writers) for j in range(per_writer) if j % 3 == 2}
    expected = {f"w{w}-{j}" for w in range(writers) for j in range(per_writer)} - deleted
    expected |= {f"shared-{j}" for j in range(per_writer)}
    stored = {d for d in expected if eng.store.get_document(d) is not None}
    assert stored == expected and eng.store.document_count() == len(expected)
    for j in range(per_writer):  # a contended id holds one writer's version, whole
        doc = eng.store.get_document(f"shared-{j}")
        assert doc["text"] == texts[doc["payload"]["writer"] * per_writer + j]
    _consistent(eng)
    for w in range(writers):
        for j in range(per_writer):
            if f"w{w}-{j}" in expected:
                first = chunk_text(eng.embedder.tokenizer._tok, texts[w * per_writer + j], 32, 8)[0].text
                hits = eng.search(first, k=3, filter={"category": f"w{w}"})
                assert f"w{w}-{j}" in {h.doc_id for h in hits}
    eng.close()
    eng2 = engine_factory()  # the saved snapshot plus reconcile give the same index
    _consistent(eng2)
