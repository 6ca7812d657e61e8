"""The native decode step (one C++ call per scheduler step) against the
per-op decode_rows it replaces, for GPT-2 and Llama-family models (grouped-
query attention with groups of 2 and 5: the bf16 decode path takes at most 4
query rows per call), fp32 and INT8 weights, float32 and bf16 KV pools."""

from __future__ import annotations

import pytest
import torch

from tallow.models import load
from tallow.testing import require_native


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("decoders")
    ids = {"bos_token_id": 0, "eos_token_id": 0}
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=128, **ids)) \
        .eval().save_pretrained(root / "gpt2")
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, vocab_size=300, max_position_embeddings=128,
                                 tie_word_embeddings=False, pad_token_id=0, **ids)).eval().save_pretrained(root / "gqa2")
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=80, num_attention_heads=10, num_key_value_heads=2,
                                 intermediate_size=97, vocab_size=300, max_position_embeddings=128,
                                 pad_token_id=0, **ids)).eval().save_pretrained(root / "gqa5")
    return root


def _views(pool):
    return [t for t in pool]


def _native_and_per_op(model, prompts, tokens, positions, length):
    """Prefills ``prompts`` into a zeroed pool, then decodes one step natively
    and, on a copy of the pool, per-op: (native logits, per-op logits, native
    pool, per-op pool)."""
    keys, values = model.new_cache(len(prompts), length)
    keys.zero_()  # the scheduler's pool: unwritten positions are zeros
    values.zero_()
    cache = (_views(keys), _views(values))
    model.prefill_rows(prompts, cache)
    ref_cache = ([k.clone() for k in cache[0]], [v.clone() for v in cache[1]])
    tokens, positions = torch.tensor(tokens), torch.tensor(positions)
    got = model.decode_rows(tokens, positions, cache)
    native, model.native = model.native, None
    try:
        want = model.decode_rows(tokens, positions, ref_cache)
    finally:
        model.native = native
    return got, want, cache, ref_cache


@pytest.mark.parametrize("name", ["gpt2", "gqa2", "gqa5"])
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
def test_native_decode_step_equals_per_op(decoder_dirs, name, quantize, kv):
    require_native()
    model = load(decoder_dirs / name, quantize=quantize, kv_cache_dtype=kv)
    assert model.native is not None
    # ragged positions: a key mask per row
    got, want, cache, ref_cache = _native_and_per_op(model, [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]],
                                                     [20, 30, 40], [5, 2, 7], 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for a, b in zip(cache[0] + cache[1], ref_cache[0] + ref_cache[1]):  # the same keys/values written
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-6)


def test_native_decode_on_every_isa(decoder_dirs, each_isa):
    require_native()
    model = load(decoder_dirs / "gqa5")
    got, want, _, _ = _native_and_per_op(model, [[1, 2, 3], [4, 5, 6, 7]], [8, 9], [3, 4], 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_native_decode_names_bad_tokens_and_positions(decoder_dirs):
    require_native()
    model = load(decoder_dirs / "gpt2")
    keys, values = model.new_cache(1, 8)
    cache = (_views(keys), _views(values))
    with pytest.raises(ValueError, match="token 300 of row 0 is outside the vocabulary"):
        model.decode_rows(torch.tensor([300]), torch.tensor([0]), cache)
    with pytest.raises(ValueError, match="position 8 of row 0 is outside"):
        model.decode_rows(torch.tensor([1]), torch.tensor([8]), cache)


def test_decoder_built_with_decoder_ops_keeps_the_per_op_path(decoder_dirs, monkeypatch):
    monkeypatch.setenv("TALLOW_DECODER", "ops")
    assert load(decoder_dirs / "gqa2").native is None


@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
def test_decode_right_after_a_one_token_prompt_with_wide_groups(decoder_dirs, kv):
    """Five query heads per KV head read as query rows against 2 keys (the
    first decode step after a 1-token prompt): native and per-op agree."""
    require_native()
    model = load(decoder_dirs / "gqa5", kv_cache_dtype=kv)
    got, want, _, _ = _native_and_per_op(model, [[1], [2, 3]], [4, 5], [1, 2], 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_a_copied_decoder_decodes_like_the_original(decoder_dirs):
    import copy

    require_native()
    model = load(decoder_dirs / "gqa2")
    twin = copy.deepcopy(model)
    outs = []
    for m in (model, twin):
        keys, values = m.new_cache(1, 8)
        keys.zero_()
        values.zero_()
        cache = (_views(keys), _views(values))
        m.prefill_rows([[1, 2]], cache)
        outs.append(m.decode_rows(torch.tensor([3]), torch.tensor([2]), cache))
    assert twin.native is not model.native
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["gpt2", "gqa2", "gqa5"])
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("kv", ["float32", "bfloat16"])
def test_native_prefill_equals_per_op(decoder_dirs, name, quantize, kv):
    """Packed prompts (no padding) give the per-op path's logits and write
    the same keys/values at every real position of every row."""
    require_native()
    model = load(decoder_dirs / name, quantize=quantize, kv_cache_dtype=kv)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    pools = []
    for native in (model.native, None):
        keys, values = model.new_cache(3, 16)
        keys.zero_()
        values.zero_()
        cache = (_views(keys), _views(values))
        saved, model.native = model.native, native
        try:
            pools.append((model.prefill_rows(prompts, cache), cache))
        finally:
            model.native = saved
    (got, got_cache), (want, want_cache) = pools
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    for a, b in zip(got_cache[0] + got_cache[1], want_cache[0] + want_cache[1]):
        for row, p in enumerate(prompts):  # the per-op path also writes its padding; compare real tokens
            torch.testing.assert_close(a[row, :, :len(p)].float(), b[row, :, :len(p)].float(), rtol=1e-5, atol=1e-5)


def test_native_prefill_names_bad_prompts(decoder_dirs):
    require_native()
    model = load(decoder_dirs / "gqa2")
    keys, values = model.new_cache(1, 8)
    cache = (_views(keys), _views(values))
    with pytest.raises(ValueError, match="token 300 at position 1 is outside the vocabulary"):
        model.prefill_rows([[1, 300]], cache)
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens; each needs 1..8"):
        model.prefill_rows([[1] * 9], cache)


def test_int8_per_block_for_llama_per_row_for_gpt2(decoder_dirs):
    """Llama-family INT8 quantizes weights and activations per block of 32
    (its hidden states' outlier channels, its GGUF weights' 4-bit blocks),
    natively too; GPT-2 keeps a scale per weight row and per activation row."""
    require_native()
    from tallow.models.bert_native import _linear
    from tallow.models.layers import Dense
    from tallow.ops.int8_block import BlockQuantizedLinear

    for name, blocks in (("gqa2", True), ("gpt2", False)):
        model = load(str(decoder_dirs / name), quantize="int8")
        dense = [m for m in model.modules() if isinstance(m, Dense)]
        assert dense and all(isinstance(m.quantized, BlockQuantizedLinear) == blocks for m in dense), name
        assert all(("block_scale" in _linear(m)) == blocks for m in dense), name
