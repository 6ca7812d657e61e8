"""GPT-2 on tallow's kernels against transformers' GPT2LMHeadModel."""

from __future__ import annotations

import pytest
import torch

from tallow.models import GPT2LMHeadModel, load

PROMPTS = ["Return the number of items", "A", "The quick brown fox jumps over the lazy dog and"]


@pytest.fixture(scope="module")
def hf_model(gpt2_dir):
    from transformers import GPT2LMHeadModel as HF

    return HF.from_pretrained(gpt2_dir).eval()


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return load(gpt2_dir)


def _left_pad(model, prompts):
    ids = model.tokenizer.encode_ids(prompts)
    longest = max(map(len, ids))
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, longest - len(s):] = torch.tensor(s)
        mask[i, longest - len(s):] = 1
    return input_ids, mask


def test_logits_match_transformers(model, hf_model):
    assert isinstance(model, GPT2LMHeadModel)
    input_ids, mask = _left_pad(model, PROMPTS)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    ours = model(input_ids, mask)
    real = mask.bool()  # logits at left-pad positions are meaningless in both
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch3-ragged"])
def test_greedy_generation_matches_transformers(model, hf_model, prompts):
    input_ids, mask = _left_pad(model, prompts)
    with torch.no_grad():
        hf = hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                               pad_token_id=0, eos_token_id=0)
    ours = model.generate(prompts, max_new_tokens=20, temperature=0)
    for i, result in enumerate(ours):
        expected = hf[i, input_ids.shape[1]:].tolist()
        if 0 in expected:  # transformers pads finished rows with eos
            expected = expected[: expected.index(0) + 1]
        assert result.token_ids == expected, f"prompt {i}"


def test_kv_cache_decode_equals_full_forward(model):
    """Each decode step's logits equal a fresh forward over the whole sequence."""
    prompt = model.tokenizer.encode_ids([PROMPTS[0]])[0]
    result = model.generate([PROMPTS[0]], max_new_tokens=8, temperature=0)[0]
    seq = torch.tensor([prompt + result.token_ids])
    full = model(seq)[0]
    for step, tok in enumerate(result.token_ids):
        assert int(full[len(prompt) - 1 + step].argmax()) == tok


def test_seed_makes_sampling_reproducible(model):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=1234)
    a = model.generate(PROMPTS, **kwargs)
    b = model.generate(PROMPTS, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    c = model.generate(PROMPTS, **{**kwargs, "seed": 99})
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_top_k_one_is_greedy(model):
    greedy = model.generate(PROMPTS, max_new_tokens=10, temperature=0)
    topk1 = model.generate(PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=3)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk1]


def test_stop_strings_cut_the_text_and_the_stream(model):
    full = model.generate([PROMPTS[2]], max_new_tokens=30, temperature=0, stop_at_eos=False)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    stopped = model.generate([PROMPTS[2]], max_new_tokens=30, temperature=0, stop=[stop], stop_at_eos=False)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    streamed = "".join(model.stream(PROMPTS[2], max_new_tokens=30, temperature=0, stop=[stop], stop_at_eos=False))
    assert streamed == stopped.text


def test_stream_yields_the_same_text_as_generate(model):
    pieces = list(model.stream(PROMPTS[0], max_new_tokens=12, temperature=0, stop_at_eos=False))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate([PROMPTS[0]], max_new_tokens=12, temperature=0,
                                             stop_at_eos=False)[0].text


def test_context_limit_is_enforced(model):
    with pytest.raises(ValueError, match="context limit of 128"):
        model.generate([PROMPTS[0]], max_new_tokens=127)


def test_bad_sampling_parameters_are_named(model):
    for kwargs, field in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                          ({"top_k": -2}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens"),
                          ({"repetition_penalty": 0}, "repetition_penalty")]:
        with pytest.raises(ValueError, match=field):
            model.generate(PROMPTS[:1], **kwargs)
    with pytest.raises(ValueError, match="input 0 is empty"):
        model.generate([""])


def test_int8_logits_close_and_perplexity_change_reported(gpt2_dir, model):
    int8 = load(gpt2_dir, quantize="int8")
    text = "Return a new list containing all items from the iterable in ascending order."
    ids = torch.tensor([model.tokenizer.encode_ids([text])[0]])
    a, b = model(ids)[0], int8(ids)[0]
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    ppl_fp32, ppl_int8 = float(torch.exp(nll(a))), float(torch.exp(nll(b)))
    print(f"GPT-2 (random) max |logit diff| int8 vs fp32: {(a - b).abs().max():.4f}; "
          f"perplexity {ppl_fp32:.3f} -> {ppl_int8:.3f}")
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert abs(ppl_int8 - ppl_fp32) / ppl_fp32 < 0.02
    assert "quantization=int8" in repr(int8)


def test_kv_cache_dtype_defaults_and_validation(gpt2_dir, model):
    assert model.kv_cache_dtype == "float32"  # an fp32 model keeps transformers-equal logits
    int8 = load(gpt2_dir, quantize="int8")
    assert int8.kv_cache_dtype == "bfloat16" and "kv_cache=bfloat16" in repr(int8)
    assert int8.new_cache(2, 5)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        load(gpt2_dir, kv_cache_dtype="int4")


def test_bf16_kv_cache_gives_the_same_greedy_tokens(gpt2_dir, model):
    bf16 = load(gpt2_dir, kv_cache_dtype="bfloat16")
    ours = bf16.generate(PROMPTS, max_new_tokens=20, temperature=0)
    ref = model.generate(PROMPTS, max_new_tokens=20, temperature=0)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]


def test_bf16_kv_cache_decode_logit_error_is_bounded(gpt2_dir, model):
    """One decode step against a bf16 cache vs the fp32 cache: the keys and
    values are rounded to 8 mantissa bits (relative error <= 2^-9), so the
    step's logits move by well under 1 % of their range."""
    bf16 = load(gpt2_dir, kv_cache_dtype="bfloat16")
    ids = torch.tensor([model.tokenizer.encode_ids([PROMPTS[2]])[0]])
    t = ids.shape[1]
    out = []
    for m in (model, bf16):
        cache = m.new_cache(1, t + 1)
        pos = torch.arange(t)[None]
        with torch.inference_mode():
            first = m._run(ids, cache, 0, pos, None, last_only=True)[:, -1]
            nxt = first.argmax(-1)
            out.append(m._run(nxt[:, None], cache, t, torch.tensor([[t]]), None, last_only=True)[0, -1])
    err = float((out[0] - out[1]).abs().max() / out[0].abs().max())
    print(f"GPT-2 (random) bf16 KV cache, decode-step logits: max |diff| / max |logit| = {err:.2e}")
    assert 0 < err < 5e-3


def test_a_subnormal_temperature_samples_like_greedy():
    """logits / 1e-309 overflow to inf (softmax NaN, multinomial raised: a 500
    found by schemathesis); the limit of a vanishing temperature is argmax."""
    from tallow.models.generation import SamplingParams, next_tokens

    logits = torch.tensor([[1.0, 3.0, -2.0], [-1.0, -0.5, -3.0]])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for t in (1e-309, 5e-324, 2.2e-308):
        out = next_tokens(logits, SamplingParams(max_new_tokens=1, temperature=t), seen, None)
        assert out.tolist() == [1, 1]
