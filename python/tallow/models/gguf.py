"""GGUF files (llama.cpp's format) → tallow's Llama-family model.

Parsing is the ``gguf`` package's (``GGUFReader``: metadata and tensors
memory-mapped). Metadata under ``<arch>.*`` becomes a :class:`LlamaConfig`;
the tokenizer comes from ``tokenizer.ggml.*`` (:mod:`.gguf_tokenizer`) and
the chat template from ``tokenizer.chat_template``.

Tensors are dequantized to float32 at load (``gguf.quants.dequantize``,
numpy) for the types in :data:`SUPPORTED` (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: the plain files and the common
``Q4_K_M`` / ``Q5_K_M`` mixes); any other type is a CheckpointError naming the
tensor and its type. ``quantize="int8"`` then requantizes every linear to
tallow's INT8 layout (per-output-channel scales, W8A8 with dynamic
activations), which keeps the weights at 1 byte each.

llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``)
reorders the rows of each head of ``attn_q`` / ``attn_k`` for architecture
``llama``, so that its RoPE rotates adjacent pairs (GPT-J layout) where
Hugging Face's rotates halves. :func:`unpermute` undoes that once at load,
and the model computes as transformers does. Qwen2 files are not permuted
(llama.cpp runs them with the NeoX layout, which is Hugging Face's).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ._checkpoint import CheckpointError
from .llama import LlamaConfig, LlamaForCausalLM, build_llama

ARCHITECTURES = ("llama", "qwen2")

_SUPPORTED_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def supported_types() -> frozenset:
    from gguf import GGMLQuantizationType

    return frozenset(GGMLQuantizationType[n] for n in _SUPPORTED_NAMES)


def hf_name(name: str) -> str:
    """A GGUF tensor name → the Hugging Face one tallow's Llama checks (unknown names pass unchanged,
    so the shape check reports them as unexpected)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    return name


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's ``permute``: per head, rows
    (pair i, element j) back to (half j, index i). w [n_head * d, ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value as Python values (lists for arrays); the per-token arrays
    (tokens, merges, types) are the slow part of opening a file."""
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = f.contents()
        except Exception as exc:  # a malformed value: name it
            raise CheckpointError(f"GGUF metadata key {key!r} could not be read: {exc}") from exc
    return out


def config_from_metadata(meta: dict[str, Any], vocab_size: int, has_output: bool,
                         has_qkv_bias: bool) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"general.architecture is {arch!r}; tallow reads GGUF files of architecture "
                              f"{' or '.join(ARCHITECTURES)}")

    def get(key: str, default: Any = KeyError):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise CheckpointError(f"the GGUF metadata lacks {full!r}")
        return default

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise CheckpointError(f"{arch}.rope.dimension_count is {rot} but heads are {head_dim} wide: partial "
                              "rotary embeddings are not implemented")
    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind != "none":
        raise CheckpointError(f"{arch}.rope.scaling.type is {kind!r}; tallow implements 'linear' only")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = tuple(int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id") if meta.get(k) is not None)
    eos_ids = tuple(dict.fromkeys(eos_ids))  # llama.cpp also stops at end-of-turn / end-of-message
    bos, pad = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.padding_token_id")
    cfg = LlamaConfig(
        model_type=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias=has_qkv_bias,
        tie_word_embeddings=not has_output,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=int(eos) if eos is not None else 2,
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
    )
    cfg.validate()
    return cfg


def _dequantize(t, source: str) -> torch.Tensor:
    from gguf.quants import dequantize

    if t.tensor_type not in supported_types():
        raise CheckpointError(f"{source}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, which tallow does "
                              f"not read (supported: {', '.join(_SUPPORTED_NAMES)})")
    a = dequantize(t.data, t.tensor_type)
    expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    if tuple(a.shape) != expected:
        raise CheckpointError(f"{source}: tensor {t.name!r} dequantized to shape {tuple(a.shape)}, "
                              f"expected {expected}")
    if a.dtype != np.float32 or not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, dtype=np.float32, order="C")  # F32 data is a read-only view of the mapped file
    return torch.from_numpy(a)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], LlamaConfig]:
    """(metadata, state dict in tallow's Llama names, float32, Q/K un-permuted, config)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # bad magic, truncation, an unknown value type
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file: {exc}") from exc
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{str(path)!r} has no token_embd.weight tensor")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cfg = config_from_metadata(meta, int(embd.shape[1]), "output.weight" in names,
                               any(n.endswith("attn_q.bias") for n in names))
    permuted = cfg.model_type == "llama"
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = _dequantize(t, str(path))
        if permuted and ".self_attn.q_proj." in name:
            w = unpermute(w, cfg.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = unpermute(w, cfg.num_key_value_heads)
        sd[name] = w
    return meta, sd, cfg


def load_gguf(path: str | Path, quantize: Optional[str] = None,
              kv_cache_dtype: Optional[str] = None) -> LlamaForCausalLM:
    """A Llama / Qwen2 GGUF file as a :class:`LlamaForCausalLM`, with its
    tokenizer (a :class:`~tallow.models.gguf_tokenizer.GGUFTokenizer`) and chat template."""
    from .gguf_tokenizer import GGUFTokenizer

    meta, sd, cfg = read_gguf(path)
    tokenizer = GGUFTokenizer(meta, max_length=cfg.n_positions) if "tokenizer.ggml.model" in meta else None
    if tokenizer is not None and tokenizer._tok.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"{str(path)!r}: the tokenizer has {tokenizer._tok.get_vocab_size()} tokens but the "
                              f"embedding only {cfg.vocab_size} rows")
    return build_llama(cfg, sd, tokenizer, source=str(path), quantize=quantize, kv_cache_dtype=kv_cache_dtype,
                       chat_template=meta.get("tokenizer.chat_template"))
