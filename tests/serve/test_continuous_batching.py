"""Completions over continuous batching, through HTTP: a seeded request's
text does not depend on what runs beside it, a request that arrives while
a long one runs is answered before that one ends, each row keeps its own
settings, and a request the KV pool can never hold is refused, not run."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from server_helpers import ServerThread, make_config
from tallow.models.scheduler import GenerationLoop, GenerationScheduler


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


class StepGate:
    """Holds the server's generation loop (inline mode: it runs in this
    process) at two points the test controls, so the test decides by steps
    and events, not by how fast this CPU decodes:

    1. once the first request (the long one) has a token, the loop waits
       until a second request has been submitted (it then joins at the next
       step, as continuous batching promises);
    2. once that second request's rows have all finished, the loop waits
       until the test says its client has the answer.

    It records, per step, which requests produced tokens and which ended."""

    HOLD_S = 60.0  # a guard against a hung test, never reached when the server works

    def __init__(self):
        self.submitted: list = []
        self.first_has_token = threading.Event()
        self.second_submitted = threading.Event()
        self.release_after_second = threading.Event()
        self.tokens: dict = {}      # request id -> tokens produced so far
        self.ended_at: dict = {}    # request id -> step index of its last row's end
        self.first_tokens_at_end: dict = {}  # request id -> the first request's tokens at that step
        self.second_tokens_with_first: int = 0  # steps where both produced a token
        self.steps = 0
        self._rows_left: dict = {}

    def install(self, monkeypatch):
        gate = self
        submit, step = GenerationLoop.submit, GenerationScheduler.step

        def gated_submit(loop, request, prompt_ids, params):
            gate._rows_left[request] = len(prompt_ids)
            gate.submitted.append(request)  # before the loop can step it
            try:
                submit(loop, request, prompt_ids, params)
            except BaseException:
                gate.submitted.remove(request)
                raise
            if len(gate.submitted) == 2:
                gate.second_submitted.set()

        def gated_step(sched):
            first = gate.submitted[0] if gate.submitted else None
            second = gate.submitted[1] if len(gate.submitted) > 1 else None
            if gate.tokens.get(first) and second is None:
                gate.second_submitted.wait(gate.HOLD_S)
            if second is not None and second in gate.ended_at:
                gate.release_after_second.wait(gate.HOLD_S)
            events = step(sched)
            produced = set()
            for e in events:
                if e.token_id >= 0:
                    gate.tokens[e.request] = gate.tokens.get(e.request, 0) + 1
                    produced.add(e.request)
                if e.finish_reason is not None and e.request in gate._rows_left:
                    gate._rows_left[e.request] -= 1
                    if gate._rows_left[e.request] == 0:
                        gate.ended_at[e.request] = gate.steps
                        gate.first_tokens_at_end[e.request] = gate.tokens.get(first, 0)
            if first is not None and gate.tokens.get(first):
                gate.first_has_token.set()
            if first in produced and gate.submitted[1:2] and gate.submitted[1] in produced:
                gate.second_tokens_with_first += 1
            gate.steps += 1
            return events

        monkeypatch.setattr(GenerationLoop, "submit", gated_submit)
        monkeypatch.setattr(GenerationScheduler, "step", gated_step)
        return self


def test_a_short_request_is_answered_while_a_long_one_still_runs(gen_server, monkeypatch):
    gate = StepGate().install(monkeypatch)
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
            assert await asyncio.to_thread(gate.first_has_token.wait, gate.HOLD_S)
            short = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0.0})
            chunks_when_short_answered = len(long_chunks)
            gate.release_after_second.set()
            await asyncio.wait_for(task, 120)
            return short, chunks_when_short_answered, len(long_chunks)

    short, chunks_then, chunks_total = asyncio.run(run())
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    long_id, short_id = gate.submitted
    # The short request joined the running batch and ended while the long one still
    # decoded: it did not wait for the batch to finish.
    assert gate.ended_at[short_id] < gate.ended_at[long_id]
    assert gate.first_tokens_at_end[short_id] < gate.tokens[long_id]
    assert gate.second_tokens_with_first >= 2  # decoded side by side
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
