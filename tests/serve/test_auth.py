"""API keys (issue 17): every route the app registers x {no key, wrong key,
read-only key, full key} against the real server, from the app's own route
table and an explicit expectation table (a new route without a decision
fails here); header forms; settings for /metrics and the playground; function
routes by method; protected mode; per-key limits; keys never in the logs."""

from __future__ import annotations

import logging
import re
import socket
import time

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from server_helpers import API_KEY, READ_ONLY_KEY, SECOND_KEY, ServerThread, make_config
from tallow.serve import ConfigError, auth, create_app, load_config

# (method, path template) -> (who may call it, the status it answers the probe below when allowed).
# Probes: POST with the body {} (refused by the handler's checks, after the guard), GET/DELETE as is,
# path parameters filled with "no-such-thing".
EXPECTED: dict[tuple[str, str], tuple[str, int]] = {
    ("GET", "/health"): ("open", 200),
    ("GET", "/ready"): ("open", 200),
    ("GET", "/metrics"): ("open", 200),
    ("GET", "/openapi.json"): ("open", 200),
    ("GET", "/docs"): ("open", 200),
    ("GET", "/docs/assets/{name}"): ("open", 404),  # Swagger UI's files, served here (serve/apidocs.py)
    ("GET", "/v1/models"): ("read", 200),
    ("GET", "/v1/models/{model}"): ("read", 404),
    ("POST", "/v1/embeddings"): ("read", 422),
    ("POST", "/v1/classify"): ("read", 422),
    ("POST", "/v1/completions"): ("read", 422),
    ("POST", "/v1/chat/completions"): ("read", 422),
    ("POST", "/generate"): ("read", 422),
    ("POST", "/v1/search"): ("read", 422),
    ("POST", "/v1/rag"): ("read", 422),
    ("POST", "/v1/images/search"): ("read", 422),
    ("POST", "/v1/documents"): ("write", 422),
    ("DELETE", "/v1/documents/{id}"): ("write", 404),
    ("POST", "/v1/images"): ("write", 422),
    # decided for routes other branches add (the playground, the WebAssembly functions list)
    ("GET", "/"): ("open", 200),  # full_server sets server.public_playground (the browser test loads it)
    ("GET", "/playground/{name}"): ("open", 404),
    ("GET", "/v1/functions"): ("read", 200),
    ("GET", "/v1/stats"): ("read", 200),
}
KEYS = {"none": None, "wrong": "not-a-key-of-this-server", "read-only": READ_ONLY_KEY, "full": API_KEY}


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in auth.app_routes(app):
        for method in sorted(route.methods or ["*"]):
            if method != "HEAD":  # Starlette adds HEAD beside GET: the same decision
                out.append((method, auth.route_path(route)))
    return out


def _expected(level: str, who: str, allowed: int) -> int:
    if level == "open" or who == "full" or (who == "read-only" and level == "read"):
        return allowed
    return {"none": 401, "wrong": 403, "read-only": 403}[who]


def test_every_route_x_every_key(full_server):
    routes = _routes(full_server.app)
    undecided = [r for r in routes if r not in EXPECTED]
    assert not undecided, (f"routes without an access decision: {undecided}: decide each in "
                           "tallow.serve.auth.ROUTE_ACCESS and add the expectation to EXPECTED here")
    failures = []
    with httpx.Client(base_url=full_server.url, timeout=60) as c:
        for method, path in routes:
            level, allowed = EXPECTED[(method, path)]
            url = re.sub(r"\{[^}]+\}", "no-such-thing", path)
            for who, key in KEYS.items():
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                r = c.request(method, url, headers=headers, json={} if method == "POST" else None)
                want = _expected(level, who, allowed)
                if r.status_code != want:
                    failures.append(f"{method} {path} with {who} key: {r.status_code}, expected {want}: {r.text[:120]}")
                elif want in (401, 403):
                    err = r.json()["error"]
                    assert err["code"] == want and err["type"] in ("authentication_error", "permission_error")
                    assert key is None or key not in r.text
                    assert r.headers["www-authenticate"].startswith("Bearer")
    assert not failures, "\n".join(failures)


