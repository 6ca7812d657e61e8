"""Versioned schema migrations for the metadata store.

``MIGRATIONS`` is append-only: a released migration is never edited, a change
is a new entry. Each migration runs in one transaction together with the row
that records it in ``schema_migrations``, so a crash leaves the database at
the previous version or the new one, never in between. A database whose
version is newer than this code knows is refused rather than guessed at.

Chunk text is indexed by an FTS5 table with external content (``chunks`` is
the content table); triggers keep it in sync, so every write path (including
statements delegated to a libSQL primary, where the triggers run) updates the
two tables in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "documents, chunks with FTS5, images, store_meta", (
        """CREATE TABLE store_meta (
               key   TEXT PRIMARY KEY,
               value TEXT NOT NULL)""",
        # filter_doc: the payload merged with the document fields, as JSON; the one
        # column tallow's filters (index.filters.to_sql) are evaluated on.
        """CREATE TABLE documents (
               id           TEXT PRIMARY KEY,
               title        TEXT,
               category     TEXT,
               timestamp    INTEGER,
               payload      TEXT NOT NULL,
               text         TEXT NOT NULL,
               content_hash TEXT,
               filter_doc   TEXT NOT NULL,
               created_at   REAL NOT NULL,
               updated_at   REAL NOT NULL)""",
        """CREATE TABLE chunks (
               rowid     INTEGER PRIMARY KEY,
               id        TEXT NOT NULL UNIQUE,
               doc_id    TEXT NOT NULL,
               seq       INTEGER NOT NULL,
               text      TEXT NOT NULL,
               start     INTEGER NOT NULL,
               "end"     INTEGER NOT NULL,
               embedding BLOB)""",
        "CREATE INDEX chunks_doc ON chunks(doc_id, seq)",
        """CREATE VIRTUAL TABLE chunks_fts USING fts5(
               text, content='chunks', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2')""",
        """CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
               INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
           END""",
        """CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
               INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
           END""",
        """CREATE TRIGGER chunks_au AFTER UPDATE OF text ON chunks BEGIN
               INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
               INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
           END""",
        """CREATE TABLE images (
               id          TEXT PRIMARY KEY,
               sha256      TEXT NOT NULL,
               payload     TEXT NOT NULL,
               width       INTEGER,
               height      INTEGER,
               feature     BLOB NOT NULL,
               created_at  REAL NOT NULL)""",
        "CREATE INDEX images_sha ON images(sha256)",
    )),
    # tallow.functions (issue 13): the key-value stores of WebAssembly functions,
    # Spin's semantics (store, key) -> value; keys and values are bytes.
    Migration(2, "kv for WebAssembly functions", (
        """CREATE TABLE kv (
               store      TEXT NOT NULL,
               key        BLOB NOT NULL,
               value      BLOB NOT NULL,
               updated_at REAL NOT NULL,
               PRIMARY KEY (store, key)) WITHOUT ROWID""",
    )),
)

LATEST = MIGRATIONS[-1].version

CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL)"""


def check_sequence(migrations=MIGRATIONS) -> None:
    """Versions are 1, 2, 3 ... in order (guards against a mis-edited list)."""
    for i, m in enumerate(migrations, 1):
        if m.version != i:
            raise AssertionError(f"migration #{i} has version {m.version}; versions must be 1, 2, 3 ... in order")


check_sequence()
