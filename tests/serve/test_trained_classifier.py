"""A head trained by tallow.train, served by /v1/classify: the probabilities
equal the trainer's (mean pooling honoured by the server's model)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from server_helpers import ServerThread, make_config

from tallow.models import load


def test_classify_serves_the_trained_head(tmp_path, trained_head_dir, bert_classifier_dir):
    server = ServerThread(make_config(tmp_path / "data", **{"models.classifier": str(trained_head_dir),
                                                            "data.demo_corpus": False})).start()
    try:
        texts = ["I love it today", "terrible service again", "a so-so afternoon"]
        with server.client() as c:
            r = c.post("/v1/classify", json={"input": texts})
        assert r.status_code == 200, r.text
        served = torch.tensor([[row["probabilities"][lab] for lab in ("negative", "positive")]
                               for row in r.json()["data"]])
    finally:
        server.stop()
    feats = load(bert_classifier_dir, task="embed").embed(texts, pooling="mean", normalize=False)
    sd = load_file(str(trained_head_dir / "model.safetensors"))
    trainer = torch.softmax(feats @ sd["classifier.weight"].T + sd["classifier.bias"], -1)
    assert (served - trainer).abs().max() <= 1e-5
