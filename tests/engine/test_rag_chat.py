"""Generative RAG with an instruct model: the retrieved sources go into a
system message, the question into the user's, rendered with the model's own
chat template, and the reply ends at the template's end of turn.

The model is a random GPT-2 rigged as tests/serve/test_chat.py rigs one
(server_helpers.rigged_chat_gpt2):
its blocks add nothing and its positions are zero, so the next token
depends on the current one only, and its LM head makes the greedy
successor of the generation prompt's last token the chain ANSWER[0] ->
ANSWER[1] -> ANSWER[2] -> <|im_end|>. The chain's words are words of the
one indexed document, so the answer holds content of its source; its
config's eos is another token (0), so only the end of turn can stop it.
SmolLM2 itself answers from a source in the slow test at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tallow.engine.chat import render_chat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from server_helpers import CHATML, ServerThread, make_config, rigged_chat_gpt2  # noqa: E402

ANSWER = (" file", " data", " bytes")
DOC = {"id": "files", "title": "Reading files",
       "text": "The open function returns a file object. Read the file data as bytes with its read method."}
QUESTION = "How do I read a file?"


@pytest.fixture(scope="module")
def chat_gpt2_dir(tmp_path_factory):
    return rigged_chat_gpt2(tmp_path_factory.mktemp("gpt2-rag-chat"), ANSWER)


def _system(sources: list[str]) -> str:
    from tallow.engine.rag import CHAT_SYSTEM

    return CHAT_SYSTEM + "".join(f"[{i + 1}] {s}\n" for i, s in enumerate(sources)).rstrip("\n")


def test_rag_with_a_chat_model_answers_from_the_sources_in_its_template(engine_factory, chat_gpt2_dir):
    eng = engine_factory(generator_path=chat_gpt2_dir)
    eng.ingest([DOC], progress=False)
    ans = eng.rag(QUESTION, k=2, max_new_tokens=40)
    assert ans.mode == "generative"
    assert ans.answer == "".join(ANSWER).strip()  # words of the source ...
    assert all(w.strip() in DOC["text"] for w in ANSWER)
    assert ans.finish_reason == "stop"  # ... ended at <|im_end|> (not the eos, not max_new_tokens)
    texts = [s["text"] for s in ans.sources]
    assert texts and all(t in DOC["text"] for t in texts)
    # the sources numbered in a system message, the question as the user's, in the model's template
    expected = render_chat(CHATML, [{"role": "system", "content": _system(texts)},
                                    {"role": "user", "content": QUESTION}])
    assert ans.prompt == expected
    assert ans.prompt_tokens == len(eng.generator.tokenizer.encode_ids([expected])[0])


def test_rag_chat_prompt_drops_sources_that_do_not_fit_the_context(engine_factory, chat_gpt2_dir, docs):
    """The sources fill what the context leaves after the template, the
    question and max_new_tokens: the first that does not fit is trimmed, the
    rest dropped, and the prompt plus the answer fit."""
    eng = engine_factory(generator_path=chat_gpt2_dir)
    eng.ingest(docs, progress=False)
    ans = eng.rag("What does the function return?", k=8, max_new_tokens=100)
    n_ctx = eng.generator.config.n_positions
    assert ans.prompt_tokens + 100 <= n_ctx
    assert ans.sources and ans.sources[-1]["trimmed"] and len(ans.sources) < 8
    assert ans.finish_reason == "stop"


def test_rag_through_the_server_stops_at_end_of_turn(tmp_path, chat_gpt2_dir):
    """/v1/rag on a server whose generator has a chat template: the served
    model's scheduler (generate_blocking, token ids in) ends the reply at
    <|im_end|>, in process mode (the template comes from the worker)."""
    cfg = make_config(tmp_path / "data", **{"models.generator": str(chat_gpt2_dir), "data.demo_corpus": False,
                                            "models.classifier": "", "workers.mode": "process"})
    server = ServerThread(cfg).start()
    try:
        with server.client() as c:
            assert c.post("/v1/documents", json={"documents": [DOC]}).status_code == 200
            r = c.post("/v1/rag", json={"question": QUESTION, "k": 2, "max_tokens": 40, "include_prompt": True})
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["mode"], body["answer"], body["finish_reason"]) == ("generative", "".join(ANSWER).strip(), "stop")
    assert body["prompt"].startswith("<|im_start|>system\n") and QUESTION in body["prompt"]


@pytest.mark.slow
def test_smollm2_answers_from_a_retrieved_source(engine_factory):
    """The default generator, greedy, on a made-up fact only the source holds."""
    pytest.importorskip("gguf")
    from tallow.models import CheckpointError, smollm2_path

    try:
        smollm2_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    eng = engine_factory(generator_path="tallow:smollm2-135m-instruct")
    eng.ingest([{"id": "zorblax", "title": "Zorblax",
                 "text": "The Zorblax server listens on port 7421. It was written by Mira Okafor in 2019."},
                {"id": "other", "title": "Weather", "text": "It rained in Lisbon on Tuesday."}], progress=False)
    ans = eng.rag("Which port does the Zorblax server listen on?", k=2, max_new_tokens=48)
    assert "7421" in ans.answer, ans.answer
    assert ans.finish_reason in ("eos", "stop")
