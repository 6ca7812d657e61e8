"""Every endpoint of the real server (uvicorn on loopback), its answers
checked against the models called directly, and its error answers."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from tallow.models import load


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == status
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- operations --------------------------------------------------------------------------------

def test_health_ready_models(client, gpt2_dir):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert all(m["status"] == "ready" for m in ready.json()["models"].values())
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert ids == {"tallow-embed", "tallow-classify", gpt2_dir.name, "tallow-resnet50"}  # the generator: its model


def test_stats_names_the_version_build_and_engine(client):
    import tallow

    stats = client.get("/v1/stats").json()
    assert stats["version"] == tallow.__version__
    native = tallow.info()["native"]
    assert stats["native"]["isa"] == native["isa"] and stats["native"]["isa_levels"] == native["isa_levels"]
    assert stats["engine"]["documents"] >= 0 and stats["engine"]["index"] == "hnsw"
    assert stats["models"] == {name: m["status"] for name, m in client.get("/ready").json()["models"].items()}
    assert stats["models"] and all(status == "ready" for status in stats["models"].values())
    assert stats["extras"]["serve"] is True


def test_openapi_schema_lists_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    image_body = spec["paths"]["/v1/images"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(image_body)
    assert {"/v1/classify", "/v1/embeddings", "/v1/completions", "/generate", "/v1/search", "/v1/rag",
            "/v1/documents", "/v1/documents/{id}", "/v1/images", "/v1/images/search", "/v1/models",
            "/health", "/ready", "/metrics"} <= paths


# -- embeddings ----------------------------------------------------------------------------------

def test_embeddings_match_the_model(client, full_server):
    texts = ["The cat sat on the mat.", "Parsing JSON documents in Python", "a"]
    r = client.post("/v1/embeddings", json={"input": texts, "model": "tallow-embed"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    want = full_server.services.models["embedder"].model.embed(texts).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3

    b64 = client.post("/v1/embeddings", json={"input": texts[1], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[1], atol=1e-5)


def test_embeddings_input_limits(client):
    long_text = "word " * 700  # MiniLM takes 512 tokens
    err = _error(client.post("/v1/embeddings", json={"input": ["ok", long_text]}), 422)
    assert "input 1" in err["message"] and "512" in err["message"] and "truncate" in err["message"]
    r = client.post("/v1/embeddings", json={"input": ["ok", long_text], "truncate": True})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert "empty" in _error(client.post("/v1/embeddings", json={"input": ["ok", "  "]}), 422)["message"]
    _error(client.post("/v1/embeddings", json={"input": []}), 422)
    err = _error(client.post("/v1/embeddings", json={"input": "x", "dimensions": 3}), 422)
    assert err["param"] == "dimensions"
    err = _error(client.post("/v1/embeddings", json={"input": 5}), 422)
    assert err["param"] == "input"


# -- classification -----------------------------------------------------------------------------

def test_classify_matches_the_model(client, bert_classifier_dir):
    texts = ["I loved it", "terrible service", "it was fine"]
    r = client.post("/v1/classify", json={"input": texts})
    assert r.status_code == 200, r.text
    want = load(bert_classifier_dir).classify(texts)
    for row, w in zip(r.json()["data"], want):
        assert row["label"] == w["label"] and set(row["probabilities"]) == {"negative", "neutral", "positive"}
        assert row["score"] == pytest.approx(w["score"], abs=1e-5)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    err = _error(client.post("/v1/classify", json={"input": "x", "bogus": 1}), 422)
    assert err["param"] == "bogus"


# -- completions --------------------------------------------------------------------------------

def test_completion_greedy_matches_generate(client, gpt2_dir):
    r = client.post("/v1/completions", json={"prompt": "The quick brown", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = load(gpt2_dir).generate(["The quick brown"], max_new_tokens=12, temperature=0.0)[0]
    assert body["choices"][0]["text"] == want.text
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] == len(want.token_ids)


def test_completion_n_seed_and_stop(client):
    req = {"prompt": ["One", "Two"], "max_tokens": 8, "n": 2, "temperature": 1.0, "seed": 7}
    a, b = client.post("/v1/completions", json=req).json(), client.post("/v1/completions", json=req).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    greedy = client.post("/v1/completions", json={"prompt": "One", "max_tokens": 16, "temperature": 0}).json()
    text = greedy["choices"][0]["text"]
    if len(text.strip()) >= 2:
        stop = text.strip()[:2]
        stopped = client.post("/v1/completions", json={"prompt": "One", "max_tokens": 16, "temperature": 0,
                                                      "stop": stop}).json()["choices"][0]
        assert stop not in stopped["text"] and stopped["finish_reason"] == "stop"


def test_completion_limits(client):
    err = _error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 65}), 422)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    long_prompt = "hello there " * 200  # over the 128-token context of the test model
    err = _error(client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 8}), 422)
    assert "context" in err["message"] and "truncate" in err["message"]
    r = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 8, "truncate": True,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert _error(client.post("/v1/completions", json={"prompt": "x", "logprobs": 2}), 422)["param"] == "logprobs"
    assert _error(client.post("/v1/completions", json={"prompt": "x", "n": 9}), 422)["param"] == "n"
    assert _error(client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 422)["param"] == "temperature"


def test_completion_stream_equals_non_stream(client):
    req = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    events = []
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_generate_endpoint(client):
    r = client.post("/generate", json={"prompt": "Hello", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["generated_text"], str) and body["latency_ms"] > 0
    _error(client.post("/generate", json={"max_tokens": 5}), 422)


# -- search, RAG, documents ----------------------------------------------------------------------

def test_search_demo_corpus_with_filters(client):
    r = client.post("/v1/search", json={"query": "encode and decode JSON data", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and hits[0]["doc_id"] == "stdlib/json"
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(len(hits) - 1))
    pk = client.post("/v1/search", json={"query": "encode and decode JSON data", "k": 5,
                                         "filter": {"category": "package"}}).json()["hits"]
    assert pk and all(h["category"] == "package" for h in pk)
    hybrid = client.post("/v1/search", json={"query": "JSON", "k": 3, "hybrid": True}).json()["hits"]
    assert hybrid
    err = _error(client.post("/v1/search", json={"query": "x", "filter": {"category": {"like": "a"}}}), 422)
    assert "like" in err["message"]
    assert _error(client.post("/v1/search", json={"query": "x", "k": 0}), 422)["param"] == "k"
    assert _error(client.post("/v1/search", json={"query": ""}), 422)["param"] == "query"


def test_rag_answers_with_sources(client):
    r = client.post("/v1/rag", json={"question": "How do I read CSV files?", "k": 2, "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str) and len(body["sources"]) >= 1
    assert {"doc_id", "title", "text", "score"} <= set(body["sources"][0])
    assert "prompt" not in body


def test_documents_ingest_search_delete_with_auth(client, anon, auth):
    doc = {"id": "note-1", "title": "Zebra care", "text": "Zebras need wide pastures, fresh water and company "
           "of other zebras; their stripes confuse biting flies.", "category": "animals",
           "timestamp": 1700000000, "payload": {"lang": "en"}}
    _error(anon.post("/v1/documents", json={"documents": [doc]}), 401)
    err = _error(client.post("/v1/documents", json={"documents": [doc]},
                             headers={"Authorization": "Bearer wrong"}), 403)
    assert "not valid" in err["message"]
    r = client.post("/v1/documents", json={"documents": [doc]}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 1
    again = client.post("/v1/documents", json={"documents": [doc]}, headers=auth).json()
    assert again["unchanged"] == 1 and again["added"] == 0
    hits = client.post("/v1/search", json={"query": "zebra stripes and flies", "k": 1,
                                           "filter": {"category": "animals"}}).json()["hits"]
    assert hits[0]["doc_id"] == "note-1" and hits[0]["payload"] == {"lang": "en"}
    bad = _error(client.post("/v1/documents", json={"documents": [{"id": "x", "text": ""}]}, headers=auth), 422)
    assert bad["param"] == "documents[0]"
    _error(anon.delete("/v1/documents/note-1"), 401)
    assert client.delete("/v1/documents/note-1", headers=auth).json()["deleted"] is True
    assert _error(client.delete("/v1/documents/note-1", headers=auth), 404)["param"] == "id"
    hits = client.post("/v1/search", json={"query": "zebra stripes", "k": 3,
                                           "filter": {"category": "animals"}}).json()["hits"]
    assert hits == []


# -- images ----------------------------------------------------------------------------------------

def _image_bytes(seed: int, size=(96, 80), fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] //= (seed % 3) + 1  # some structure, not only noise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_images_store_and_search(client, auth):
    for i in range(4):
        r = client.post("/v1/images", headers=auth,
                        json={"id": f"img-{i}", "image": base64.b64encode(_image_bytes(i)).decode(),
                              "payload": {"kind": "even" if i % 2 == 0 else "odd"}})
        assert r.status_code == 200, r.text
    # multipart upload of the search query
    r = client.post("/v1/images/search", files={"image": ("q.png", _image_bytes(2), "image/png")},
                    data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hits"][0]["id"] == "img-2" and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert {"preprocess", "inference", "search", "metadata"} <= set(body["timing_ms"])
    odd = client.post("/v1/images/search", json={"image": base64.b64encode(_image_bytes(2)).decode(), "k": 4,
                                                  "filter": {"kind": "odd"}}).json()["hits"]
    assert {h["id"] for h in odd} == {"img-1", "img-3"}


def test_images_bad_input(client, anon, auth):
    post = lambda body: client.post("/v1/images", headers=auth, json=body)  # noqa: E731
    assert _error(post({"id": "x", "image": "%%%not base64"}), 422)["param"] == "image"
    _error(post({"id": "x", "image": base64.b64encode(b"definitely not an image").decode()}), 415)
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # 9 MP > the 2 MP limit of this server
    err = _error(post({"id": "big", "image": base64.b64encode(buf.getvalue()).decode()}), 422)
    assert "megapixel" in err["message"].lower() or "pixels" in err["message"].lower()
    _error(post({"image": base64.b64encode(_image_bytes(1)).decode()}), 422)  # no id
    _error(anon.post("/v1/images", json={"id": "x", "image": "aGk="}), 401)
    r = client.post("/v1/images/search", content=b"raw", headers={"content-type": "image/png"})
    _error(r, 415)


# -- limits and error format ------------------------------------------------------------------

def test_body_size_malformed_json_and_unknown_route(client):
    err = _error(client.post("/v1/embeddings", content=b"{" + b" " * (1 << 20) + b"}",
                             headers={"content-type": "application/json"}), 413)
    assert "limit" in err["message"]
    err = _error(client.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"}),
                 422)
    assert "JSON" in err["message"]
    err = _error(client.post("/v1/search", json={"query": "x", "k": "many"}), 422)
    assert err["param"] == "k"
    _error(client.get("/v1/nothing-here"), 404)
    _error(client.get("/v1/embeddings"), 405)


def test_metrics_exposition(client):
    client.post("/v1/embeddings", json={"input": "metrics please"})
    client.delete("/v1/documents/does-not-exist", headers={"Authorization": "Bearer nope"})
    text = client.get("/metrics").text
    assert 'tallow_requests_total{method="POST",route="/v1/embeddings",status="200"}' in text
    assert 'route="/v1/documents/{id}"' in text  # the template, not one series per id
    assert "tallow_request_latency_seconds_bucket" in text
    assert 'tallow_batch_size_count{lane="embeddings"}' in text
    assert 'tallow_queue_depth{lane="embeddings"}' in text
    assert "tallow_tokens_generated_total" in text
    assert "tallow_time_to_first_token_seconds_count" in text
    assert 'tallow_cache_hits_total{backend="lru"}' in text


# -- hostile input ------------------------------------------------------------------------------------

HOSTILE_BODIES = [
    b"", b"null", b"[]", b"123", b'"just a string"', b"\xff\xfe\x00garbage", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"input": "x", "truncate": "yes please"}', b'{"input": ["a", null]}', b'{"query": "x", "k": 1e309}',
    b'{"query": "x", "score_threshold": NaN}', b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "stop": [""]}',
    b'{"prompt": "x", "n": 99999999999999999999}', b'{"documents": [{"id": "", "text": "x"}]}',
    b'{"documents": "not a list"}', b'{"image": 5, "id": "x"}', b'{"id": "x", "image": "", "payload": []}',
]
ENDPOINTS = ["/v1/embeddings", "/v1/classify", "/v1/completions", "/generate", "/v1/search", "/v1/rag",
             "/v1/documents", "/v1/images", "/v1/images/search"]


def test_hostile_bodies_get_4xx_json_and_the_server_stays_up(client, auth):
    for path in ENDPOINTS:
        for body in HOSTILE_BODIES:
            r = client.post(path, content=body, headers={"content-type": "application/json", **auth})
            assert 400 <= r.status_code < 500, (path, body[:60], r.status_code, r.text[:200])
            assert set(r.json()) == {"error"}, (path, body[:60])
    assert client.get("/health").status_code == 200
    assert client.post("/v1/embeddings", json={"input": "still fine"}).status_code == 200


def test_a_model_that_fails_to_load_keeps_the_server_not_ready(tmp_path):
    from server_helpers import ServerThread, make_config

    missing = tmp_path / "no-such-classifier"
    server = ServerThread(make_config(tmp_path / "data", **{"models.classifier": str(missing),
                                                            "data.demo_corpus": False}))
    server.thread.start()
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            state = httpx.get(server.url + "/ready", timeout=10)
            slot = state.json()["models"]["classifier"]
            if slot["status"] != "loading" and state.json()["engine"]["status"] != "loading":
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert state.status_code == 503 and slot["status"] == "failed" and str(missing) in slot["error"]
        err = _error(httpx.post(server.url + "/v1/classify", json={"input": "x"}, timeout=10), 503)
        assert "failed to load" in err["message"] and str(missing) in err["message"]
        assert httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=60).status_code == 200
    finally:
        server.stop()


def test_reviewed_edge_cases(client, auth):
    """Inputs found by review that used to give 500s, hangs or out-of-memory."""
    err = _error(client.post("/v1/completions", json={"prompt": ["hi"] * 5, "n": 4, "max_tokens": 2}), 422)
    assert "max_completion_rows" in err["message"]  # 20 rows > 16: each row holds a KV cache
    err = _error(client.post("/v1/completions", json={"prompt": "x" * 200_000, "max_tokens": 2}), 422)
    assert "characters" in err["message"]  # refused before tokenizing 200k characters
    r = client.post("/v1/completions", json={"prompt": "ab " * 70_000, "max_tokens": 2, "truncate": True,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert _error(client.post("/v1/completions", json={"prompt": "x", "seed": 2**70}), 422)["param"] == "seed"
    assert _error(client.post("/generate", json={"prompt": "x", "seed": -(2**64)}), 422)["param"] == "seed"
    surrogate = '{"input": ["ok", "bad \\ud800 text"]}'
    err = _error(client.post("/v1/embeddings", content=surrogate, headers={"content-type": "application/json"}), 422)
    assert err["param"] == "input[1]" and "surrogate" in err["message"]
    doc = '{"documents": [{"id": "s1", "text": "bad \\udfff text"}]}'
    err = _error(client.post("/v1/documents", content=doc, headers={"content-type": "application/json", **auth}),
                 422)
    assert "surrogate" in err["message"]
    err = _error(client.post("/v1/documents", headers=auth,
                             json={"documents": [{"id": "big", "text": "word " * 50_000}]}), 422)
    assert "max_document_chars" in err["message"]
    err = _error(client.post("/v1/embeddings", json={"input": [[101, 2023, 102]]}), 422)
    assert "token-id arrays" in err["message"]
    nested = b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested" in _error(client.post("/v1/embeddings", content=nested,
                                          headers={"content-type": "application/json"}), 422)["message"]


def test_openai_model_retrieve_and_stream_usage(full_server):
    import openai

    from server_helpers import API_KEY

    client = openai.OpenAI(base_url=full_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.models.retrieve("tallow-embed").id == "tallow-embed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    chunks = list(client.completions.create(model="tallow-gpt2", prompt="Hi", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == sum(
        1 for c in chunks[:-1] if c.choices)


def test_an_embedder_that_fails_to_load_fails_the_engine_not_hangs_it(tmp_path):
    from starlette.testclient import TestClient

    from tallow.serve import create_app, load_config

    app = create_app(config=load_config(**{"data.dir": str(tmp_path), "models.embedder": str(tmp_path / "none"),
                                           "models.classifier": "", "models.generator": ""}))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while (state := c.get("/ready")).json()["engine"]["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state.status_code == 503 and state.json()["engine"]["status"] == "failed"
        err = _error(c.post("/v1/search", json={"query": "x"}), 503)
        assert "embedder did not load" in err["message"] and str(tmp_path / "none") in err["message"]


def test_an_unknown_model_is_404_model_not_found_as_openai_answers(full_server, client, gpt2_dir):
    import openai

    from server_helpers import API_KEY

    for path, body in (("/v1/embeddings", {"input": "x"}), ("/v1/classify", {"input": "x"}),
                       ("/v1/completions", {"prompt": "x", "max_tokens": 1})):
        r = client.post(path, json={**body, "model": "gpt-4o"})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and "'gpt-4o'" in err["message"]
    # the listed id, the configured path, or no model at all are served
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "model": "tallow-gpt2"}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "model": str(gpt2_dir)}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
    oa = openai.OpenAI(base_url=full_server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        oa.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.code == "model_not_found"


def test_a_body_that_is_not_declared_json_gets_a_hint_about_content_type(client):
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = client.post("/v1/embeddings", content=b'{"input": "hello"}', headers=headers)
        assert r.status_code == 415, (headers, r.text)
        message = r.json()["error"]["message"]
        assert "Content-Type: application/json" in message and "valid dictionary" not in message
    ok = client.post("/v1/embeddings", content=b'{"input": "hello"}',
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