def test_key_headers_and_second_full_key(full_server):
    url = full_server.url + "/v1/models"
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"authorization": f"bearer {API_KEY}"},
                    {"api-key": API_KEY}, {"x-api-key": READ_ONLY_KEY}, {"Authorization": f"Bearer {SECOND_KEY}"}):
        assert httpx.get(url, headers=headers, timeout=30).status_code == 200, headers
    for headers in ({"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer"}, {"x-api-key": ""}):
        assert httpx.get(url, headers=headers, timeout=30).status_code == 401, headers
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}x"}, timeout=30).status_code == 403
    r = httpx.post(full_server.url + "/v1/documents", json={"documents": [{"id": "ro", "text": "read-only"}]},
                   headers={"x-api-key": READ_ONLY_KEY}, timeout=30)
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    # an unknown path says nothing without a key
    assert httpx.get(full_server.url + "/v1/secret-admin", timeout=30).status_code == 401
    assert httpx.get(full_server.url + "/v1/secret-admin", headers={"api-key": READ_ONLY_KEY},
                     timeout=30).status_code == 404


def test_openai_client_with_full_and_read_only_keys(full_server):
    import openai

    for key in (API_KEY, READ_ONLY_KEY):
        client = openai.OpenAI(base_url=full_server.url + "/v1", api_key=key, max_retries=0)
        assert client.embeddings.create(model="tallow-embed", input="hello").data[0].embedding
    bad = openai.OpenAI(base_url=full_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.models.list()


# -- settings, function routes, undecided routes (in-process: no model is loaded) ------------------

def _app(tmp_path, **overrides):
    return create_app(config=load_config(**{"data.dir": str(tmp_path), "data.demo_corpus": False,
                                            "models.generator": "", "server.api_key": "full-k", "server.read_only_api_keys": "ro-k",
                                            **overrides}))


def _add_test_routes(app: FastAPI) -> None:
    async def ok():
        return {"ok": True}

    app.add_api_route("/", ok, methods=["GET"])  # where the playground lives
    fn = {"x-tallow-function": {"name": "todo"}}  # how a WebAssembly function route is marked
    app.add_api_route("/fn/todo", ok, methods=["GET"], openapi_extra=fn, operation_id="fn_get")
    app.add_api_route("/fn/todo", ok, methods=["POST"], openapi_extra=fn, operation_id="fn_post")
    app.add_api_route("/undecided", ok, methods=["GET"])


def test_metrics_playground_function_and_undecided_routes(tmp_path, caplog):
    app = _app(tmp_path)
    _add_test_routes(app)
    c = TestClient(app)
    full, ro = {"Authorization": "Bearer full-k"}, {"api-key": "ro-k"}
    assert c.get("/metrics").status_code == 200  # open by default
    err = c.get("/")
    assert err.status_code == 401 and "public_playground" in err.json()["error"]["message"]
    assert c.get("/", headers=ro).status_code == 200
    assert c.get("/fn/todo", headers=ro).status_code == 200  # a function's GET reads
    assert c.post("/fn/todo", headers=ro).status_code == 403  # its POST may write its KV stores
    assert c.post("/fn/todo", headers=full).status_code == 200
    with caplog.at_level(logging.WARNING, logger="tallow.serve"):
        assert c.get("/undecided", headers=ro).status_code == 403  # no decision: a full key
        assert c.get("/undecided", headers=full).status_code == 200
    assert "GET /undecided has no access decision" in caplog.text

    app = _app(tmp_path / "b", **{"server.public_metrics": False, "server.public_playground": True})
    _add_test_routes(app)
    c = TestClient(app)
    assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=ro).status_code == 200
    assert c.get("/").status_code == 200


def test_no_key_configured_leaves_every_route_open(tmp_path):
    app = create_app(config=load_config(**{"data.dir": str(tmp_path), "data.demo_corpus": False,
                                           "models.generator": ""}))
    c = TestClient(app)
    assert c.get("/v1/models").status_code == 200
    assert c.delete("/v1/documents/x", headers={"Authorization": "Bearer anything"}).status_code != 401


