"""Llama-family decoders (tallow.models.llama) against transformers: tiny random
Llama / Qwen2 / Mistral checkpoints saved as safetensors, and generation on the
continuous-batching scheduler."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tallow.models import CheckpointError, LlamaForCausalLM, load
from tallow.models.generation import SamplingParams
from tallow.models.scheduler import GenerationScheduler
from tallow.testing import train_byte_level_bpe

PROMPTS = ["Return the number of items", "A", "The quick brown fox jumps over the lazy dog and", "def f(a, b):"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)


def tiny_config(kind: str, vocab: int, **overrides):
    """hidden 64, 4 query heads of 16 over 2 key/value heads (GQA), 3 layers;
    weights larger than transformers' default init so that the logits are not
    all near zero (greedy tokens then depend on every layer)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-5,
              initializer_range=0.08, bos_token_id=0, eos_token_id=0, pad_token_id=0,
              tie_word_embeddings=kind == "qwen2")
    kw.update(overrides)
    return cls(**kw)


def save_tiny(kind: str, out: Path, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    vocab = train_byte_level_bpe(out / "tokenizer.json")
    torch.manual_seed({"llama": 11, "qwen2": 12, "mistral": 13}[kind])
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab, **overrides)).eval()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def tiny_dir(request, tmp_path_factory) -> Path:
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load(llama_dir)


@pytest.fixture(scope="module")
def hf_llama(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


def _left_pad(tok, prompts):
    ids = tok.encode_ids(prompts)
    longest = max(map(len, ids))
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, longest - len(s):] = torch.tensor(s)
        mask[i, longest - len(s):] = 1
    return input_ids, mask


def test_logits_match_transformers(tiny_dir):
    """fp32, left-padded batch: every real position's logits equal transformers'."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ours = load(tiny_dir)
    assert isinstance(ours, LlamaForCausalLM) and ours.architecture == hf.config.model_type
    input_ids, mask = _left_pad(ours.tokenizer, PROMPTS)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    got = ours(input_ids, mask)
    real = mask.bool()
    assert expected[real].abs().max() > 1.0  # the check below is not vacuous
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_int8_logits_close_to_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    int8 = load(tiny_dir, quantize="int8")
    assert int8.quantization == "int8" and int8.kv_cache_dtype == "bfloat16"
    ids = torch.tensor([int8.tokenizer.encode_ids([PROMPTS[2]])[0]])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    got = int8(ids)[0]
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_scheduler_greedy_equals_transformers_generate(llama, hf_llama):
    """Rows joining at different steps, ragged prompts, one pool: each row's
    greedy tokens equal transformers' generate for that prompt alone."""
    ids = llama.tokenizer.encode_ids(PROMPTS)
    sched = GenerationScheduler(llama, max_rows=8)
    toks: dict = {}
    arrivals = {0: [("a", ids[:2])], 3: [("b", ids[2:3])], 5: [("c", ids[3:])]}
    step = 0
    while step < 200 and (not sched.idle or step <= max(arrivals)):
        for req, prompts in arrivals.get(step, []):
            sched.add(req, prompts, [GREEDY] * len(prompts))
        for ev in sched.step():
            assert ev.finish_reason != "error", ev.error
            if ev.token_id >= 0:
                toks.setdefault((ev.request, ev.row), []).append(ev.token_id)
        step += 1
    order = [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
    for key, prompt in zip(order, ids):
        assert toks[key] == _hf_greedy(hf_llama, prompt, GREEDY.max_new_tokens), key


def test_generate_batch_equals_transformers(llama, hf_llama):
    results = llama.generate(PROMPTS, max_new_tokens=10, temperature=0, stop_at_eos=False)
    for prompt, r in zip(llama.tokenizer.encode_ids(PROMPTS), results):
        assert r.token_ids == _hf_greedy(hf_llama, prompt, 10)


def test_seeded_sampling_is_per_row_and_reproducible(llama):
    """A seeded row draws the same tokens alone and beside other rows with other settings."""
    ids = llama.tokenizer.encode_ids(PROMPTS)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1,
                             stop_at_eos=False, seed=7)

    def run(requests):
        sched = GenerationScheduler(llama, max_rows=8)
        for req, prompts, params in requests:
            sched.add(req, prompts, params)
        out: dict = {}
        while not sched.idle:
            for ev in sched.step():
                if ev.token_id >= 0:
                    out.setdefault((ev.request, ev.row), []).append(ev.token_id)
        return out

    alone = run([("x", ids[2:3], [sampled])])[("x", 0)]
    mixed = run([("g", ids[:2], [GREEDY, replace(sampled, seed=99)]), ("x", ids[2:3], [sampled]),
                 ("h", ids[3:], [replace(sampled, temperature=1.3, seed=None)])])
    assert mixed[("x", 0)] == alone
    assert mixed[("g", 1)] != run([("y", ids[1:2], [replace(sampled, seed=100)])])[("y", 0)]
    assert run([("x", ids[2:3], [sampled])])[("x", 0)] == alone


