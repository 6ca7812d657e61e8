"""The demo corpus ``make run`` indexes on a first start: the module
docstrings of Python's standard library (real text, read with ``ast`` from
this interpreter's own sources: offline and the same on every machine with
the same Python). One document per module; category "module" or "package"; the timestamp
is the source file's modification time and the payload holds its path and
size in lines (a numeric field for range filters in the demo).
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

MIN_WORDS = 25  # skip one-line docstrings: nothing to search in them


def demo_documents(limit: int = 150) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict] = []
    candidates = sorted([*root.glob("*.py"), *root.glob("*/__init__.py")])
    for path in candidates:
        name = path.parent.name if path.name == "__init__.py" else path.stem
        if name.startswith("_") or name in ("this", "antigravity"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        text = ast.get_docstring(tree)
        if not text or len(text.split()) < MIN_WORDS:
            continue
        docs.append({"id": f"stdlib/{name}", "title": f"{name} — Python standard library", "text": text,
                     "category": "package" if path.name == "__init__.py" else "module",
                     "timestamp": int(path.stat().st_mtime),
                     "payload": {"source": str(path.relative_to(root)), "lines": source.count("\n") + 1}})
        if len(docs) >= limit:
            break
    return docs
