"""GGUF files (llama.cpp's format) → tallow's Llama-family model.

The file is memory-mapped and parsed here (:func:`read_file`, the layout
of gguf's docs/gguf.md: header, key/values, tensor infos, aligned data),
with the ``gguf`` package's type tables and its numpy dequantizers.
``gguf.GGUFReader`` reads the same, but builds a numpy view per array
element: 3.4 s for SmolLM2's 49k tokens and 49k merges, where a
``struct`` loop takes ~0.1 s. Metadata under ``<arch>.*`` becomes a :class:`LlamaConfig`;
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

import mmap
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple, Optional

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


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: Any          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]    # GGUF order: innermost dimension first
    data: np.ndarray          # a view of the mapped file, as gguf.GGUFReader gives it


# GGUFValueType -> struct format of a scalar
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class _Cursor:
    def __init__(self, buf, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise CheckpointError(f"{self.source!r} is truncated (at byte {self.pos})") from None
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.source!r} is truncated (a string at byte {self.pos} runs past the end)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, n = self.take("I"), self.take("Q")
            if sub in _SCALAR and sub != 7:
                dt = np.dtype("<" + _SCALAR[sub])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise CheckpointError(f"{self.source!r} is truncated (an array at byte {self.pos})")
                a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return a.tolist()
            return [self.value(sub) for _ in range(n)]
        raise CheckpointError(f"{self.source!r}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_file(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata as Python values, tensors as views of the mapped file). Little-endian GGUF v2/v3."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    source = str(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise CheckpointError(f"{source!r} is empty, not a GGUF file") from None
    if bytes(buf[:4]) != b"GGUF":
        raise CheckpointError(f"{source!r} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    c = _Cursor(buf, source)
    c.pos = 4
    version = c.take("I")
    if version not in (2, 3):
        raise CheckpointError(f"{source!r} is GGUF version {version}; tallow reads versions 2 and 3 "
                              "(little-endian)")
    n_tensors, n_kv = c.take("Q"), c.take("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = tuple(c.take("Q") for _ in range(c.take("I")))
        raw_type, offset = c.take("I"), c.take("Q")
        infos.append((name, dims, raw_type, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    tensors = []
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{source}: tensor {name!r} has GGUF type id {raw_type}, which the gguf package "
                                  "does not know") from None
        n = int(np.prod(dims, dtype=np.int64))
        block, size = GGML_QUANT_SIZES[qtype]
        np_dims = tuple(reversed(dims))
        if qtype.name in _TYPED:
            dtype, count = np.dtype(_TYPED[qtype.name]), n
        else:
            dtype, count, np_dims = np.dtype(np.uint8), n * size // block, quant_shape_to_byte_shape(np_dims, qtype)
        at = start + offset
        if at + count * dtype.itemsize > len(buf):
            raise CheckpointError(f"{source!r} is truncated: tensor {name!r} runs past the end of the file")
        data = np.frombuffer(buf, dtype=dtype, count=count, offset=at).reshape(np_dims)
        tensors.append(GGUFTensor(name, qtype, dims, data))
    return meta, tensors


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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package (pip install gguf==0.19.0)") from None
    meta, tensors = read_file(path)
    names = {t.name for t in tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{str(path)!r} has no token_embd.weight tensor")
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    cfg = config_from_metadata(meta, int(embd.shape[1]), "output.weight" in names,
                               any(n.endswith("attn_q.bias") for n in names))
    permuted = cfg.model_type == "llama"
    sd: dict[str, torch.Tensor] = {}
    for t in tensors:
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
    model = build_llama(cfg, sd, tokenizer, source=str(path), quantize=quantize, kv_cache_dtype=kv_cache_dtype,
                        chat_template=meta.get("tokenizer.chat_template"))
    del sd
    _release_freed_memory()
    return model


def _release_freed_memory() -> None:
    """Dequantizing leaves glibc's heap fragmented (numpy temporaries, then the
    fp32 weights INT8 replaced): on SmolLM2 with quantize='int8' the process
    held 811 MB after load and 497 MB after malloc_trim. Other C libraries: nothing to do."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