# -- configuration and protected mode -------------------------------------------------------------

def test_key_settings_are_checked_without_showing_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"server.read_only_api_keys\[0\]") as e:
        load_config(**{"server.read_only_api_keys": ["has space-s3cr3t"]})
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(ConfigError, match="both") as e:
        load_config(**{"server.api_key": "same-s3cr3t", "server.read_only_api_keys": ["same-s3cr3t"]})
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(**{"server.api_keys": 12345})
    assert "12345" not in str(e.value)
    cfg = load_config(**{"server.api_keys": ["k1-s3cr3t", "k2-s3cr3t"], "server.read_only_api_keys": "r1,r2"})
    assert cfg.server.read_only_api_keys == ["r1", "r2"] and "s3cr3t" not in repr(cfg)
    toml = tmp_path / "t.toml"
    toml.write_text('[server]\napi_keys = ["a-key", "b-key"]\nread_only_api_keys = ["c-key"]\n'
                    'key_rps = 2.5\nkey_max_concurrent = 3\npublic_metrics = false\n')
    cfg = load_config(toml)
    assert cfg.server.full_keys() == ["a-key", "b-key"] and cfg.server.key_max_concurrent == 3
    with pytest.raises(ConfigError, match="server.key_rps"):
        load_config(**{"server.key_rps": -1.0})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.example"])
def test_protected_mode_refuses_a_public_bind_without_a_key(host):
    with pytest.raises(ConfigError, match="--insecure-no-auth") as e:
        load_config(**{"server.host": host})
    assert "--api-key" in str(e.value) and "TALLOW_API_KEY" in str(e.value)
    load_config(**{"server.host": host, "server.api_key": "k"})
    load_config(**{"server.host": host, "server.read_only_api_keys": ["r"]})
    load_config(**{"server.host": host, "server.insecure_no_auth": True})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "[::1]"])
def test_loopback_needs_no_key(host):
    load_config(**{"server.host": host})


def test_cli_protected_mode_and_key_flags(monkeypatch, capsys, tmp_path):
    import tallow.serve
    from tallow import cli

    started = []
    monkeypatch.setattr(tallow.serve, "serve", lambda config, **kw: started.append(config))
    monkeypatch.delenv("TALLOW_API_KEY", raising=False)
    monkeypatch.delenv("TALLOW_READ_ONLY_API_KEYS", raising=False)
    base = ["serve", "--no-config", "--data-dir", str(tmp_path), "--no-demo", "--port", "9"]
    assert cli.main(base + ["--host", "0.0.0.0"]) == 2 and not started
    err = capsys.readouterr().err
    assert "refusing to listen on '0.0.0.0'" in err and "--insecure-no-auth" in err and "--api-key" in err
    assert cli.main(base + ["--host", "0.0.0.0", "--insecure-no-auth"]) == 0
    assert started[-1].server.insecure_no_auth is True and not started[-1].server.any_key()
    assert cli.main(base + ["--host", "0.0.0.0", "--api-key", "cli-key", "--read-only-api-keys", "r1,r2"]) == 0
    assert started[-1].server.full_keys() == ["cli-key"] and started[-1].server.read_only_api_keys == ["r1", "r2"]
    monkeypatch.setenv("TALLOW_API_KEY", "env-key")
    monkeypatch.setenv("TALLOW_READ_ONLY_API_KEYS", "e1, e2")
    assert cli.main(base + ["--host", "0.0.0.0"]) == 0
    assert started[-1].server.full_keys() == ["env-key"] and started[-1].server.read_only_api_keys == ["e1", "e2"]


# -- per-key limits and logs (a server of its own) -----------------------------------------------

