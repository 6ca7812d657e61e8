"""The playground page at / (issue 14, part 3) in a real browser: Playwright
for Python driving Debian's chromium (never a browser Playwright downloads),
every panel exercised against live servers — the session's server with every
model (an API key on writes, so the page must ask for it), and one with only
the embedder, whose panels must show the server's 503 messages. Screenshots
go to test-artifacts/playground/ (gitignored) for a human to look at."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from server_helpers import API_KEY, ServerThread, make_config

CHROMIUM = os.environ.get("TALLOW_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


def _chromium_or_fail() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    could_install = shutil.which("apt-get") is not None and (os.geteuid() == 0 or (
        shutil.which("sudo") is not None
        and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0))
    if could_install:  # a missing browser is a set-up error here, not a reason to skip
        pytest.fail(f"no chromium at {CHROMIUM}: run `make tools` (make test does), which installs the Debian "
                    "package chromium with apt-get")
    pytest.skip(f"no chromium at {CHROMIUM} and no apt-get with root rights to install it "
                "(apt-get install chromium, or TALLOW_CHROMIUM=/path/to/chromium)")


@pytest.fixture(scope="module")
def browser():
    path = _chromium_or_fail()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    yield pg
    context.close()


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_panel_against_a_server_with_every_model(full_server, page, tmp_path):
    requests: list[tuple[str, str | None]] = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    page.goto(full_server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    assert page.title() == "tallow playground"

    # search: a category filter and the hybrid switch. Every API route needs the
    # key (issue 17): the first call is answered 401, the page asks for the key,
    # then retries with it.
    page.fill("#search-query", "compress data with zlib")
    page.fill("#search-k", "4")
    page.fill("#search-category", "module")
    page.check("#search-hybrid")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#key-dialog[open]")
    assert "401" in page.text_content("#key-reason")
    page.screenshot(path=str(ARTIFACTS / "api-key-dialog.png"))
    page.fill("#key-input", API_KEY)
    page.click("#key-ok")
    page.wait_for_selector("#search-results li")
    assert page.text_content("#key-state") == "API key set"
    assert page.locator("#search-results li").count() == 4
    assert "(hybrid)" in page.text_content("#search-meta")

    # RAG: an answer with its sources
    page.fill("#rag-question", "How do I read CSV files?")
    page.fill("#rag-max-tokens", "8")
    page.click("#rag-form button[type=submit]")
    page.wait_for_selector("#rag-sources li")
    assert page.locator("#rag-sources li").count() >= 1  # as many as fit GPT-2's context
    assert page.text_content("#rag-answer") is not None

    # classify: one row per line, with the checkpoint's labels
    page.click("#classify-form button[type=submit]")
    page.wait_for_selector("#classify-results tr.row")
    labels = page.locator("#classify-results td.label").all_text_contents()
    assert len(labels) == 2 and set(labels) <= {"negative", "neutral", "positive"}

    # streaming generation (SSE from /v1/completions)
    page.fill("#generate-max-tokens", "12")
    page.fill("#generate-seed", "1")
    page.click("#generate-form button[type=submit]")
    page.wait_for_selector("#generate-output[data-done='1']")
    assert "first token after" in page.text_content("#generate-meta")
    assert "12 tokens" in page.text_content("#generate-meta")
    assert page.text_content("#generate-output")

    # embedding similarity: a 3 x 3 cosine matrix with ones on the diagonal
    page.click("#embeddings-form button[type=submit]")
    page.wait_for_selector("#embeddings-matrix td.sim")
    sims = page.locator("#embeddings-matrix td.sim").all_text_contents()
    assert len(sims) == 9 and sims[0] == sims[4] == sims[8] == "1.000"

    # images: storing one (a write: the full key given above)
    img = tmp_path / "query.png"
    img.write_bytes(_png(1))
    page.set_input_files("#images-file", str(img))
    page.fill("#images-id", "playground-1")
    page.click("#images-add")
    page.wait_for_function("document.getElementById('images-meta').textContent.startsWith('stored playground-1')")
    # ... and similar images, with scores and the timing breakdown
    page.click("#images-form button[type=submit]")
    page.wait_for_selector("#images-results li")
    assert "playground-1" in page.text_content("#images-results li:first-child")
    stages = page.locator("#images-timing th").all_text_contents()
    assert {"preprocess", "inference", "search", "metadata"} <= set(stages)

    # live metrics: the requests above, counted by route
    page.wait_for_function("document.querySelectorAll('#metrics-table tr.row').length > 3")
    page.wait_for_function("document.getElementById('metrics-table').textContent.includes('/v1/images/search')",
                           timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "all-panels.png"), full_page=True)
    for panel in ("search", "rag", "classify", "generate", "embeddings", "images", "metrics"):
        page.locator(f"#panel-{panel}").screenshot(path=str(ARTIFACTS / f"panel-{panel}.png"))

    # once given, the key goes with every request
    first = next(i for i, (url, auth) in enumerate(requests) if url.endswith("/v1/search") and auth)
    after_key = [(url, auth) for url, auth in requests[first:] if url.startswith(full_server.url)]
    assert len(after_key) >= 3 and all(auth == f"Bearer {API_KEY}" for _, auth in after_key), after_key
    assert not page.errors, page.errors


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    """Only the default embedder: the classifier, generator and image panels answer 503
    (RAG answers extractively, from the closest sentences, without a generator)."""
    server = ServerThread(make_config(tmp_path_factory.mktemp("bare"), **{"data.demo_corpus": False,
                                                                         "models.classifier": ""})).start()
    yield server
    server.stop()


def test_panels_without_their_model_show_the_servers_503(bare_server, page):
    page.goto(bare_server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    expected = {"classify": "models.classifier", "generate": "models.generator"}
    page.fill("#rag-question", "anything")
    page.set_input_files("#images-file", files=[{"name": "q.png", "mimeType": "image/png", "buffer": _png(2)}])
    for panel in ("classify", "generate", "rag", "images"):
        page.click(f"#{panel}-form button[type=submit]")
    for panel, setting in {**expected, "images": "models.image"}.items():
        error = page.locator(f"#panel-{panel} .error")
        error.wait_for(state="visible")
        text = error.text_content()
        assert text.startswith("503: ") and setting in text, (panel, text)
        model = {"classify": "classifier", "generate": "generator", "images": "image"}[panel]
        assert page.text_content(f"#panel-{panel} .note").startswith(f"no {model} model is configured")
        # the message is the server's own
        assert text[5:] in _server_message(bare_server.url, panel)
    # RAG without a generator answers extractively (no documents here: an empty answer, no error)
    page.wait_for_function("document.getElementById('rag-answer').textContent.startsWith('(extractive')")
    assert not page.locator("#panel-rag .error").is_visible()
    # the embedder's panels still work
    page.click("#embeddings-form button[type=submit]")
    page.wait_for_selector("#embeddings-matrix td.sim")
    page.screenshot(path=str(ARTIFACTS / "models-not-configured.png"), full_page=True)
    assert not page.errors, page.errors


def _server_message(url: str, panel: str) -> str:
    route, body = {"classify": ("/v1/classify", {"input": "x"}), "generate": ("/v1/completions", {"prompt": "x"}),
                   "images": ("/v1/images/search", None)}[panel]
    if body is None:
        r = httpx.post(url + route, files={"image": ("q.png", _png(2), "image/png")}, timeout=30)
    else:
        r = httpx.post(url + route, json=body, timeout=30)
    assert r.status_code == 503
    return r.json()["error"]["message"]


def test_the_page_is_self_contained(bare_server):
    """Shipped in the package, nothing fetched from elsewhere (no CDN)."""
    import re

    with httpx.Client(base_url=bare_server.url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = c.get(f"/playground/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
            assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", r.text), name
        assert c.get("/playground/../app.py").status_code == 404
        assert c.get("/playground/index.html").status_code == 404
        assert "/" not in {p for p in c.get("/openapi.json").json()["paths"]}  # not part of the API
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(not r.startswith(("http:", "https:", "//")) for r in refs), refs


# -- issue 21, item 7: the docs page offline; the RAG panel, the metrics table and a narrow screen --------

def _offline_context(browser, **options):
    """A browser context that reaches nothing but the loopback server: every
    other request is aborted (and recorded), as on a machine with no network."""
    from urllib.parse import urlsplit

    context = browser.new_context(**options)
    refused: list[str] = []

    def route(r):
        if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort("internetdisconnected")

    context.route("**/*", route)
    context.refused = refused
    return context


def test_api_docs_render_offline(bare_server, browser):
    """/docs draws every operation of the schema with no network: Swagger UI's
    files come from the server, nothing is fetched from a CDN."""
    spec = httpx.get(bare_server.url + "/openapi.json", timeout=30).json()
    operations = sum(1 for item in spec["paths"].values() for m in item if m in ("get", "post", "put", "delete"))
    context = _offline_context(browser, viewport={"width": 1400, "height": 1000})
    try:
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(bare_server.url + "/docs")
        # "never hang" guard: a page whose script never loads has no operations at all
        pg.wait_for_function(f"document.querySelectorAll('#swagger-ui .opblock').length === {operations}",
                             timeout=30_000)
        assert "/v1/search" in pg.text_content("#swagger-ui")
        pg.screenshot(path=str(ARTIFACTS / "docs-offline.png"))
        assert not context.refused, context.refused
        assert not errors, errors
    finally:
        context.close()


def test_rag_panel_answers_extractively_without_a_generator(bare_server, page):
    """Without a generator /v1/rag answers with the closest sentences: the
    panel says so (not "not configured") and shows the answer and its sources."""
    r = httpx.post(bare_server.url + "/v1/documents", timeout=120, json={"documents": [
        {"id": "csv", "title": "csv", "text": "The csv module reads and writes CSV files. Use csv.reader."}]})
    assert r.status_code == 200, r.text
    page.goto(bare_server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    panel = page.locator("#panel-rag")
    assert "absent" not in (panel.get_attribute("class") or "")
    note = page.text_content("#panel-rag .note")
    assert "extractive" in note and "503" not in note, note
    page.fill("#rag-question", "How do I read CSV files?")
    page.click("#rag-form button[type=submit]")
    page.wait_for_selector("#rag-sources li")
    assert page.text_content("#rag-answer").startswith("(extractive")
    assert "csv" in page.text_content("#rag-sources")
    assert not page.locator("#panel-rag .error").is_visible()
    assert not page.errors, page.errors


def test_metrics_table_shows_routes_with_path_parameters(bare_server, page):
    """A route label holding {...} (DELETE /v1/documents/{id}) is a row of its own."""
    assert httpx.delete(bare_server.url + "/v1/documents/no-such-doc", timeout=30).status_code == 404
    page.goto(bare_server.url + "/")
    page.wait_for_function("document.getElementById('metrics-table').textContent.includes('/v1/documents/{id}')",
                           timeout=20_000)
    assert not page.errors, page.errors


def test_page_fits_a_400px_wide_screen(bare_server, browser):
    context = browser.new_context(viewport={"width": 400, "height": 800})
    try:
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(bare_server.url + "/")
        pg.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
        # the tables filled too: the similarity matrix and the metrics
        pg.click("#embeddings-form button[type=submit]")
        pg.wait_for_selector("#embeddings-matrix td.sim")
        pg.wait_for_selector("#metrics-table tr.row")
        pg.screenshot(path=str(ARTIFACTS / "narrow-400px.png"), full_page=True)
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"the page is {width} px wide in a 400 px viewport"
    finally:
        context.close()


# -- the chat panel ------------------------------------------------------------------------------

CHAT_WORDS = (" the", " file", " data")


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A generator with a chat template that answers every turn with CHAT_WORDS (server_helpers.rigged_chat_gpt2)."""
    from server_helpers import rigged_chat_gpt2

    model = rigged_chat_gpt2(tmp_path_factory.mktemp("chat-model"), CHAT_WORDS)
    server = ServerThread(make_config(tmp_path_factory.mktemp("chat-data"), **{
        "data.demo_corpus": False, "models.classifier": "", "models.generator": str(model),
        "workers.mode": "inline"})).start()
    yield server
    server.stop()