def test_stop_strings_cut_the_text(llama):
    full = llama.generate([PROMPTS[2]], max_new_tokens=30, temperature=0, stop_at_eos=False)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    stopped = llama.generate([PROMPTS[2]], max_new_tokens=30, temperature=0, stop=[stop], stop_at_eos=False)[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:full.text.find(stop)]
    streamed = "".join(llama.stream(PROMPTS[2], max_new_tokens=30, temperature=0, stop=[stop], stop_at_eos=False))
    assert streamed == stopped.text


def test_decode_against_a_bf16_cache_follows_the_full_forward(llama_dir):
    """The bf16 pool is read in place by the decode kernel (query heads of a
    group folded into the query axis): each step's logits stay close to a
    full fp32 forward over the same tokens."""
    model = load(llama_dir, kv_cache_dtype="bfloat16")
    prompt = model.tokenizer.encode_ids([PROMPTS[0]])[0]
    sched = GenerationScheduler(model, max_rows=2)
    steps: list = []
    orig = model.decode_rows

    def spy(tokens, positions, cache):
        logits = orig(tokens, positions, cache)
        steps.append(logits[0].clone())
        return logits

    model.decode_rows = spy
    try:
        sched.add("r", [prompt], [replace(GREEDY, max_new_tokens=8)])
        out = []
        while not sched.idle:
            out += [ev.token_id for ev in sched.step() if ev.token_id >= 0]
    finally:
        del model.decode_rows
    full = model(torch.tensor([prompt + out]))[0]
    assert len(steps) == len(out) - 1
    for i, logits in enumerate(steps):
        ref = full[len(prompt) + i]
        assert (logits - ref).abs().max() < 0.02 * ref.abs().max(), i


def test_every_eos_id_ends_a_row(tmp_path, llama_dir, llama):
    """generation_config.json may list several eos ids (Llama 3 Instruct): any of them ends a row with 'eos'."""
    first = llama.generate([PROMPTS[0]], max_new_tokens=6, temperature=0, stop_at_eos=False)[0].token_ids
    d = tmp_path / "m"
    d.mkdir()
    for f in llama_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, first[2]]}))
    model = load(d)
    assert model.config.eos_token_ids == (0, first[2])
    r = model.generate([PROMPTS[0]], max_new_tokens=6, temperature=0)[0]
    assert r.finish_reason == "eos" and r.token_ids == first[:3]


def test_context_limit_is_the_models(llama):
    with pytest.raises(ValueError, match="context limit of 128"):
        llama.generate([PROMPTS[0]], max_new_tokens=127)


def test_a_wrong_tensor_is_named(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    d.mkdir()
    for f in llama_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"][:16]
    save_file(sd, str(d / "model.safetensors"))
    wrong = r"layers\.1\.self_attn\.k_proj\.weight: expected \(32, 64\), got \(16, 64\)"
    with pytest.raises(CheckpointError, match=wrong):
        load(d)
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_act is 'gelu'"):
        load(d)


def test_chat_attributes_and_repr(tmp_path, llama_dir, llama):
    assert llama.eos_token_id == 0 and llama.bos_token_id == 0 and llama.chat_template is None
    assert llama.special_tokens["eos_token"] == "<|endoftext|>"
    assert "kv_heads=2" in repr(llama) and "architecture=llama" in repr(llama)
    d = tmp_path / "chat"
    d.mkdir()
    for f in llama_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = load(d)
    assert model.chat_template.startswith("{% for m in messages %}")
    assert model.tokenizer.chat_template == model.chat_template  # travels with the tokenizer to the server


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 500.0},
], ids=["linear", "llama3"])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    """Llama 3.1-style and linear RoPE scaling from config.json's rope_parameters."""
    from transformers import AutoModelForCausalLM

    d = save_tiny("llama", tmp_path, rope_parameters=rope)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    ours = load(d)
    assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]
    ids = torch.tensor([ours.tokenizer.encode_ids([PROMPTS[2] + " " + PROMPTS[0] * 3])[0][:100]])
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
