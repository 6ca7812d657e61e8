"""The metadata store: documents, chunks and images with their payloads in libSQL.

Two modes, one API:

- **embedded file** (default): ``MetadataStore("data/tallow.db")``, a local
  libSQL (SQLite) database (through the stdlib's ``sqlite3`` where the libsql
  package cannot be installed, e.g. aarch64: see ``store/driver.py``);
- **embedded replica** (the seed's Turso "read local, write global"):
  ``MetadataStore(path, sync_url="http://host:8080", auth_token=...)`` keeps
  a local replica of a remote libSQL primary (sqld / Turso). Reads are served
  from the local file, even while the primary is down; writes are delegated
  by the libsql client to the primary, and ``sync()`` pulls its changes. A
  write that cannot reach the primary raises ``StoreUnavailableError`` naming
  the URL; the transaction is rolled back, nothing of it is written (there is
  no local queue that could silently drop it later).

Vectors (chunk embeddings, image features) are stored as raw little-endian
float32 BLOBs rather than ``F32_BLOB(dim)``: the store is not the ANN engine
(tallow.index is), the dimension is only known at the first write (an
``F32_BLOB`` column fixes it in the schema), and index rebuilds read the bytes
straight into numpy with ``np.frombuffer`` without a ``vector32()`` round trip.
The dimension is recorded in ``store_meta`` and checked on every write and
when the store is opened.

All SQL is parameterized; the only text put into SQL is this module's own
(table names are constants, filter field names travel as JSON-path parameters).
One connection, guarded by a lock: the server calls in from worker threads.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..index import filters as F
from . import migrations as M
from .driver import DriverUnavailable, driver, require_libsql
from .errors import KVNotIntegerError, KVStoreFullError, StoreError, StoreUnavailableError

_DOC_FIELDS = ("id", "title", "category", "timestamp")
# Error texts of the libsql client when a replica cannot reach its primary.
_UNREACHABLE = re.compile(r"write delegation|unavailable|connect|handshake|timed? ?out|transport|broken pipe|"
                          r"connection (refused|reset|closed)", re.I)
_WORD = re.compile(r"\w+", re.UNICODE)


def _fts_query(text: str) -> str | None:
    """User text -> an FTS5 query that cannot be a syntax error: each word is a
    double-quoted string (FTS5 keywords like AND/NEAR, column filters, ``*`` and
    quotes lose their meaning), ORed so BM25 ranks chunks matching more words
    higher. None when the text has no word characters."""
    words = _WORD.findall(text)
    if not words:
        return None
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in seen)


def _vector(v: Any, what: str, dim: int | None) -> np.ndarray:
    try:
        arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be a numeric vector: {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise StoreError(f"{what} must be a non-empty 1-D vector, got shape {arr.shape}")
    if dim is not None and arr.shape[0] != dim:
        raise StoreError(f"{what} has dimension {arr.shape[0]}, the store holds dimension {dim}")
    if not np.isfinite(arr).all():
        raise StoreError(f"{what} contains NaN or inf")
    return np.ascontiguousarray(arr, dtype="<f4")


def _json(obj: Any, what: str) -> str:
    if not isinstance(obj, dict):
        raise StoreError(f"{what} must be a dict, got {type(obj).__name__}")
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON-serialisable: {exc}") from exc


def _int_or_none(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise StoreError(f"{what} must be an int or None, got {v!r}")
    return int(v)


class MetadataStore:
    def __init__(self, path: str | os.PathLike = "data/tallow.db", *, sync_url: str | None = None,
                 auth_token: str | None = None, embedding_dim: int | None = None,
                 sync_interval: float | None = None):
        self.driver = driver()
        self.path = Path(path)
        self.sync_url = sync_url
        self._lock = threading.RLock()
        if embedding_dim is not None and (isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int)
                                          or embedding_dim < 1):
            raise StoreError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if sync_url:
                libsql = require_libsql(f"an embedded replica (sync_url={sync_url!r})")
                self._conn = libsql.connect(str(self.path), sync_url=sync_url, auth_token=auth_token or "",
                                            sync_interval=sync_interval, isolation_level=None)
            else:
                self._conn = self.driver.connect(str(self.path))
        except DriverUnavailable:
            raise
        except Exception as exc:
            # libsql 0.1.8 syncs inside connect(): a replica cannot be opened while its primary is down.
            cls = StoreUnavailableError if sync_url and _UNREACHABLE.search(str(exc)) else StoreError
            raise cls(f"cannot open the libSQL database {self.path}"
                      + (f" (replica of {sync_url})" if sync_url else "") + f": {exc}") from exc
        self._closed = False
        try:
            self._open(embedding_dim)
        except BaseException:
            self._conn.close()
            raise

    # -- opening, migrations ----------------------------------------------------------

    def _open(self, embedding_dim: int | None) -> None:
        synced = True
        if self.sync_url:
            try:
                self.sync()
            except StoreUnavailableError:
                synced = False  # serve reads from the local replica if it has the schema
        version = self.schema_version()
        if version > M.LATEST:
            raise StoreError(f"{self.path}: schema version {version} is newer than this tallow knows "
                             f"({M.LATEST}); upgrade tallow")
        if version < M.LATEST:
            if not synced:
                raise StoreUnavailableError(
                    f"libSQL primary {self.sync_url} is unreachable and the local replica {self.path} has schema "
                    f"version {version}, not {M.LATEST}: cannot migrate it; nothing was written")
            self._migrate(version)
        stored = self._meta("embedding_dim")
        self._dim = int(stored) if stored is not None else None
        if embedding_dim is not None:
            if self._dim is not None and self._dim != embedding_dim:
                raise StoreError(f"{self.path} holds embeddings of dimension {self._dim}, but embedding_dim="
                                 f"{embedding_dim} was asked for (a different embedding model?); use another "
                                 f"database or re-ingest")
            if self._dim is None:
                self._write([("INSERT INTO store_meta (key, value) VALUES ('embedding_dim', ?) "
                              "ON CONFLICT(key) DO NOTHING", (str(embedding_dim),))])
                self._dim = embedding_dim
        img = self._meta("image_feature_dim")
        self._image_dim = int(img) if img is not None else None

    def schema_version(self) -> int:
        with self._lock:
            self._check_open()
            has = self._conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND "
                                     "name = 'schema_migrations'").fetchone()[0]
            if not has:
                return 0
            row = self._conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            return int(row[0] or 0)

    def _migrate(self, current: int) -> None:
        self._write([(M.CREATE_MIGRATIONS_TABLE, ())])
        for m in M.MIGRATIONS:
            if m.version <= current:
                continue
            stmts = [(s, ()) for s in m.statements]
            stmts.append(("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                          (m.version, m.name, time.time())))
            try:
                self._write(stmts)
            except StoreUnavailableError:
                raise
            except StoreError:
                # Another process may have applied it first (the version row is the lock).
                if self.sync_url:
                    self.sync()
                if self.schema_version() < m.version:
                    raise

    def _meta(self, key: str) -> str | None:
        row = self._read_one("SELECT value FROM store_meta WHERE key = ?", (key,))
        return row[0] if row else None

    # -- low level --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the metadata store is closed")

    def _wrap(self, exc: Exception, action: str) -> StoreError:
        msg = str(exc)
        if self.sync_url and _UNREACHABLE.search(msg):
            return StoreUnavailableError(f"libSQL primary {self.sync_url} is unreachable: {action} failed and "
                                         f"nothing was written ({msg})")
        return StoreError(f"{action} failed on {self.path}: {msg}")

    def _write(self, statements: Sequence[tuple[str, tuple]], action: str = "write") -> None:
        """Runs statements in one transaction: all of them or none."""
        with self._lock:
            self._check_open()
            try:
                # Explicit BEGIN: the connection is in autocommit mode (isolation_level=None),
                # because the client's implicit transactions, like sqlite3's legacy ones,
                # only start before DML and would let a migration's DDL commit on its own.
                self._conn.execute("BEGIN")
                for sql, params in statements:
                    if params and isinstance(params, list):
                        self._conn.executemany(sql, params)
                    else:
                        self._conn.execute(sql, params)
                self._conn.execute("COMMIT")
            except Exception as exc:
                try:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                except Exception:
                    pass  # the primary dropped the transaction with the connection
                raise self._wrap(exc, action) from exc

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except Exception as exc:
                raise StoreError(f"query failed on {self.path}: {exc}") from exc

    def _read_one(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = self._read(sql, params)
        return rows[0] if rows else None

    def sync(self) -> None:
        """Replica: pull the primary's changes. Embedded file: nothing to do."""
        if not self.sync_url:
            return
        with self._lock:
            self._check_open()
            try:
                self._conn.sync()
            except Exception as exc:
                raise StoreUnavailableError(f"sync with the libSQL primary {self.sync_url} failed; the local "
                                            f"replica {self.path} keeps serving its last state ({exc})") from exc
            # Another node may have fixed the dimensions since this replica opened
            # (store_meta is written with the first embedding / image feature).
            # (_open() syncs before it reads them the first time: nothing to refresh then.)
            if hasattr(self, "_image_dim") and self.schema_version() > 0:
                if self._dim is None:
                    dim = self._meta("embedding_dim")
                    self._dim = int(dim) if dim is not None else None
                if self._image_dim is None:
                    img = self._meta("image_feature_dim")
                    self._image_dim = int(img) if img is not None else None

    # -- documents and chunks ---------------------------------------------------------

    def put_document(self, doc: dict, chunks: list[dict]) -> None:
        """Writes a document and replaces all its chunks, in one transaction."""
        if not isinstance(doc, dict):
            raise StoreError(f"doc must be a dict, got {type(doc).__name__}")
        doc_id = doc.get("id")
        if not isinstance(doc_id, str) or not doc_id:
            raise StoreError(f"doc['id'] must be a non-empty str, got {doc_id!r}")
        text = doc.get("text", "")
        if not isinstance(text, str):
            raise StoreError(f"document {doc_id!r}: text must be a str")
        payload = doc.get("payload") or {}
        payload_json = _json(payload, f"document {doc_id!r} payload")
        timestamp = _int_or_none(doc.get("timestamp"), f"document {doc_id!r} timestamp")
        title, category = doc.get("title"), doc.get("category")
        for name, v in (("title", title), ("category", category), ("content_hash", doc.get("content_hash"))):
            if v is not None and not isinstance(v, str):
                raise StoreError(f"document {doc_id!r}: {name} must be a str or None, got {type(v).__name__}")
        fields = {"id": doc_id, "title": title, "category": category, "timestamp": timestamp}
        filter_doc = _json({**payload, **{k: v for k, v in fields.items() if v is not None}},
                           f"document {doc_id!r} payload")

        with self._lock:  # the dimension check and the write see the same self._dim
            dim = self._dim
            rows, seqs = [], set()
            for i, c in enumerate(chunks):
                if not isinstance(c, dict):
                    raise StoreError(f"document {doc_id!r} chunk {i} must be a dict")
                seq = _int_or_none(c.get("seq"), f"document {doc_id!r} chunk {i} seq")
                if seq is None or seq in seqs:
                    raise StoreError(f"document {doc_id!r} chunk {i}: seq must be a unique int, got {c.get('seq')!r}")
                seqs.add(seq)
                start = _int_or_none(c.get("start"), f"document {doc_id!r} chunk {seq} start")
                end = _int_or_none(c.get("end"), f"document {doc_id!r} chunk {seq} end")
                if start is None or end is None or not 0 <= start <= end <= len(text):
                    raise StoreError(f"document {doc_id!r} chunk {seq}: offsets start={start}, end={end} must "
                                     f"satisfy 0 <= start <= end <= len(text) = {len(text)}")
                ctext = c.get("text")
                if not isinstance(ctext, str):
                    raise StoreError(f"document {doc_id!r} chunk {seq}: text must be a str")
                emb = c.get("embedding")
                blob = None
                if emb is not None:
                    vec = _vector(emb, f"document {doc_id!r} chunk {seq} embedding", dim)
                    dim = vec.shape[0]
                    blob = vec.tobytes()
                rows.append((f"{doc_id}#{seq}", doc_id, seq, ctext, start, end, blob))
            now = time.time()
            stmts: list[tuple[str, Any]] = []
            if dim is not None and self._dim is None:
                stmts.append(("INSERT INTO store_meta (key, value) VALUES ('embedding_dim', ?) "
                              "ON CONFLICT(key) DO NOTHING", (str(dim),)))
            stmts += [
                ("INSERT INTO documents (id, title, category, timestamp, payload, text, content_hash, filter_doc, "
                 "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                 "title = excluded.title, category = excluded.category, timestamp = excluded.timestamp, "
                 "payload = excluded.payload, text = excluded.text, content_hash = excluded.content_hash, "
                 "filter_doc = excluded.filter_doc, updated_at = excluded.updated_at",
                 (doc_id, title, category, timestamp, payload_json, text, doc.get("content_hash"), filter_doc,
                  now, now)),
                ("DELETE FROM chunks WHERE doc_id = ?", (doc_id,)),
            ]
            if rows:
                stmts.append(('INSERT INTO chunks (id, doc_id, seq, text, start, "end", embedding) '
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", rows))
            self._write(stmts, f"put_document({doc_id!r})")
            self._dim = dim

    def document_hash(self, id: str) -> str | None:
        row = self._read_one("SELECT content_hash FROM documents WHERE id = ?", (id,))
        return row[0] if row else None

    def get_document(self, id: str) -> dict | None:
        row = self._read_one("SELECT id, title, category, timestamp, payload, text, content_hash, created_at, "
                             "updated_at FROM documents WHERE id = ?", (id,))
        if row is None:
            return None
        keys = ("id", "title", "category", "timestamp", "payload", "text", "content_hash", "created_at",
                "updated_at")
        out = dict(zip(keys, row))
        out["payload"] = json.loads(out["payload"])
        return out

    def delete_document(self, id: str) -> bool:
        with self._lock:
            exists = self._read_one("SELECT 1 FROM documents WHERE id = ?", (id,)) is not None
            self._write([("DELETE FROM chunks WHERE doc_id = ?", (id,)),
                         ("DELETE FROM documents WHERE id = ?", (id,))], f"delete_document({id!r})")
            return exists

    def get_chunks(self, chunk_ids: Sequence[str]) -> list[dict]:
        """Chunks in the order asked for (unknown ids are left out), each with its
        document's id, title, category, timestamp and payload."""
        ids = list(chunk_ids)
        found: dict[str, dict] = {}
        for i in range(0, len(ids), 500):  # stay under SQLite's parameter limit
            part = ids[i:i + 500]
            rows = self._read(
                'SELECT c.id, c.doc_id, c.seq, c.text, c.start, c."end", d.title, d.category, d.timestamp, d.payload '
                f"FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(part))})",
                tuple(part))
            for r in rows:
                found[r[0]] = {"id": r[0], "doc_id": r[1], "seq": r[2], "text": r[3], "start": r[4], "end": r[5],
                               "title": r[6], "category": r[7], "timestamp": r[8], "payload": json.loads(r[9])}
        return [dict(found[x]) for x in ids if x in found]

    def iter_chunk_vectors(self, batch: int = 1024) -> Iterator[tuple[list[str], np.ndarray]]:
        """(chunk ids, float32 [n, dim]) in batches, for index rebuilds. Pages by
        rowid, so the lock is held per batch only."""
        yield from self._iter_vectors("chunks", "embedding", batch, self._dim)

    def _iter_vectors(self, table: str, column: str, batch: int, dim: int | None):
        if batch < 1:
            raise StoreError(f"batch must be >= 1, got {batch}")
        last = -1
        while True:
            rows = self._read(f"SELECT rowid, id, {column} FROM {table} WHERE rowid > ? AND {column} IS NOT NULL "
                              "ORDER BY rowid LIMIT ?", (last, batch))
            if not rows:
                return
            last = rows[-1][0]
            mat = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").astype(np.float32, copy=False)
            yield [r[1] for r in rows], mat.reshape(len(rows), -1 if dim is None else dim)

    def chunk_count(self) -> int:
        return int(self._read_one("SELECT count(*) FROM chunks")[0])

    def document_count(self) -> int:
        return int(self._read_one("SELECT count(*) FROM documents")[0])

    def fts_search(self, query: str, k: int, filter: dict | None = None) -> list[tuple[str, float]]:
        """BM25 keyword search over chunk text: [(chunk id, score)], best first,
        score = -bm25 (higher is better). ``filter`` uses tallow's filter syntax
        on the document fields (id, title, category, timestamp) and payload; a
        payload key with the name of a document field is shadowed by the field.
        The query text is words only (see ``_fts_query``): FTS5 operators in it
        are searched for as words, never interpreted."""
        if not isinstance(query, str):
            raise StoreError(f"query must be a str, got {type(query).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StoreError(f"k must be an int >= 1, got {k!r}")
        where, params = F.to_sql(F.parse(filter), "d.filter_doc")
        match = _fts_query(query)
        if match is None:
            return []
        rows = self._read(
            "SELECT c.id, bm25(chunks_fts) AS rank FROM chunks_fts JOIN chunks c ON c.rowid = chunks_fts.rowid "
            f"JOIN documents d ON d.id = c.doc_id WHERE chunks_fts MATCH ? AND {where} ORDER BY rank, c.rowid LIMIT ?",
            (match, *params, k))
        return [(r[0], -float(r[1])) for r in rows]

    # -- images -----------------------------------------------------------------------

    def put_image(self, id: str, sha256: str, payload: dict, width: int | None, height: int | None,
                  feature: Any) -> None:
        if not isinstance(id, str) or not id:
            raise StoreError(f"image id must be a non-empty str, got {id!r}")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise StoreError(f"image {id!r}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
        payload_json = _json(payload or {}, f"image {id!r} payload")
        width = _int_or_none(width, f"image {id!r} width")
        height = _int_or_none(height, f"image {id!r} height")
        with self._lock:
            vec = _vector(feature, f"image {id!r} feature", self._image_dim)
            stmts: list[tuple[str, Any]] = []
            if self._image_dim is None:
                stmts.append(("INSERT INTO store_meta (key, value) VALUES ('image_feature_dim', ?) "
                              "ON CONFLICT(key) DO NOTHING", (str(vec.shape[0]),)))
            stmts.append(("INSERT INTO images (id, sha256, payload, width, height, feature, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET sha256 = excluded.sha256, "
                          "payload = excluded.payload, width = excluded.width, height = excluded.height, "
                          "feature = excluded.feature",
                          (id, sha256, payload_json, width, height, vec.tobytes(), time.time())))
            self._write(stmts, f"put_image({id!r})")
            self._image_dim = vec.shape[0]

    def _image_rows(self, where: str, params: tuple) -> list[dict]:
        rows = self._read(f"SELECT id, sha256, payload, width, height, feature, created_at FROM images WHERE {where}",
                          params)
        return [{"id": r[0], "sha256": r[1], "payload": json.loads(r[2]), "width": r[3], "height": r[4],
                 "feature": np.frombuffer(r[5], dtype="<f4").astype(np.float32), "created_at": r[6]} for r in rows]

    def get_images(self, ids: Sequence[str]) -> list[dict]:
        """Images in the order asked for (unknown ids left out), with their feature."""
        ids = list(ids)
        found: dict[str, dict] = {}
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            for img in self._image_rows(f"id IN ({','.join('?' * len(part))})", tuple(part)):
                found[img["id"]] = img
        return [found[x] for x in ids if x in found]

    def image_by_sha(self, sha256: str) -> dict | None:
        rows = self._image_rows("sha256 = ? ORDER BY rowid LIMIT 1", (sha256,))
        return rows[0] if rows else None

    def delete_image(self, id: str) -> bool:
        with self._lock:
            exists = self._read_one("SELECT 1 FROM images WHERE id = ?", (id,)) is not None
            self._write([("DELETE FROM images WHERE id = ?", (id,))], f"delete_image({id!r})")
            return exists

    def iter_image_features(self, batch: int = 1024) -> Iterator[tuple[list[str], np.ndarray]]:
        yield from self._iter_vectors("images", "feature", batch, self._image_dim)

    def image_count(self) -> int:
        return int(self._read_one("SELECT count(*) FROM images")[0])

    # -- key-value stores (tallow.functions) -------------------------------------------
    # Spin's semantics: keys and values are bytes; a missing key is None, an empty
    # value b""; set overwrites; delete of a missing key succeeds. Each write is one
    # transaction, committed (durable) when the call returns. Size limits are the
    # caller's (tallow.functions.kv); the key-count limit needs the count inside the
    # write's transaction, so it is checked here.

    def _kv_txn(self, fn, action: str):
        """Runs ``fn(conn)`` in one IMMEDIATE transaction (the write lock up front,
        so a read-then-write is atomic against other connections too)."""
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                out = fn(self._conn)
                self._conn.execute("COMMIT")
                return out
            except Exception as exc:
                try:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                except Exception:
                    pass
                if isinstance(exc, StoreError):
                    raise
                raise self._wrap(exc, action) from exc

    def kv_get(self, store: str, key: bytes) -> bytes | None:
        row = self._read_one("SELECT value FROM kv WHERE store = ? AND key = ?", (store, bytes(key)))
        return None if row is None else bytes(row[0])

    def kv_exists(self, store: str, key: bytes) -> bool:
        return self._read_one("SELECT 1 FROM kv WHERE store = ? AND key = ?", (store, bytes(key))) is not None

    def kv_keys(self, store: str) -> list[bytes]:
        return [bytes(r[0]) for r in self._read("SELECT key FROM kv WHERE store = ? ORDER BY key", (store,))]

    def kv_count(self, store: str) -> int:
        return int(self._read_one("SELECT count(*) FROM kv WHERE store = ?", (store,))[0])

    @staticmethod
    def _kv_room(conn, store: str, key: bytes, max_keys: int) -> None:
        if conn.execute("SELECT 1 FROM kv WHERE store = ? AND key = ?", (store, key)).fetchone() is None:
            n = conn.execute("SELECT count(*) FROM kv WHERE store = ?", (store,)).fetchone()[0]
            if n >= max_keys:
                raise KVStoreFullError(f"key-value store {store!r} is full ({max_keys} keys)")

    def kv_set(self, store: str, key: bytes, value: bytes, *, max_keys: int) -> None:
        key, value = bytes(key), bytes(value)

        def run(conn):
            self._kv_room(conn, store, key, max_keys)
            conn.execute("INSERT INTO kv (store, key, value, updated_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(store, key) DO UPDATE SET value = excluded.value, "
                         "updated_at = excluded.updated_at", (store, key, value, time.time()))

        self._kv_txn(run, f"kv_set({store!r})")

    def kv_delete(self, store: str, key: bytes) -> None:
        self._write([("DELETE FROM kv WHERE store = ? AND key = ?", (store, bytes(key)))], f"kv_delete({store!r})")

    def kv_increment(self, store: str, key: bytes, delta: int, *, max_keys: int) -> int:
        """Adds ``delta`` to the decimal integer stored at ``key`` (0 when missing),
        atomically; returns the new value."""
        key = bytes(key)

        def run(conn):
            row = conn.execute("SELECT value FROM kv WHERE store = ? AND key = ?", (store, key)).fetchone()
            if row is None:
                self._kv_room(conn, store, key, max_keys)
                current = 0
            else:
                try:
                    current = int(bytes(row[0]).decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    raise KVNotIntegerError(f"the value of this key in {store!r} is not a decimal integer") from None
            new = current + int(delta)
            if not -(1 << 63) <= new < (1 << 63):
                raise KVNotIntegerError(f"incrementing would overflow a 64-bit integer in {store!r}")
            conn.execute("INSERT INTO kv (store, key, value, updated_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(store, key) DO UPDATE SET value = excluded.value, "
                         "updated_at = excluded.updated_at", (store, key, str(new).encode(), time.time()))
            return new

        return self._kv_txn(run, f"kv_increment({store!r})")

    # -- misc -------------------------------------------------------------------------

    def stats(self) -> dict:
        size = None
        if str(self.path) != ":memory:" and self.path.exists():
            size = self.path.stat().st_size
        return {"path": str(self.path), "mode": "replica" if self.sync_url else "embedded",
                "sync_url": self.sync_url, "schema_version": self.schema_version(),
                "documents": self.document_count(), "chunks": self.chunk_count(), "images": self.image_count(),
                "embedding_dim": self._dim, "image_feature_dim": self._image_dim, "file_bytes": size}

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "MetadataStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
