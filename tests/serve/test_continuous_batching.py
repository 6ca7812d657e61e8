"""Completions over continuous batching, through HTTP: a seeded request's
text does not depend on what runs beside it, a request that arrives while
a long one runs is answered before that one ends, each row keeps its own
settings, and a request the KV pool can never hold is refused, not run."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server_helpers import ServerThread, make_config


@pytest.fixture(scope="module")
def gen_server(tmp_path_factory, gpt2_long_dir):
    cfg = make_config(tmp_path_factory.mktemp("cb-data"), **{
        "models.generator": str(gpt2_long_dir), "data.demo_corpus": False, "workers.mode": "inline",
        "models.max_completion_tokens": 600})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


SEEDED = {"prompt": "The lighthouse keeper", "max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "seed": 1234}
NEIGHBOURS = [
    {"prompt": "a", "max_tokens": 40, "temperature": 0.0},
    {"prompt": "Once upon a time in a land far away there lived", "max_tokens": 8, "temperature": 1.3, "top_k": 5},
    {"prompt": "x y z", "max_tokens": 30, "temperature": 0.7, "repetition_penalty": 1.3, "n": 2},
    {"prompt": "Numbers: 1 2 3", "max_tokens": 12, "temperature": 1.0, "seed": 99, "stop": ["e"]},
    {"prompt": ["two", "prompts here"], "max_tokens": 16, "temperature": 0.5},
]


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_mixed_batch(gen_server):
    with gen_server.client() as c:
        alone = c.post("/v1/completions", json=SEEDED).json()["choices"][0]["text"]

    async def mixed():
        async with httpx.AsyncClient(base_url=gen_server.url, timeout=120) as c:
            others = [asyncio.create_task(c.post("/v1/completions", json=body)) for body in NEIGHBOURS]
            await asyncio.sleep(0.05)  # they are running: the seeded request joins mid-batch
            seeded = await c.post("/v1/completions", json=SEEDED)
            streamed = await c.post("/v1/completions", json={**SEEDED, "stream": True})
            return seeded, streamed, await asyncio.gather(*others)

    seeded, streamed, others = asyncio.run(mixed())
    assert all(r.status_code == 200 for r in others), [r.text for r in others]
    assert seeded.json()["choices"][0]["text"] == alone
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == alone


def test_a_short_request_is_answered_while_a_long_one_still_runs(gen_server, generation_gate):
    """Decided by steps: the gate holds the long request after its first token
    until the short one is submitted (it joins at the next step), and holds
    the loop again once the short one has ended, until its client has the
    answer; whatever this CPU's speed, the long one cannot end first unless
    the short one waited for it."""

    def hold(g):
        if not g.submitted:
            return False
        long_id = g.submitted[0]
        if g.tokens.get(long_id) and len(g.queued) < 2:  # until the short one is in the loop's inbox
            return True
        return len(g.submitted) > 1 and g.submitted[1] in g.ended_at and not g.released

    gate = generation_gate(hold)
    long_body = {"prompt": "Tell me everything", "max_tokens": 500, "temperature": 0.0, "stream": True}

    async def run():
        async with httpx.AsyncClient(base_url=gen_server.url, timeout=120) as c:
            long_chunks: list[str] = []

            async def long():
                async with c.stream("POST", "/v1/completions", json=long_body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            long_chunks.append(line)

            task = asyncio.create_task(long())
            # the long request is decoding (and held there until the short one is submitted)
            assert await asyncio.to_thread(gate.wait_for, lambda g: g.submitted and g.tokens.get(g.submitted[0]))
            short = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0.0})
            chunks_when_short_answered = len(long_chunks)
            gate.release()
            await asyncio.wait_for(task, 120)
            return short, chunks_when_short_answered, len(long_chunks)

    short, chunks_then, chunks_total = asyncio.run(run())
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    long_id, short_id = gate.submitted
    # The short request joined the running batch and ended while the long one still
    # decoded: it did not wait for the batch to finish.
    assert gate.ended_at[short_id] < gate.ended_at[long_id]
    long_tokens_then = sum(step.get(long_id, 0) for step in gate.history[:gate.ended_at[short_id] + 1])
    assert long_tokens_then < gate.tokens[long_id]
    assert sum(1 for step in gate.history if long_id in step and short_id in step) >= 2  # side by side
    assert chunks_then < chunks_total, "the long stream had ended before the short request was answered"


def test_choices_of_a_seeded_request_differ_and_repeat(gen_server):
    body = {"prompt": "Roses are", "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 3}
    with gen_server.client() as c:
        a = [ch["text"] for ch in c.post("/v1/completions", json=body).json()["choices"]]
        b = [ch["text"] for ch in c.post("/v1/completions", json=body).json()["choices"]]
    assert a == b
    assert len(set(a)) > 1  # each row draws from its own generator


def test_max_tokens_zero_answers_at_once(gen_server):
    with gen_server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "anything", "max_tokens": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "" and r.json()["usage"]["completion_tokens"] == 0


def test_a_request_the_kv_pool_can_never_hold_is_refused(tmp_path, gpt2_long_dir):
    cfg = make_config(tmp_path, **{"models.generator": str(gpt2_long_dir), "data.demo_corpus": False,
                                   "workers.mode": "inline", "generation.kv_cache_mb": 1,
                                   "models.max_completion_tokens": 1000})
    server = ServerThread(cfg).start()
    try:
        with server.client() as c:
            ok = c.post("/v1/completions", json={"prompt": "small", "max_tokens": 8})
            huge = c.post("/v1/completions", json={"prompt": "big " * 50, "max_tokens": 800, "n": 8})
            after = c.post("/v1/completions", json={"prompt": "small", "max_tokens": 8})
    finally:
        server.stop()
    assert ok.status_code == 200, ok.text
    assert huge.status_code == 422, huge.text
    assert "kv" in huge.json()["error"]["message"].lower()
    assert after.status_code == 200
