"""Server fixtures: a server with every model (session-wide), a client, the
API key header, a long-context GPT-2."""

from __future__ import annotations

from pathlib import Path

import pytest

from server_helpers import API_KEY, READ_ONLY_KEY, SECOND_KEY, GenerationGate, ServerThread, make_config


@pytest.fixture(scope="session")
def gpt2_long_dir(tmp_path_factory) -> Path:
    """A random GPT-2 with a 1024-token context (for long streams to cancel)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tallow.testing import train_byte_level_bpe

    out = tmp_path_factory.mktemp("gpt2-long")
    vocab = train_byte_level_bpe(out / "tokenizer.json")
    torch.manual_seed(4)
    cfg = GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def full_server(tmp_path_factory, bert_classifier_dir, gpt2_dir, resnet_dir):
    """Every model loaded, the demo corpus indexed, two full API keys and a
    read-only one, a small body limit (1 MiB) for the 413 tests; the
    playground page itself public (a browser cannot send a key to load it),
    its API calls keyed."""
    data = tmp_path_factory.mktemp("serve-data")
    cfg = make_config(data, **{"models.classifier": str(bert_classifier_dir), "models.generator": str(gpt2_dir),
                               "models.image": str(resnet_dir), "server.api_key": API_KEY,
                               "server.api_keys": [SECOND_KEY], "server.read_only_api_keys": [READ_ONLY_KEY],
                               "server.max_body_bytes": 1 << 20, "images.max_megapixels": 2.0,
                               "models.max_completion_tokens": 64, "server.public_playground": True})
    server = ServerThread(cfg).start()
    yield server
    server.stop()


@pytest.fixture
def client(full_server):
    """A client of the full server that sends its (full) API key."""
    with full_server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture
def anon(full_server):
    """A client of the full server without a key."""
    with full_server.client() as c:
        yield c


@pytest.fixture
def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def generation_gate(monkeypatch):
    """``generation_gate(hold=...)``: a GenerationGate on this process's
    generation loops, closed when the test ends however it ends; a hold that
    ran out of its guard instead of ending fails the test."""
    gates: list[GenerationGate] = []

    def make(hold):
        gates.append(GenerationGate(monkeypatch, hold))
        return gates[-1]

    yield make
    for gate in gates:
        gate.close()
    assert not any(gate.timed_out for gate in gates), "a GenerationGate hold ran out of HOLD_S instead of ending"
