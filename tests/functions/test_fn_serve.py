"""Functions mounted in tallow serve: real uvicorn, real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from fn_helpers import EXAMPLES, GUESTS

TOML = """
[kv]
stores = ["default"]
max_keys = 64

[[functions]]
name = "hello"
route = "/hello/..."
methods = ["GET", "PUT"]
module = "{g}/hello.wat"

[[functions]]
name = "echo"
route = "/echo"
methods = ["POST"]
module = "{g}/echo.wat"
limits = {{ max_body_bytes = 1000 }}

[[functions]]
name = "trap"
route = "/trap"
module = "{g}/trap.wat"

[[functions]]
name = "loop"
route = "/loop"
module = "{g}/loop.wat"
limits = {{ deadline_ms = 300 }}

[[functions]]
name = "wait"
route = "/wait"
module = "{g}/wait.wat"
kv_stores = ["default"]
limits = {{ deadline_ms = 120000, fuel = 1000000000000000 }}

[[functions]]
name = "kv"
route = "/kv"
methods = ["POST"]
module = "{g}/kv.wat"
kv_stores = ["default"]

[[functions]]
name = "bomb"
route = "/bomb"
module = "{g}/bomb.wat"
limits = {{ memory_mib = 16 }}

[[functions]]
name = "todo"
route = "/todos/..."
methods = ["GET", "POST", "PUT", "DELETE"]
module = "{e}/todo/todo.wasm"

[[functions]]
name = "image"
route = "/image-info"
methods = ["POST"]
module = "{e}/image/image.wasm"
host_functions = ["preprocess_image", "embed_text"]
limits = {{ deadline_ms = 30000 }}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tallow.serve import create_app, load_config

    d = tmp_path_factory.mktemp("fn-serve")
    (d / "tallow.toml").write_text(TOML.format(g=GUESTS, e=EXAMPLES))
    cfg = load_config(d / "tallow.toml", **{"data.dir": str(d / "data"), "data.demo_corpus": False,
                                             "models.warmup": False, "models.generator": ""})
    app = create_app(config=cfg)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        client.data_dir = d / "data"
        yield client
    srv.should_exit = True
    thread.join(timeout=30)


def test_function_route_answers(server):
    r = server.get("/hello/a/b?x=1")
    assert r.status_code == 200 and r.text == "hello /hello/a/b" and r.headers["x-method"] == "GET"
    assert r.headers["content-type"] == "text/plain"
    assert server.put("/hello").text == "hello /hello"
    assert server.post("/hello").status_code == 405


def test_listed_and_in_openapi(server):
    listed = server.get("/v1/functions").json()
    assert listed["abi"] == "tallow:v1"
    names = {f["name"]: f for f in listed["data"]}
    assert set(names) == {"hello", "echo", "trap", "loop", "wait", "kv", "bomb", "todo", "image"}
    assert names["loop"]["limits"]["deadline_ms"] == 300 and names["todo"]["kv_stores"] == ["default"]
    assert len(names["hello"]["sha256"]) == 64
    paths = server.get("/openapi.json").json()["paths"]
    assert "functions" in paths["/hello"]["get"]["tags"] and "/hello/{path}" in paths
    assert "post" in paths["/todos"] and "delete" in paths["/todos/{path}"]
    assert "/v1/functions" in paths


def test_trap_is_a_500_json_error_naming_the_function(server):
    r = server.get("/trap")
    assert r.status_code == 500
    err = r.json()["error"]
    assert "'trap'" in err["message"] and err["type"] == "server_error" and err["code"] == 500
    assert server.get("/health").status_code == 200


def test_deadline_is_504(server):
    r = server.get("/loop")
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "timeout_error"
    assert server.get("/hello").status_code == 200


def _kv_set(server, key: bytes, value: bytes) -> None:
    body = b"s" + bytes([7]) + b"default" + len(key).to_bytes(2, "little") + key + value
    r = server.post("/kv", content=body)
    assert r.status_code == 200 and int.from_bytes(r.content[:4], "little", signed=True) == 0


def test_other_routes_serve_while_a_guest_spins(server):
    """A guest spinning on a worker thread does not hold the server: /health and
    another function answer while it runs. Decided by events: the guest spins
    until the test sets a key, so it is certainly running while they answer."""
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", server.get("/wait")))
    t.start()
    calls = lambda: {f["name"]: f["calls"] for f in server.get("/v1/functions").json()["data"]}["wait"]  # noqa: E731
    deadline = time.monotonic() + 60  # a guard against a hang, not a speed bound
    while calls() == 0:  # the guest has started
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.01)
    for _ in range(3):
        assert server.get("/health").status_code == 200
        assert server.get("/hello").status_code == 200
    assert t.is_alive()  # still spinning: nothing above waited for it
    _kv_set(server, b"go", b"1")
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].content == b"released"


def test_memory_bomb_is_500(server):
    r = server.get("/bomb")
    assert r.status_code == 500 and "'bomb'" in r.json()["error"]["message"]


def test_body_limit_and_echo(server):
    assert server.post("/echo?q=1", content=b"x" * 1000).content == b"x" * 1000
    r = server.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and "'echo'" in r.json()["error"]["message"]


def test_todo_example(server):
    r = server.post("/todos", json={"title": "buy \"milk\""})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["title"] == 'buy "milk"' and first["done"] is False
    assert r.headers["location"] == f"/todos/{first['id']}"
    second = server.post("/todos", json={"title": "walk", "done": True}).json()
    assert second["id"] == first["id"] + 1
    assert server.get("/todos").json() == [first, second]
    assert server.put(f"/todos/{first['id']}", json={"done": True}).json()["done"] is True
    assert server.get(f"/todos/{first['id']}").json()["done"] is True
    assert server.delete(f"/todos/{second['id']}").status_code == 204
    assert server.get(f"/todos/{second['id']}").status_code == 404
    assert server.post("/todos", content=b"not json").status_code == 422
    assert [t["id"] for t in server.get("/todos").json()] == [first["id"]]
    # durable: in the metadata store's kv table
    from tallow.store import MetadataStore

    with MetadataStore(server.data_dir / "tallow.db") as store:
        assert store.kv_get("default", f"todo:{first['id']}".encode()) is not None


def test_image_example_preprocess_and_embed(server):
    import io
    import json

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(buf, format="PNG")
    deadline = time.monotonic() + 240
    while server.get("/ready").status_code != 200:  # the embedder loads in the background
        assert time.monotonic() < deadline, server.get("/ready").json()
        time.sleep(0.5)
    r = server.post("/image-info?text=a%20red%20square", content=buf.getvalue())
    assert r.status_code == 200, r.text
    out = json.loads(r.text)
    assert out["tensor"] == [3, 224, 224] and out["text"] == "a red square" and out["embedding_dim"] == 384
    # pure red, ImageNet-normalised: (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225
    assert out["channel_mean"] == pytest.approx([2.2489, -2.0357, -1.8044], abs=1e-3)
    vec = server.post("/v1/embeddings", json={"input": "a red square"}).json()["data"][0]["embedding"]
    assert out["embedding_head"] == pytest.approx(vec[:4], abs=1e-4)
    bad = server.post("/image-info", content=b"not an image")
    assert bad.status_code == 422