def test_chat_panel_streams_replies_and_keeps_the_conversation(chat_server, page):
    import json

    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    page.goto(chat_server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    reply = "".join(CHAT_WORDS)
    page.fill("#chat-system", "Be brief.")
    page.fill("#chat-input", "Hello there")
    page.click("#chat-form button[type=submit]")
    page.wait_for_selector("#chat-log .turn.assistant[data-done='1']")
    page.fill("#chat-input", "And then?")
    page.click("#chat-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll(\"#chat-log .turn.assistant[data-done='1']\").length === 2")
    turns = page.eval_on_selector_all("#chat-log .turn", "ts => ts.map(t => [t.className, t.querySelector('.text').textContent])")
    assert turns == [["turn user", "Hello there"], ["turn assistant", reply],
                     ["turn user", "And then?"], ["turn assistant", reply]]
    # streamed, and the second turn carries the first (the system message first)
    assert [b["stream"] for b in sent] == [True, True]
    assert sent[1]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                                   {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    assert "prompt" in page.text_content("#chat-meta") and "reply tokens" in page.text_content("#chat-meta")
    page.click("#chat-clear")
    assert page.locator("#chat-log .turn").count() == 0
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    assert not page.errors, page.errors


def test_chat_panel_shows_the_servers_503_without_a_generator(bare_server, page):
    page.goto(bare_server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('ready')")
    page.click("#chat-form button[type=submit]")
    error = page.locator("#panel-chat .error")
    error.wait_for(state="visible")
    assert error.text_content().startswith("503: ") and "models.generator" in error.text_content()
    assert page.locator("#chat-log .turn").count() == 0  # the turn that failed is not kept
    assert page.input_value("#chat-input") == "What is the capital of France?"  # its text is back
    assert not page.errors, page.errors
