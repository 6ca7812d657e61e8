"""A BERT encoder's forward pass as one native call (``tallow._C.Encoder``).

The per-op path (``BertModel.forward``: a Python loop of tallow ops and torch
glue per layer) stays the reference this path is tested against. Here the
whole pass — embeddings + LayerNorm, per layer the fused QKV GEMM, attention
per sequence on views of it, output projection + residual LayerNorm, FFN with
GELU fused into the GEMM epilogue, FFN output + residual LayerNorm, then mean
or CLS pooling and the L2 normalisation — runs in C++ on tallow's thread pool
(csrc/encoder/), with no torch op in between: torch's own OpenMP team stays
parked and cannot take the cores from tallow's pool, whatever was imported
first.

Batches are **packed**: the sequences' tokens back to back with cumulative
offsets (FlashAttention's varlen convention), so mixed lengths cost what their
tokens cost; there is no padding and no attention mask.

Weights: fp32 linears are packed once into the native GEMM's 16-column
panels (a copy: the module keeps its torch weights for the per-op path);
INT8 linears, embedding tables and LayerNorm parameters are borrowed from the
torch module's buffers (no copy; the native object keeps them alive).
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from .._native import native, native_available

POOL_NONE, POOL_MEAN, POOL_CLS = 0, 1, 2
_POOL_CODES = {"mean": POOL_MEAN, "cls": POOL_CLS, "pooler": POOL_CLS, None: POOL_NONE}
_ACT_CODES = {"relu": 1, "gelu_erf": 2, "gelu_tanh": 3}


def native_encoder_wanted() -> bool:
    """Whether a BERT model built now runs its forward natively: the native
    module loads and ``TALLOW_BACKEND`` does not ask for the per-op path
    (``ref`` selects the torch reference ops, whose model path is per-op;
    ``TALLOW_ENCODER=ops`` keeps the per-op path with the native kernels).
    Decided once, when the model is built (DESIGN.md convention 16)."""
    if os.environ.get("TALLOW_ENCODER", "").strip().lower() == "ops":
        return False
    if os.environ.get("TALLOW_BACKEND", "").strip().lower() in ("ref", "triton", "cuda"):
        return False
    return native_available()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _linear(dense) -> dict:
    """A Dense layer as the native binding takes it (fp32 weight or INT8 buffers)."""
    q = dense.quantized
    if q is None:
        return {"weight": _f32(dense.weight), "bias": None if dense.bias is None else _f32(dense.bias)}
    from ..ops.int8_block import BlockQuantizedLinear

    bufs = q._buffers
    bias = None if bufs["bias"] is None else bufs["bias"].numpy()
    if isinstance(q, BlockQuantizedLinear):
        return {"packed": bufs["packed_weight"].numpy(), "block_scale": bufs["block_scale"].numpy(), "bias": bias}
    return {"packed": bufs["packed_weight"].numpy(), "colsum": bufs["weight_colsum"].numpy(),
            "scale": bufs["weight_scale"].numpy(), "bias": bias}


def _norm(ln: torch.nn.LayerNorm) -> dict:
    return {"weight": _f32(ln.weight), "bias": _f32(ln.bias)}


def build(bert) -> "object":
    """The native encoder for ``bert`` (a ``tallow.models.bert.BertModel``)
    in its current precision."""
    cfg = bert.config
    from .bert import _HIDDEN_ACT

    act = _ACT_CODES[_HIDDEN_ACT[cfg.hidden_act]]
    enc = native().Encoder(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size,
                           cfg.max_position_embeddings, cfg.type_vocab_size, cfg.layer_norm_eps, act)
    enc.set_embeddings(_f32(bert.word_embeddings.weight), _f32(bert.position_embeddings.weight),
                       _f32(bert.token_type_embeddings.weight), _f32(bert.embed_norm.weight),
                       _f32(bert.embed_norm.bias))
    for layer in bert.layers:
        if layer.intermediate.activation != _HIDDEN_ACT[cfg.hidden_act]:
            raise AssertionError("layer activation differs from the config's")
        enc.add_layer(_linear(layer.qkv), _linear(layer.attn_out), _norm(layer.attn_norm),
                      _linear(layer.intermediate), _linear(layer.out), _norm(layer.out_norm))
    return enc


class NativeEncoder:
    """Runs a ``BertModel`` natively over lists of token ids. Built lazily at
    the first call (after any quantization), once, thread-safe."""

    def __init__(self, bert):
        self._bert = bert
        self._enc = None
        self._lock = threading.Lock()

    # A copy (copy.deepcopy, pickle, torch.save of the model) carries the
    # model, not the native object: the copy builds its own from its own
    # weights at its first call.
    def __getstate__(self) -> dict:
        return {"_bert": self._bert}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_bert"])

    def _get(self):
        if self._enc is None:
            with self._lock:
                if self._enc is None:
                    self._enc = build(self._bert)
        return self._enc

    def run(self, ids: Sequence[Sequence[int]], pooling: Optional[str], normalize: bool = False,
            token_type_ids: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
        """Pooled ``[len(ids), H]`` (pooling "mean" or "cls"; "pooler" gives
        the CLS hidden state, for the pooler dense to take), or the hidden
        states of every token packed ``[sum(len), H]`` (pooling None)."""
        lengths = [len(x) for x in ids]
        if any(n == 0 for n in lengths):
            raise ValueError("every input needs at least one token")
        cu = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(cu[-1]))
        types = None
        if token_type_ids is not None:
            types = np.fromiter((t for x in token_type_ids for t in x), dtype=np.int64, count=int(cu[-1]))
        code = _POOL_CODES[pooling]
        rows = int(cu[-1]) if code == POOL_NONE else len(ids)
        out = torch.empty(rows, self._bert.config.hidden_size)
        self._get().forward(flat, types, cu, code, bool(normalize and code != POOL_NONE), out.numpy())
        return out
