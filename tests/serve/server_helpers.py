"""Helpers for the server tests: real uvicorn servers on free loopback ports,
run in a background thread of the test process (uvicorn installs no signal
handlers off the main thread), each with its own data directory.

A module of its own, imported by name: every folder's conftest.py is named
``conftest``, so ``from conftest import ...`` finds whichever was loaded first."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from typing import Callable

import httpx
import uvicorn

from tallow.models.scheduler import GenerationLoop, GenerationScheduler
from tallow.serve import create_app, load_config

API_KEY = "test-key-123"
SECOND_KEY = "test-key-second-456"  # another full key (server.api_keys)
READ_ONLY_KEY = "test-read-only-789"  # server.read_only_api_keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``uvicorn`` serving ``create_app(config=...)`` until ``stop()``."""

    def __init__(self, config, engine=None, **uvicorn_options):
        self.port = free_port()
        self.app = create_app(engine=engine, config=config)
        self.services = self.app.state.services
        options = {"log_level": "warning", **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    lifespan="on", **options))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 300.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        while True:
            r = httpx.get(self.url + "/ready", timeout=10)
            if r.status_code == 200:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {ready_timeout} s: {r.json()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)


def make_config(data_dir: Path, **overrides):
    """The embedded defaults with the data in ``data_dir``, but no generator unless
    the test names one (make run's SmolLM2 would load into every test server)."""
    return load_config(**{"data.dir": str(data_dir), "models.generator": "", **overrides})


class GenerationGate:
    """Holds the generation loop of an inline-mode server (``workers.mode =
    "inline"``: the loop runs in this process) at the start of a step for as
    long as ``hold(gate)`` is true, so a test decides by steps and events, not
    by how fast this CPU decodes. It records what each step produced.

    ``hold`` is re-evaluated whenever something changes: a step, a request
    submitted or cancelled, ``release()``, ``close()``. Take one from the
    ``generation_gate`` fixture (tests/serve/conftest.py): its teardown closes
    the gate (a failed test never leaves the shared server's loop held) and
    fails the test if a hold ever ran out of ``HOLD_S`` instead of ending::

        gate = generation_gate(hold=lambda g: not g.released)
    """

    HOLD_S = 60.0  # a guard against a hung test; never reached when the server works

    def __init__(self, monkeypatch, hold: Callable[["GenerationGate"], bool]):
        self.hold = hold
        self.submitted: list = []          # request ids, in submission order (known before the loop sees them)
        self.queued: list = []             # the same, once in the loop's inbox
        self.cancelled: list = []
        self.released = False
        self.closed = False                # the test is over: hold nothing any more
        self.timed_out = False             # a hold ran out of HOLD_S
        self.tokens: dict = {}             # request id -> tokens produced so far
        self.ended_at: dict = {}           # request id -> index of the step its last row ended in
        self.dropped_at: dict = {}         # request id -> index of the first step after the scheduler dropped it
        self.history: list[dict] = []      # per step: request id -> tokens produced in it
        self._rows_left: dict = {}
        self._cond = threading.Condition()
        gate = self
        submit, cancel, step = GenerationLoop.submit, GenerationLoop.cancel, GenerationScheduler.step
        drop = GenerationScheduler.cancel

        def gated_submit(loop, request, prompt_ids, params):
            with gate._cond:
                gate.submitted.append(request)  # before the loop can step it
                gate._rows_left[request] = len(prompt_ids)
            try:
                submit(loop, request, prompt_ids, params)
            except BaseException:
                with gate._cond:
                    gate.submitted.remove(request)
                raise
            with gate._cond:
                gate.queued.append(request)
                gate._cond.notify_all()

        def gated_cancel(loop, request):
            cancel(loop, request)
            with gate._cond:
                gate.cancelled.append(request)
                gate._cond.notify_all()

        def recorded_drop(sched, request):  # the loop's thread, between two steps
            drop(sched, request)
            with gate._cond:
                gate.dropped_at.setdefault(request, len(gate.history))
                gate._cond.notify_all()

        def gated_step(sched):
            with gate._cond:
                if not gate._cond.wait_for(lambda: gate.closed or not gate.hold(gate), gate.HOLD_S):
                    gate.timed_out = True
            events = step(sched)
            with gate._cond:
                produced: dict = {}
                for e in events:
                    if e.token_id >= 0:
                        produced[e.request] = produced.get(e.request, 0) + 1
                        gate.tokens[e.request] = gate.tokens.get(e.request, 0) + 1
                    if e.finish_reason is not None and e.request in gate._rows_left:
                        gate._rows_left[e.request] -= 1
                        if gate._rows_left[e.request] == 0:
                            gate.ended_at[e.request] = len(gate.history)
                gate.history.append(produced)
                gate._cond.notify_all()
            return events

        monkeypatch.setattr(GenerationLoop, "submit", gated_submit)
        monkeypatch.setattr(GenerationLoop, "cancel", gated_cancel)
        monkeypatch.setattr(GenerationScheduler, "step", gated_step)
        monkeypatch.setattr(GenerationScheduler, "cancel", recorded_drop)

    def release(self) -> None:
        with self._cond:
            self.released = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[["GenerationGate"], bool], timeout: float = HOLD_S) -> bool:
        """Blocks until ``predicate(gate)`` holds (checked at every change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)


# SmolLM2-135M-Instruct's ChatML template (its GGUF's tokenizer.chat_template).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def rigged_chat_gpt2(out: Path, words: tuple[str, ...], n_positions: int = 256) -> Path:
    """A random GPT-2 with the ChatML template that answers every
    conversation with ``words`` (each one token of the test vocabulary), then
    <|im_end|>: its blocks add nothing and its positions are zero, so the
    next token depends on the current one only, and its LM head makes the
    greedy successor of the generation prompt's last token words[0], then
    words[1], ..., then <|im_end|>. Its config's eos is another token (0):
    only the template's end of turn ends a reply. Saved in ``out``."""
    import json

    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.engine.chat import render_chat
    from tallow.testing import train_byte_level_bpe

    train_byte_level_bpe(out / "tokenizer.json")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}))
    im_end = tok.token_to_id("<|im_end|>")
    start = tok.encode(render_chat(CHATML, [{"role": "user", "content": "x"}])).ids[-1]
    chain = [tok.encode(w).ids for w in words]
    assert all(len(ids) == 1 for ids in chain), f"each of {words} must be one token"
    chain = [ids[0] for ids in chain]
    assert len({start, im_end, 0, *chain}) == len(chain) + 3, "the chain's tokens must be distinct"
    torch.manual_seed(11)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=n_positions, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for layer in (block.attn.c_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        for a, b in zip([start, *chain], [*chain, im_end]):
            head[b] = 3 * wte[a]
    model.save_pretrained(out)
    return out
