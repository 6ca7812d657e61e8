"""Token-window chunking with source character offsets.

A text is tokenized once without special tokens; the tokenizer's offsets map
every token back to a character span of the source. Windows of
``chunk_tokens`` tokens advance by ``chunk_tokens - overlap`` tokens; the last
window ends at the last token. A chunk's text is the exact slice
``text[start:end]`` from the first token's start to the last token's end, so
chunks can be highlighted in the source and re-chunking is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Chunk:
    seq: int
    start: int
    end: int
    text: str


def check_window(chunk_tokens: Any, overlap: Any) -> tuple[int, int]:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap must be an int with 0 <= overlap < chunk_tokens ({chunk_tokens}), got {overlap!r}")
    return chunk_tokens, overlap


def token_offsets(hf_tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the tokens of ``text`` (no special
    tokens; tokens with an empty span, if any, are skipped)."""
    enc = hf_tokenizer.encode(text, add_special_tokens=False)
    return [(s, e) for s, e in enc.offsets if e > s]


def chunk_text(hf_tokenizer: Any, text: str, chunk_tokens: int = 128, overlap: int = 32) -> list[Chunk]:
    """Splits ``text`` into overlapping token windows (see the module docstring).
    ``hf_tokenizer`` is a Hugging Face ``tokenizers.Tokenizer``."""
    chunk_tokens, overlap = check_window(chunk_tokens, overlap)
    offsets = token_offsets(hf_tokenizer, text)
    if not offsets:
        return []
    step = chunk_tokens - overlap
    chunks: list[Chunk] = []
    first = 0
    while True:
        last = min(first + chunk_tokens, len(offsets)) - 1
        start, end = offsets[first][0], offsets[last][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end]))
        if last == len(offsets) - 1:
            return chunks
        first += step
