"""A real, offline text corpus: docstrings of Python's standard library (and
optionally of the installed packages), split into sentences. Read from the
source files with ``ast`` — nothing is imported or downloaded — so it is the
same on every machine with the same Python and packages. Used by tests,
benchmarks and the demo index."""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "__pycache__", "pydoc_data", "testing", "_vendor", "vendored"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def docstring_sentences(limit: int | None = None, *, site_packages: bool = False, min_words: int = 4,
                        max_words: int = 60) -> list[str]:
    """Unique sentences from docstrings, deterministic order, at most ``limit``.

    ``site_packages=True`` adds the installed packages' docstrings (tens of
    thousands of sentences more)."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if site_packages:
        roots.append(Path(sysconfig.get_paths()["purelib"]))
    seen: set[str] = set()
    out: list[str] = []
    for root in roots:
        files = _python_files(root) if root.name != "site-packages" else sorted(root.rglob("*.py"))
        for path in files:
            if root.name == "site-packages" and {"tests", "test", "_vendor"}.intersection(path.parts):
                continue
            for doc in _docstrings(path):
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    for sentence in _SENTENCE_END.split(text):
                        words = sentence.split()
                        if (min_words <= len(words) <= max_words and sentence[:1].isalpha()
                                and sentence not in seen):
                            seen.add(sentence)
                            out.append(sentence)
                            if limit is not None and len(out) >= limit:
                                return out
    return out
