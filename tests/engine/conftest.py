"""Engine fixtures: the real MiniLM embedder (loaded once), a small real corpus
(stdlib docstring sentences grouped into documents) and a tiny random GPT-2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tallow.testing import train_byte_level_bpe

from tallow.corpus import docstring_sentences
from tallow.models import load, minilm_path

CHUNK_TOKENS, OVERLAP = 32, 8


@pytest.fixture(scope="session")
def embedder():
    return load(minilm_path())


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return docstring_sentences(180)


def make_docs(sentences: list[str], n: int = 30, per_doc: int = 6) -> list[dict]:
    """n documents of per_doc consecutive sentences; categories a/b/c, timestamps 1000+i."""
    return [{"id": f"doc-{i}", "title": f"Document {i}", "text": " ".join(sentences[i * per_doc:(i + 1) * per_doc]),
             "category": "abc"[i % 3], "timestamp": 1000 + i, "payload": {"n": i, "even": i % 2 == 0}}
            for i in range(n)]


@pytest.fixture(scope="session")
def docs(sentences) -> list[dict]:
    return make_docs(sentences)


@pytest.fixture
def engine_factory(tmp_path, embedder):
    """engine_factory(**kw) -> an Engine on tmp_path/data with the shared MiniLM; closed at teardown."""
    from tallow.engine import Engine

    opened = []

    def make(data_dir: Path | None = None, **kw):
        kw.setdefault("chunk_tokens", CHUNK_TOKENS)
        kw.setdefault("overlap", OVERLAP)
        eng = Engine(data_dir or tmp_path / "data", embedder=kw.pop("embedder", embedder), **kw)
        opened.append(eng)
        return eng

    yield make
    for eng in opened:
        eng.close()


@pytest.fixture(scope="session")
def ingested_dir(tmp_path_factory, embedder, docs) -> Path:
    """A data directory with ``docs`` ingested (once per session; tests get copies)."""
    from tallow.engine import Engine

    path = tmp_path_factory.mktemp("ingested") / "data"
    with Engine(path, embedder=embedder, chunk_tokens=CHUNK_TOKENS, overlap=OVERLAP) as eng:
        eng.ingest(docs, progress=False)
    return path


@pytest.fixture
def engine(engine_factory, ingested_dir, tmp_path):
    """An engine on a fresh copy of the ingested corpus."""
    shutil.copytree(ingested_dir, tmp_path / "data")
    return engine_factory()


@pytest.fixture(scope="session")
def gpt2_small_ctx(tmp_path_factory) -> Path:
    """A random 2-layer GPT-2 with a context window of only 96 positions, so
    the RAG prompt budget and chunk trimming are exercised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2-rag")
    vocab = train_byte_level_bpe(out / "tokenizer.json")
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out
