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
LM head — runs in C++ (csrc/decoder/) on tallow's pool. ``prefill_rows`` too:
the prompts packed back to back (no padding), causal attention over each
row's own keys, the LM head on each row's last token only. No torch op runs
in between, so torch's OpenMP team cannot fight tallow's pool for the cores
whatever the import order.

The per-op ``decode_rows`` stays the reference this path is tested against
(``TALLOW_DECODER=ops`` or ``TALLOW_BACKEND=ref`` keep it, for prefill too). Weights: fp32
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

    @staticmethod
    def _pool(cache, rows: int):
        """(k_ptrs, v_ptrs, strides, length, bf16) of the scheduler's per-layer
        pool views, checked alike (one pool: every layer's view the same)."""
        keys, values = cache
        k0 = keys[0]
        if k0.dtype not in (torch.float32, torch.bfloat16) or k0.stride(-1) != 1:
            raise ValueError(f"KV pool must be float32 or bfloat16 with a contiguous head dimension, "
                             f"got {k0.dtype} strides {k0.stride()}")
        shape, strides = k0.shape, k0.stride()
        for name, layers in (("keys", keys), ("values", values)):
            for i, t in enumerate(layers):
                if t.shape != shape or t.stride() != strides or t.dtype != k0.dtype:
                    raise ValueError(f"KV pool {name}[{i}] is {tuple(t.shape)} {t.dtype} strides {t.stride()}, "
                                     f"unlike layer 0's {tuple(shape)} {k0.dtype} {strides}")
        if shape[0] < rows:
            raise ValueError(f"KV pool views hold {shape[0]} rows, the step has {rows}")
        k_ptrs = np.fromiter((t.data_ptr() for t in keys), dtype=np.int64, count=len(keys))
        v_ptrs = np.fromiter((t.data_ptr() for t in values), dtype=np.int64, count=len(values))
        return k_ptrs, v_ptrs, strides[0], strides[1], strides[2], shape[2], k0.dtype == torch.bfloat16

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decode step: token b at positions[b]; float32 logits [B, vocab]."""
        b = tokens.shape[0]
        logits = torch.empty(b, self._model.config.vocab_size)
        self._get().step(tokens.to(torch.int64).contiguous().numpy(), positions.to(torch.int64).contiguous().numpy(),
                         *self._pool(cache, b), logits.numpy())
        return logits

    def prefill_rows(self, prompts, cache) -> torch.Tensor:
        """Prompts from position 0 into slots 0..n-1 of the pool views, packed
        (no padding); float32 logits [n, vocab] after each prompt's last token."""
        lengths = [len(p) for p in prompts]
        cu = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu[1:])
        flat = np.fromiter((t for p in prompts for t in p), dtype=np.int64, count=int(cu[-1]))
        logits = torch.empty(len(prompts), self._model.config.vocab_size)
        self._get().prefill(flat, cu, *self._pool(cache, len(prompts)), logits.numpy())
        return logits
