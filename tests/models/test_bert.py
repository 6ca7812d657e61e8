"""BERT on tallow's kernels against sentence-transformers / transformers."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from tallow.corpus import docstring_sentences
from tallow.models import BertClassifier, BertEmbedder, CheckpointError, InputTooLongError, load

SENTENCES = [
    "The cat sits on the mat.",
    "A fast inference engine for CPUs.",
    "tallow runs BERT, GPT-2 and ResNet-50 with hand-written kernels, and this sentence is much longer "
    "than the others so that the batch is padded and the key padding mask matters.",
    "Ok",
    "Quantization trades a little accuracy for a lot of speed.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "🙂 emoji and unicode — dashes, ‘quotes’",
    "x" * 300,
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load(minilm_dir)


@pytest.fixture(scope="module")
def minilm_int8(minilm_dir):
    return load(minilm_dir, quantize="int8")


@pytest.fixture(scope="module")
def reference_embeddings(minilm_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    return torch.tensor(st.encode(SENTENCES, batch_size=4))


def test_minilm_fp32_matches_sentence_transformers(minilm, reference_embeddings, record_property):
    assert isinstance(minilm, BertEmbedder)
    ours = minilm.embed(SENTENCES, batch_size=3)  # padded batches of mixed lengths
    cos = F.cosine_similarity(ours, reference_embeddings)
    record_property("min_cosine_fp32", float(cos.min()))
    print(f"MiniLM fp32 vs sentence-transformers: min cosine {cos.min().item():.8f}")
    assert cos.min() >= 0.99999
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)))


def test_minilm_batching_does_not_change_embeddings(minilm):
    one_by_one = torch.cat([minilm.embed([s]) for s in SENTENCES])
    batched = minilm.embed(SENTENCES, batch_size=8)
    assert F.cosine_similarity(one_by_one, batched).min() >= 0.99999


def test_minilm_int8_close_to_fp32(minilm, minilm_int8, record_property):
    fp32 = minilm.embed(SENTENCES)
    int8 = minilm_int8.embed(SENTENCES)
    cos = F.cosine_similarity(fp32, int8)
    record_property("min_cosine_int8", float(cos.min()))
    print(f"MiniLM int8 vs fp32: min cosine {cos.min().item():.5f}, mean {cos.mean().item():.5f}")
    assert cos.min() >= 0.99
    assert "quantization=int8" in repr(minilm_int8)


@pytest.mark.slow
def test_int8_top10_neighbours_agree_with_fp32(minilm, minilm_int8):
    texts = docstring_sentences(2000)
    fp32 = minilm.embed(texts, batch_size=64, truncation=True)
    int8 = minilm_int8.embed(texts, batch_size=64, truncation=True)
    queries = range(0, len(texts), 10)
    overlap = []
    for i in queries:
        a = torch.topk(fp32 @ fp32[i], 11).indices[1:]
        b = torch.topk(int8 @ int8[i], 11).indices[1:]
        overlap.append(len(set(a.tolist()) & set(b.tolist())) / 10)
    agreement = sum(overlap) / len(overlap)
    print(f"top-10 neighbour agreement int8 vs fp32 over {len(texts)} sentences: {agreement:.4f}")
    assert agreement >= 0.95


def test_classifier_matches_transformers(bert_classifier_dir):
    from transformers import BertForSequenceClassification

    ref = BertForSequenceClassification.from_pretrained(bert_classifier_dir).eval()
    model = load(bert_classifier_dir)
    assert isinstance(model, BertClassifier)
    texts = ["I love this.", "This is terrible and I want my money back!", "It is a chair."]
    input_ids, mask = model.tokenizer.batch(texts)
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(model.logits(input_ids, mask), expected, rtol=1e-4, atol=1e-5)
    results = model.classify(texts)
    for row, logits in zip(results, expected):
        probs = torch.softmax(logits, -1)
        assert row["label"] == ["negative", "neutral", "positive"][int(probs.argmax())]
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert set(row["probabilities"]) == {"negative", "neutral", "positive"}


def test_classifier_int8_agrees_with_fp32(bert_classifier_dir):
    fp32, int8 = load(bert_classifier_dir), load(bert_classifier_dir, quantize="int8")
    ids, mask = fp32.tokenizer.batch(["I love this.", "This is terrible.", "It is a chair."])
    a, b = fp32.logits(ids, mask), int8.logits(ids, mask)
    assert (a - b).abs().max() < 0.05 * a.abs().max() + 1e-3


def test_over_long_input_names_the_limit(bert_classifier_dir):
    model = load(bert_classifier_dir)  # max_position_embeddings = 64
    long_text = "word " * 200
    with pytest.raises(InputTooLongError, match="limit is 64"):
        model.classify([long_text])
    result = model.classify([long_text], truncation=True)
    assert len(result) == 1


def test_empty_and_wrong_type_inputs_are_rejected(minilm):
    with pytest.raises(ValueError, match="input 1 is empty"):
        minilm.embed(["fine", "   "])
    with pytest.raises(TypeError, match="input 0 is int"):
        minilm.embed([3])
    assert minilm.embed([]).shape == (0, 384)


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load(tmp_path)


def test_corrupt_or_truncated_safetensors(tmp_path, bert_classifier_dir):
    bad = tmp_path / "bad"
    shutil.copytree(bert_classifier_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(bad)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(bad)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, bert_classifier_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(bert_classifier_dir / "model.safetensors"))
    bad = tmp_path / "bad"
    shutil.copytree(bert_classifier_dir, bad)
    broken = dict(sd)
    del broken["bert.encoder.layer.1.output.dense.bias"]
    broken["bert.encoder.layer.0.attention.self.key.weight"] = torch.zeros(96, 95)
    broken["bert.extra.weight"] = torch.zeros(3)
    save_file(broken, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load(bad)
    msg = str(err.value)
    assert "missing tensors: encoder.layer.1.output.dense.bias" in msg
    assert "unexpected tensors: extra.weight" in msg
    assert "encoder.layer.0.attention.self.key.weight: expected (96, 96), got (96, 95)" in msg


def test_nan_weights_are_rejected(tmp_path, bert_classifier_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(bert_classifier_dir / "model.safetensors"))
    sd["classifier.bias"] = torch.tensor([0.0, float("nan"), 0.0])
    bad = tmp_path / "nan"
    shutil.copytree(bert_classifier_dir, bad)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="classifier.bias contains NaN"):
        load(bad)


def test_repr_shows_architecture_dtype_quantization_and_parameters(minilm):
    text = repr(minilm)
    assert "BertEmbedder" in text and "float32" in text and "quantization=none" in text
    assert "22,713,216" in text  # all-MiniLM-L6-v2: 22.7 M parameters
