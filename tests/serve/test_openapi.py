"""The OpenAPI schema says what the server answers (issue 14, part 4): every
status of every operation with the error model, the security scheme, the
filter syntax — and schemathesis, driving a live server with keys from that
schema with all its checks, finds nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from server_helpers import ServerThread, make_config
from tallow.serve import auth, create_app, load_config, openapi

FULL, READ_ONLY = "st-full-key-0123", "st-read-only-key-4567"


def _app(tmp_path, **overrides):
    return create_app(config=load_config(**{"data.dir": str(tmp_path), "data.demo_corpus": False,
                                            "models.generator": "", **overrides}))


def test_every_operation_has_its_statuses_decided(tmp_path):
    app = _app(tmp_path, **{"server.api_key": FULL})
    undecided = [f"{m} {auth.route_path(r)}" for r in auth.app_routes(app)
                 if getattr(r, "include_in_schema", False) and isinstance(r.original_route, auth.APIRoute)
                 for m in sorted(r.methods) if (m, auth.route_path(r)) not in openapi.ROUTE_ERRORS]
    assert not undecided, f"add these operations to tallow.serve.openapi.ROUTE_ERRORS: {undecided}"


def test_schema_documents_statuses_security_and_filters(tmp_path):
    app = _app(tmp_path, **{"server.api_key": FULL, "server.read_only_api_keys": [READ_ONLY],
                            "server.key_rps": 5.0})
    spec = TestClient(app).get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "api-key", "x-api-key"}
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer",
                                                               "description": "`Authorization: Bearer <key>`"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        guarded = op["x-tallow-access"] != "open"
        assert ("security" in op) == guarded, (method, path)
        if guarded:
            assert {"401", "403", "429"} <= codes, (method, path, codes)
        if method == "POST":
            assert {"413", "422"} <= codes, (method, path, codes)
        for code in codes - {"200"}:
            if path != "/ready":
                assert op["responses"][code]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}, (method, path, code)
    assert ops[("GET", "/health")]["x-tallow-access"] == "open" and "security" not in ops[("GET", "/health")]
    assert ops[("POST", "/v1/documents")]["x-tallow-access"] == "write"
    assert ops[("POST", "/v1/search")]["x-tallow-access"] == "read"
    assert set(ops[("GET", "/metrics")]["responses"]["200"]["content"]) == {"text/plain"}
    assert {"404"} <= set(ops[("GET", "/v1/models/{model}")]["responses"])
    assert {"415", "503", "504"} <= set(ops[("POST", "/v1/images/search")]["responses"])
    assert "text/event-stream" in ops[("POST", "/v1/completions")]["responses"]["200"]["content"]
    search = spec["components"]["schemas"]["SearchRequest"]["properties"]["filter"]
    assert {"$ref": "#/components/schemas/Filter"} in search["anyOf"]
    image_form = ops[("POST", "/v1/images/search")]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Filter"} in image_form["properties"]["filter"]["anyOf"]

    # Without keys: nothing declares security, and no 401/403 is promised.
    open_spec = TestClient(_app(tmp_path / "open")).get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert all("401" not in op["responses"] and "security" not in op
               for item in open_spec["paths"].values() for op in item.values())


def test_filter_schema_agrees_with_the_server(tmp_path):
    """Filters the schema allows, the server accepts; ones it forbids, the server refuses."""
    import jsonschema_rs

    from tallow.index import filters

    spec = TestClient(_app(tmp_path)).get("/openapi.json").json()
    schema = {**openapi.FILTER_SCHEMA, "components": {"schemas": {"Filter": openapi.FILTER_SCHEMA}}}
    validator = jsonschema_rs.validator_for(schema)
    assert spec["components"]["schemas"]["Filter"] == openapi.FILTER_SCHEMA
    good = [{}, {"category": "news"}, {"n": 3}, {"ok": True}, {"t": {"gte": 1, "lt": 2.5}},
            {"tag": {"in": ["a", 1]}}, {"lang": {"ne": "de"}, "tag": {"nin": [True]}},
            {"must": [{"a": 1}], "should": [{"b": {"eq": "x"}}, {}], "must_not": [{"c": {"lte": 0}}]}]
    bad = [{"": 1}, {"a": None}, {"a": [1]}, {"a": {}}, {"a": {"like": "x"}}, {"a": {"gt": "1"}},
           {"a": {"in": []}}, {"a": {"gt": True}}, {"must": []}, {"must": {"a": 1}}, {"should": [5]}, {"must_not": [None]}]
    for f in good:
        assert validator.is_valid(f), f
        filters.parse(f)
    for f in bad:
        assert not validator.is_valid(f), f
        with pytest.raises(filters.FilterError):
            filters.parse(f)


REPO = Path(__file__).resolve().parents[2]


def _make_run_config(data_dir, **overrides):
    """`make run`'s own configuration (tallow.toml: the sentiment classifier, SmolLM2, the Todo REST
    API and the image function), with its data in ``data_dir`` and no demo corpus (quick to start)."""
    return load_config(REPO / "tallow.toml", **{"data.dir": str(data_dir), "data.demo_corpus": False, **overrides})


def test_function_operations_are_described_as_they_answer(tmp_path, monkeypatch):
    """A function answers with its own statuses (the Todo REST API: 201, 204, 404, 405, 422):
    2XX and `default` (the error model) beside what tallow answers for it (413, 429, 500, 504);
    a "/..." route's subpath is a declared path parameter (a template naming an undeclared
    parameter is a schema error); the documents limits are in the schema."""
    monkeypatch.setenv("TALLOW_WASM_CACHE", str(tmp_path / "wasm-cache"))
    spec = TestClient(create_app(config=_make_run_config(tmp_path / "data"))).get("/openapi.json").json()
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    functions = {k: op for k, op in ops.items() if "x-tallow-function" in op}
    assert {("GET", "/todos"), ("DELETE", "/todos/{path}"), ("POST", "/image-info")} <= set(functions)
    for (method, path), op in functions.items():
        codes = set(op["responses"])
        assert {"2XX", "default", "429", "500", "504"} <= codes and "200" not in codes, (method, path, codes)
        assert ("413" in codes) == (method != "GET"), (method, path, codes)
        assert op["responses"]["2XX"]["content"] == {"*/*": {"schema": {}}}
        assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"}
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert names == re.findall(r"\{([^}]+)\}", path), (method, path, names)
    documents = spec["components"]["schemas"]["DocumentsBody"]["properties"]["documents"]
    assert documents["maxItems"] == 2048 and documents["items"]["properties"]["text"]["maxLength"] == 200000


def test_a_function_path_answers_405_naming_every_method_it_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLOW_WASM_CACHE", str(tmp_path / "wasm-cache"))
    client = TestClient(create_app(config=_make_run_config(tmp_path / "data")))
    for path in ("/todos", "/todos/1", "/image-info"):
        r = client.request("PATCH", path)
        assert r.status_code == 405 and r.json()["error"]["code"] == 405, (path, r.text)
        want = "DELETE, GET, HEAD, POST, PUT" if path.startswith("/todos") else "POST"
        assert r.headers["allow"] == want, (path, r.headers.get("allow"))
    assert client.get("/image-info").headers["allow"] == "POST"


# -- schemathesis against a live server -------------------------------------------------------

@pytest.fixture(scope="module")
def st_server(tmp_path_factory, bert_classifier_dir, gpt2_long_dir, resnet_dir):
    """Every model, no demo corpus (the run writes and deletes documents and images), a full
    and a read-only key, a small body limit."""
    cfg = make_config(tmp_path_factory.mktemp("st-data"), **{
        "data.demo_corpus": False, "models.classifier": str(bert_classifier_dir),
        "models.generator": str(gpt2_long_dir), "models.image": str(resnet_dir), "server.api_key": FULL,
        "server.read_only_api_keys": [READ_ONLY], "server.max_body_bytes": 1 << 20,
        "images.max_megapixels": 2.0, "models.max_completion_tokens": 64, "models.max_completion_rows": 4,
        "models.max_n": 2, "models.max_inputs_per_request": 16})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


def test_image_uploads_the_schema_allows_are_read_as_images(st_server):
    """The multipart forms say of the image part only that it is a file: schemathesis checks a
    mutated form's validity with each file as "" (it cannot read binaries), so a bound on it made
    every mutation of another field look invalid, and its `negative_data_rejection` reported
    valid ids ("0*") as violations. An empty file is bytes that are not an image: 415, as for
    any other such bytes."""
    import jsonschema_rs

    spec = httpx.get(st_server.url + "/openapi.json", headers={"Authorization": f"Bearer {FULL}"}, timeout=30).json()
    for path in ("/v1/images", "/v1/images/search"):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["image"] == {"type": "string", "format": "binary"}, path
        form_as_checked = {"image": "", **({"id": "0*"} if path == "/v1/images" else {})}
        validator = jsonschema_rs.validator_for({**form, "components": spec["components"]})
        assert validator.is_valid(form_as_checked), path
        r = httpx.post(st_server.url + path, files={"image": ("empty.png", b"", "image/png")},
                       data={"id": "e"} if path == "/v1/images" else {},
                       headers={"Authorization": f"Bearer {FULL}"}, timeout=60)
        assert r.status_code == 415 and "empty" in r.json()["error"]["message"], (path, r.text)


def _schemathesis(url: str, config: Path, cwd: Path, *extra: str) -> str:
    """`st run --checks all` with a fixed seed and a time budget; asserts it found nothing."""
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "--config-file", str(config), "run", url + "/openapi.json", "--checks", "all",
           "--max-examples", "8", "--seed", "7", "--workers", "1", "--request-timeout", "30", "--no-color", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd,  # its caches go there
                          env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"})
    out = proc.stdout + proc.stderr
    Path(os.environ.get("TALLOW_ST_LOG", os.devnull)).write_text(out)
    assert proc.returncode == 0, out[-12000:]
    return out


def test_schemathesis_finds_nothing(st_server, tmp_path):
    """`st run --checks all` with the full key (schemathesis also sends requests
    without it, and checks that the schema's security is enforced). Bounded:
    a few examples per operation, a fixed seed, a time budget.

    POST /v1/images runs apart, without the negative-data check: schemathesis
    reports valid multipart forms of it as schema-violating (schemathesis.toml
    says what was recorded), and a per-operation `enabled = false` in the
    config file does not hold against `--checks all` on the command line
    (schemathesis 4.32: the command line's explicit enable wins), so the
    exclusion is made here, for that operation only."""
    config = Path(__file__).with_name("schemathesis.toml")
    key = ["-H", f"Authorization: Bearer {FULL}"]
    _schemathesis(st_server.url, config, tmp_path, *key, "--exclude-name", "POST /v1/images", "--max-time", "40",
                  "--report", "ndjson", "--report-ndjson-path", str(tmp_path / "st-report.json"))
    _schemathesis(st_server.url, config, tmp_path, *key, "--include-name", "POST /v1/images",
                  "--exclude-checks", "negative_data_rejection", "--max-time", "20")


@pytest.fixture(scope="module")
def make_run_server(tmp_path_factory):
    """The server `make run` starts (tallow.toml, its functions mounted), on a free port."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TALLOW_WASM_CACHE", str(tmp_path_factory.mktemp("wasm-cache")))
        # Short replies: the time budget goes to many examples, not to a few long generations.
        server = ServerThread(_make_run_config(tmp_path_factory.mktemp("make-run-data"), **{
            "models.max_completion_tokens": 64, "models.max_n": 2})).start()  # 64: /v1/rag's default
        yield server
        server.stop()


def test_schemathesis_finds_nothing_on_make_runs_configuration(make_run_server, tmp_path):
    """`st run --checks all` against tallow.toml's server: no key (tallow.toml sets none), SmolLM2
    generating, the image operations answering their documented 503, the Todo REST API and the
    image function mounted (schemathesis-make-run.toml says what their checks cannot know)."""
    config = tmp_path / "schemathesis.toml"
    here = Path(__file__).parent
    config.write_text((here / "schemathesis.toml").read_text() + "\n" + (here / "schemathesis-make-run.toml").read_text())
    _schemathesis(make_run_server.url, config, tmp_path, "--max-time", "40")
    metrics = httpx.get(make_run_server.url + "/metrics", timeout=30).text
    for route in ("/todos", "/todos/{path}", "/image-info"):  # the functions were called
        assert f'route="{route}"' in metrics, route
