"""Fine-tuning only the top encoder layers (``--train-layers``): the frozen
layers do not move and run without dropout, only the trained tensors are
exported and composed with their base on load (base checked by sha256),
float16 storage loads back as float32; and length-bucketed batches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tallow.models import CheckpointError, load
from tallow.train import TrainInputError, train_classifier
from tallow.train.distributed import GlobalBatchSampler
from tallow.train.classifier import store_float16


def test_top_layer_fine_tune_exports_the_trained_tensors_only(tmp_path, sentiment_csv, bert_classifier_dir):
    out = tmp_path / "top"
    base_sd = load_file(str(bert_classifier_dir / "model.safetensors"))
    res = train_classifier(train_path=sentiment_csv, base=str(bert_classifier_dir), out=out, mode="full",
                           train_layers=1, epochs=2, batch_size=8, lr=1e-3, live=False, log_every=0,
                           log=lambda *a: None)
    sd = load_file(str(out / "model.safetensors"))
    assert sorted({k.split(".")[3] for k in sd if k.startswith("bert.encoder.layer.")}) == ["1"]
    assert not any(k.startswith("bert.embeddings.") or k.startswith("bert.pooler.") for k in sd)
    key = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(sd[key], base_sd.get(key, base_sd.get(key.removeprefix("bert."))))  # it learned
    cfg = json.loads((out / "config.json").read_text())["tallow"]
    assert cfg["base_sha256"] and cfg["base_model"]
    # served = the base's embeddings and lower layer + the trained ones: the trainer's own probabilities
    assert res["served"]["fp32"]["max_abs_diff_vs_trainer"] <= 1e-5
    # float16 storage loads back as float32 with float16-sized differences
    half = tmp_path / "half"
    shutil.copytree(out, half)
    store_float16(half)
    assert all(v.dtype == torch.float16 for v in load_file(str(half / "model.safetensors")).values())
    texts = ["I love it", "terrible service"]
    a = [r["probabilities"]["positive"] for r in load(out).classify(texts)]
    b = [r["probabilities"]["positive"] for r in load(half).classify(texts)]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2
    # the base is checked as for a head
    (half / "config.json").write_text(json.dumps({**json.loads((half / "config.json").read_text()),
                                                  "tallow": {**cfg, "base_sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="not the same encoder"):
        load(half)


def test_train_layers_is_checked(tmp_path, sentiment_csv, bert_classifier_dir):
    for kw, msg in (({"mode": "head", "train_layers": 1}, "--train-layers needs --mode full"),
                    ({"mode": "full", "train_layers": 3}, "the base has 2 layers"),
                    ({"mode": "full", "train_layers": 0}, "--train-layers must be >= 1"),
                    ({"mode": "full", "save": "trained"}, "--save must be")):
        with pytest.raises(TrainInputError, match=msg):
            train_classifier(train_path=sentiment_csv, base=str(bert_classifier_dir), out=tmp_path / "x",
                             epochs=1, live=False, log=lambda *a: None, **kw)


def test_frozen_layers_do_not_move_and_run_without_dropout():
    from tallow.models.bert import BertConfig
    from tallow.train.bert_train import BertForClassificationTrain

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    m = BertForClassificationTrain(cfg, 2, dropout=0.5)
    m.bert.freeze_below(2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    assert not m.bert.embeddings.training and not m.bert.encoder.layer[1].training
    assert m.bert.encoder.layer[2].training
    ids, mask = torch.randint(1, 50, (4, 7)), torch.ones(4, 7, dtype=torch.long)
    torch.nn.functional.cross_entropy(m(ids, mask), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    after = m.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("bert.encoder.layer.2.") or k.startswith("classifier.") for k in moved)
    with pytest.raises(ValueError, match="0..3"):
        m.bert.freeze_below(4)


def test_length_buckets_keep_every_sample_and_cut_padding():
    lengths = [(i * 37) % 61 + 1 for i in range(1000)]
    s = GlobalBatchSampler(1000, 32, lengths=lengths, seed=3)
    plain = GlobalBatchSampler(1000, 32, seed=3)
    for epoch in range(2):
        s.set_epoch(epoch)
        plain.set_epoch(epoch)
        batches = list(s)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert [len(b) for b in batches] == [len(b) for b in plain]
        assert batches == list(s)  # the same order when asked again (resume)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        padded_plain = sum(max(lengths[i] for i in b) * len(b) for b in plain)
        assert padded < 0.7 * padded_plain
    with pytest.raises(ValueError, match="lengths"):
        GlobalBatchSampler(10, 4, lengths=[1, 2])
