"""A decoder's decode step as one native call (``tallow._C.Decoder``), for
GPT-2 and the Llama family alike.

The scheduler calls ``model.decode_rows(tokens, positions, cache)`` once per
iteration. On the per-op path that is ~10 tallow ops and torch glue per
block in Python (GPT-2: 12 blocks; SmolLM2: 30), which at batch 1 costs as
much as the weights' reading. Here the whole step — embeddings, per block
the norm, fused QKV GEMM, RoPE, the K/V write into the scheduler's pool
(float32 or bf16, in place), grouped-query attention over each row's
positions, output projection and residual, the MLP (GELU fused into its GEMM,
or SwiGLU on a fused gate|up GEMM) and residual, then the final norm and the
LM head — runs in C++ (csrc/decoder/) on tallow's pool. Prefill stays on the
per-op path: it is a few large GEMMs, where Python's cost is small.

The per-op ``decode_rows`` stays the reference this path is tested against
(``TALLOW_DECODER=ops`` or ``TALLOW_BACKEND=ref`` keep it). Weights: fp32
linears are packed once (a copy), INT8 linears, embeddings, norms and RoPE
tables are borrowed from the torch module.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from .._native import native, native_available
from .bert_native import _f32, _linear

_ACT_CODES = {None: 0, "relu": 1, "gelu_erf": 2, "gelu_tanh": 3}
LAYER_NORM, RMS_NORM = 0, 1
GELU_MLP, SWIGLU = 0, 1


def native_decoder_wanted() -> bool:
    """Whether a decoder built now decodes natively (decided once per model)."""
    if os.environ.get("TALLOW_DECODER", "").strip().lower() == "ops":
        return False
    if os.environ.get("TALLOW_BACKEND", "").strip().lower() in ("ref", "triton", "cuda"):
        return False
    return native_available()


def _layer_norm(ln) -> dict:
    return {"weight": _f32(ln.weight), "bias": _f32(ln.bias)}


def _rms_norm(n) -> dict:
    return {"weight": _f32(n.weight)}


def _build_gpt2(model):
    c = model.config
    dec = native().Decoder(c.n_embd, c.n_head, c.n_head, c.head_dim, c.inner, c.vocab_size, c.n_positions,
                           LAYER_NORM, GELU_MLP, _ACT_CODES[model.h[0].c_fc.activation], c.layer_norm_epsilon,
                           False)
    dec.set_embeddings(_f32(model.wte.weight), _f32(model.wpe.weight))
    for b in model.h:
        dec.add_block(_layer_norm(b.ln_1), _linear(b.c_attn), _linear(b.c_proj), _layer_norm(b.ln_2),
                      _linear(b.c_fc), _linear(b.mlp_proj))
    dec.set_final(_layer_norm(model.ln_f), _linear(model.lm_head))
    return dec


def _build_llama(model):
    c = model.config
    dec = native().Decoder(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                           c.intermediate_size, c.vocab_size, c.n_positions, RMS_NORM, SWIGLU, 0, c.rms_norm_eps,
                           True)
    dec.set_embeddings(_f32(model.embed_tokens.weight), None)
    dec.set_rope(_f32(model.rope_cos), _f32(model.rope_sin))
    for b in model.layers:
        dec.add_block(_rms_norm(b.input_layernorm), _linear(b.qkv_proj), _linear(b.o_proj),
                      _rms_norm(b.post_attention_layernorm), _linear(b.gate_up_proj), _linear(b.down_proj))
    dec.set_final(_rms_norm(model.norm), _linear(model.lm_head))
    return dec


_BUILDERS = {"gpt2": _build_gpt2, "llama": _build_llama}


class NativeDecoder:
    """``decode_rows`` of a GPT2LMHeadModel or LlamaForCausalLM as one native
    call. Built at the first step (after any quantization), once."""

    def __init__(self, model, kind: str):
        if kind not in _BUILDERS:
            raise ValueError(f"no native decoder for {kind!r}; known: {sorted(_BUILDERS)}")
        self._model, self._kind = model, kind
        self._dec = None
        self._lock = threading.Lock()

    # A copy (copy.deepcopy, pickle, torch.save of the model) carries the
    # model, not the native object: the copy builds its own at its first step.
    def __getstate__(self) -> dict:
        return {"model": self._model, "kind": self._kind}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["kind"])

    def _get(self):
        if self._dec is None:
            with self._lock:
                if self._dec is None:
                    self._dec = _BUILDERS[self._kind](self._model)
        return self._dec

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        keys, values = cache
        k0 = keys[0]
        if k0.dtype not in (torch.float32, torch.bfloat16) or k0.stride(-1) != 1:
            raise ValueError(f"KV pool must be float32 or bfloat16 with a contiguous head dimension, "
                             f"got {k0.dtype} strides {k0.stride()}")
        shape, strides = k0.shape, k0.stride()
        for name, layers in (("keys", keys), ("values", values)):
            for i, t in enumerate(layers):  # one pool: every layer's view alike
                if t.shape != shape or t.stride() != strides or t.dtype != k0.dtype:
                    raise ValueError(f"KV pool {name}[{i}] is {tuple(t.shape)} {t.dtype} strides {t.stride()}, "
                                     f"unlike layer 0's {tuple(shape)} {k0.dtype} {strides}")
        b = tokens.shape[0]
        if shape[0] < b:
            raise ValueError(f"KV pool views hold {shape[0]} rows, the step has {b}")
        k_ptrs = np.fromiter((t.data_ptr() for t in keys), dtype=np.int64, count=len(keys))
        v_ptrs = np.fromiter((t.data_ptr() for t in values), dtype=np.int64, count=len(values))
        logits = torch.empty(b, self._model.config.vocab_size)
        self._get().step(tokens.to(torch.int64).contiguous().numpy(), positions.to(torch.int64).contiguous().numpy(),
                         k_ptrs, v_ptrs, strides[0], strides[1], strides[2], shape[2],
                         k0.dtype == torch.bfloat16, logits.numpy())
        return logits
