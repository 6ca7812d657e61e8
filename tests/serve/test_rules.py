"""The server's request rules called directly (no HTTP): limits, truncation,
UTF-8, batching keys and document checks raise InputError naming the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tallow.errors import InputError
from tallow.models import minilm_path
from tallow.models.tokenizer import Tokenizer
from tallow.serve import rules
from tallow.serve.config import ModelsConfig


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(minilm_path(), max_length=16)


def _completion(**kw):
    base = dict(max_tokens=4, n=1, echo=False, logprobs=None, best_of=None, stop=None, truncate=False,
                temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None)
    return SimpleNamespace(**{**base, **kw})


def test_text_inputs_limits_and_utf8():
    cfg = ModelsConfig(max_inputs_per_request=2)
    assert rules.text_inputs("a", cfg) == ["a"]
    for value, param, msg in (([], "input", "non-empty"), (["a", "b", "c"], "input", "limit is 2"),
                              (["a", " "], "input[1]", "whitespace"), (["\ud800x"], "input[0]", "lone surrogate")):
        with pytest.raises(InputError, match=msg) as e:
            rules.text_inputs(value, cfg)
        assert e.value.param == param


def test_tokenize_inputs_refuses_or_truncates(tok):
    model = SimpleNamespace(tokenizer=tok)
    long = "word " * 40
    with pytest.raises(InputError, match="max_input_tokens") as e:
        rules.tokenize_inputs(model, [long], False, ModelsConfig())
    assert (e.value.param, e.value.kind) == ("input", "too_long")
    assert len(rules.tokenize_inputs(model, [long], True, ModelsConfig())[0]) == 16
    assert len(rules.tokenize_inputs(model, [long], True, ModelsConfig(max_input_tokens=8))[0]) == 8


def test_completion_job_limits_truncation_and_batching_key(tok):
    model = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(n_positions=32))
    cfg = ModelsConfig(max_completion_tokens=8, max_n=2)
    with pytest.raises(InputError) as e:
        rules.completion_job(cfg, model, ["hi"], _completion(max_tokens=9))
    assert e.value.param == "max_tokens"
    with pytest.raises(InputError) as e:
        rules.completion_job(cfg, model, ["hi"], _completion(stop=["a", ""]))
    assert e.value.param == "stop"
    long = "word " * 60
    with pytest.raises(InputError, match="truncate") as e:
        rules.completion_job(cfg, model, [long], _completion())
    assert e.value.param == "prompt"
    req, n = rules.completion_job(cfg, model, [long, "hi"], _completion(truncate=True, n=2))
    assert len(req.prompt_ids) == 4 and len(req.prompt_ids[0]) == 32 - 4 and req.prompt_ids[0] == req.prompt_ids[1]
    assert n == sum(len(s) for s in req.prompt_ids[::2])


def test_row_params_give_each_row_of_a_seeded_request_its_own_seed():
    from tallow.models.generation import SamplingParams
    from tallow.serve.generation import row_params

    unseeded = SamplingParams(max_new_tokens=4)
    assert row_params(unseeded, 3) == [unseeded] * 3
    seeded = row_params(SamplingParams(max_new_tokens=4, seed=2**64 - 1), 3)
    assert [p.seed for p in seeded] == [2**64 - 1, 0, 1]  # wraps in torch.Generator's range
    assert all(p.max_new_tokens == 4 for p in seeded)


def test_check_documents_names_the_document():
    docs = [{"id": "a", "text": "fine"}, {"id": "b", "text": "x" * 11}]
    with pytest.raises(InputError, match="limit is 10") as e:
        rules.check_documents(docs, 10, 10)
    assert e.value.param == "documents[1]"
    with pytest.raises(InputError) as e:
        rules.check_documents([{"id": "a", "text": "ok", "bogus": 1}], 10, 100)
    assert e.value.param == "documents[0]"
    with pytest.raises(InputError) as e:
        rules.check_documents(docs, 1, 100)
    assert e.value.param == "documents"
    rules.check_documents(docs, 10, 100)


def test_documents_the_schema_allows_are_accepted():
    """Many small documents, repeated exactly (a client's retry, or a fuzzer's
    list of {"text": "0"}), are ingested once each; an integral float
    timestamp is an integer to JSON Schema, and to the server."""
    docs = [{"text": "0"}] * 50 + [{"text": "0", "title": None}, {"id": "a", "text": "x", "timestamp": 5.0},
                                   {"id": "a", "text": "x", "timestamp": 5}]
    out = rules.check_documents(docs, 64, 100)
    assert [d["text"] for d in out] == ["0", "x"] and out[1]["timestamp"] == 5
    assert isinstance(out[1]["timestamp"], int)
    # two different documents under one id: refused, naming the second
    with pytest.raises(InputError, match="earlier document with other content") as e:
        rules.check_documents([{"text": "0"}, {"text": "0", "title": "t"}], 64, 100)
    assert e.value.param == "documents[1]"
    with pytest.raises(InputError, match="timestamp"):
        rules.check_documents([{"text": "x", "timestamp": 5.5}], 64, 100)
