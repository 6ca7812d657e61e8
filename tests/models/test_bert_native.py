"""The native encoder forward (one C++ call per batch, packed sequences)
against the per-op path it replaces and against transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tallow.models import load
from tallow.testing import require_native


@pytest.fixture(scope="module")
def odd_bert_dir(tmp_path_factory, minilm_dir):
    """A random BERT with awkward sizes: hidden 36 (not a multiple of the
    vector width), 3 heads of 12, FFN 37, 130 positions, tanh GELU."""
    import shutil

    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=37, max_position_embeddings=130, hidden_act="gelu_new")
    out = tmp_path_factory.mktemp("odd-bert")
    BertModel(cfg).eval().save_pretrained(out)
    shutil.copy(minilm_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def _ids(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[101] + torch.randint(1000, 20000, (n - 2,), generator=g).tolist() + [102] if n >= 2 else [101]
            for n in lengths]


LENGTHS = [1, 7, 97, 129, 2, 30, 5]


def _per_op(model, fn, *args, **kwargs):
    native, model.bert.native = model.bert.native, None
    try:
        return fn(*args, **kwargs)
    finally:
        model.bert.native = native


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("mean", False)])
def test_native_fp32_equals_transformers_on_mixed_lengths(each_isa, odd_bert_dir, pooling, normalize):
    require_native()
    from transformers import BertModel

    model = load(odd_bert_dir)
    assert model.bert.native is not None
    ids = _ids(LENGTHS)
    got = model.embed_ids(ids, batch_size=4, pooling=pooling, normalize=normalize)
    ref = BertModel.from_pretrained(odd_bert_dir).eval()
    for i, x in enumerate(ids):  # one sequence at a time: no padding in the reference
        with torch.no_grad():
            h = ref(input_ids=torch.tensor([x])).last_hidden_state[0]
        e = h.mean(0) if pooling == "mean" else h[0]
        e = F.normalize(e, dim=0) if normalize else e
        assert F.cosine_similarity(got[i], e, dim=0) >= 0.99999, i
        torch.testing.assert_close(got[i], e, rtol=1e-4, atol=2e-5)


def test_native_matches_per_op_path_fp32_and_int8(odd_bert_dir):
    require_native()
    ids = _ids(LENGTHS, seed=1)
    for quantize, bound in ((None, 0.99999), ("int8", 0.999)):
        model = load(odd_bert_dir, quantize=quantize)
        got = model.embed_ids(ids, batch_size=3)
        ref = _per_op(model, model.embed_ids, ids, batch_size=3)
        assert F.cosine_similarity(got, ref).min() >= bound, quantize


def test_a_sentence_embeds_the_same_alone_or_in_any_batch(minilm_dir):
    require_native()
    for quantize in (None, "int8"):
        model = load(minilm_dir, quantize=quantize)
        ids = model.tokenizer.encode_ids(["first one", "The sentence we follow through the batches.",
                                          "a much longer third sentence " * 5])
        alone = model.embed_ids([ids[1]])
        for batch in ([ids[0], ids[1]], [ids[2], ids[1], ids[0]], [ids[1]] * 9):
            together = model.embed_ids(batch, batch_size=32)
            row = batch.index(ids[1])
            assert torch.equal(together[row], alone[0]), (quantize, len(batch))


def test_classifier_native_equals_per_op_probabilities(bert_classifier_dir):
    require_native()
    model = load(bert_classifier_dir)
    ids = model.tokenizer.encode_ids(["I love this.", "This is terrible and I want my money back!", "chair"])
    got = model.classify_ids(ids)
    ref = _per_op(model, model.classify_ids, ids)
    for a, b in zip(got, ref):
        assert a["label"] == b["label"]
        for label in a["probabilities"]:
            assert abs(a["probabilities"][label] - b["probabilities"][label]) < 1e-5


def test_native_forward_names_bad_ids(odd_bert_dir):
    require_native()
    model = load(odd_bert_dir)
    with pytest.raises(ValueError, match="token id 40000 at position 1 is outside the vocabulary"):
        model.embed_ids([[101, 40000, 102]])
    with pytest.raises(ValueError, match="exceeds the model's limit of 130"):
        model.embed_ids([[101] * 131])
    with pytest.raises(ValueError, match="input 1 has no tokens"):
        model.embed_ids([[101], []])


def test_model_built_under_backend_ref_keeps_the_per_op_path(odd_bert_dir, monkeypatch):
    monkeypatch.setenv("TALLOW_BACKEND", "ref")
    assert load(odd_bert_dir).bert.native is None
    monkeypatch.setenv("TALLOW_BACKEND", "")
    monkeypatch.setenv("TALLOW_ENCODER", "ops")
    assert load(odd_bert_dir).bert.native is None


def test_a_copied_model_builds_its_own_native_encoder(odd_bert_dir):
    """deepcopy / pickle carry the weights; the copy's native forward reads
    the copy's weights, not the original's."""
    import copy
    import pickle

    require_native()
    model = load(odd_bert_dir)
    ids = _ids([5, 9])
    before = model.embed_ids(ids)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.bert.word_embeddings.weight[ids[0][1]] += 1.0
    assert not torch.equal(tuned.embed_ids(ids)[0], before[0])
    assert torch.equal(model.embed_ids(ids), before)
    assert torch.equal(pickle.loads(pickle.dumps(model)).embed_ids(ids), before)