GREEDY, PATIENT, LOGGED, LOGGED_RO = "greedy-key-aaaa", "patient-key-bbbb", "logged-key-cccc", "logged-ro-dddd"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """Per-key limits (0.2 requests/s with a burst of 3, one request in flight), the access log on
    and every log line of uvicorn and tallow collected."""
    handler = _Collect()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error", "tallow")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    cfg = make_config(tmp_path_factory.mktemp("limits"), **{
        "data.demo_corpus": False, "server.api_keys": [GREEDY, PATIENT, LOGGED],
        "server.read_only_api_keys": [LOGGED_RO], "server.key_rps": 0.2, "server.key_burst": 3,
        "server.key_max_concurrent": 1})
    server = ServerThread(cfg, log_level="debug", access_log=True, log_config=None).start()
    server.log = handler
    yield server
    server.stop()
    for lg, level in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)


def _hold_a_request(server, key: str) -> socket.socket:
    """A request of ``key`` that stays in flight: headers sent, the body not yet."""
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(f"POST /v1/search HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
              "content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"query\"".encode())
    return s


def test_per_key_limits_refuse_the_greedy_key_and_serve_the_others(limited_server):
    url = limited_server.url + "/v1/models"
    greedy, patient = {"Authorization": f"Bearer {GREEDY}"}, {"x-api-key": PATIENT}
    held = _hold_a_request(limited_server, GREEDY)
    try:
        deadline = time.monotonic() + 10
        while (r := httpx.get(url, headers=greedy, timeout=30)).status_code != 429:
            assert time.monotonic() < deadline, r.text  # the held request is admitted
            time.sleep(0.05)
        assert "key_max_concurrent" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
        assert httpx.get(url, headers=patient, timeout=30).status_code == 200  # another key is served
    finally:
        held.close()
    # the held connection's close frees its slot; then the burst of 3 (one taken by the held request)
    # runs out, and the greedy key waits for a token: 429 with Retry-After
    deadline = time.monotonic() + 10
    while "key_max_concurrent" in (r := httpx.get(url, headers=greedy, timeout=30)).text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(4):
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        r = httpx.get(url, headers=greedy, timeout=30)
    assert r.status_code == 429 and "key_rps" in r.json()["error"]["message"], r.text
    assert 1 <= int(r.headers["retry-after"]) <= 5
    assert httpx.get(url, headers=patient, timeout=30).status_code == 200
    text = httpx.get(limited_server.url + "/metrics", timeout=30).text
    assert 'route="/v1/models",status="429"' in text


def test_keys_never_appear_in_logs_or_answers(limited_server):
    base = limited_server.url
    wrong = "wrong-key-eeee"
    with httpx.Client(base_url=base, timeout=60) as c:
        for headers in ({"Authorization": f"Bearer {LOGGED}"}, {"api-key": LOGGED_RO}, {"x-api-key": wrong},
                        {"Authorization": f"Bearer {wrong}"}):
            for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/search", {"query": "x"}),
                                       ("POST", "/v1/documents", {"documents": [{"id": "d", "text": "t"}]}),
                                       ("POST", "/v1/embeddings", b"{not json"),
                                       ("DELETE", "/v1/documents/none", None), ("GET", "/nowhere", None)):
                kw = {"content": body, "headers": {**headers, "content-type": "application/json"}} \
                    if isinstance(body, bytes) else {"json": body, "headers": headers}
                r = c.request(method, path, **kw)
                for key in (LOGGED, LOGGED_RO, wrong):
                    assert key not in r.text and key not in str(r.headers)
    # uvicorn writes an access line once its response is sent: wait for the last request's
    deadline = time.monotonic() + 30  # a guard against a hang, not a speed bound
    while sum("/nowhere" in line for line in limited_server.log.lines if line.startswith("uvicorn.access")) < 4:
        assert time.monotonic() < deadline, "the access log never showed the last requests"
        time.sleep(0.02)
    logged = "\n".join(limited_server.log.lines)
    assert "uvicorn.access" in logged and "/v1/search" in logged  # the access log was captured
    for key in (LOGGED, LOGGED_RO, wrong, GREEDY, PATIENT):
        assert key not in logged
