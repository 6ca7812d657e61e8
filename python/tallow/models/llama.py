"""Llama-family decoders (Touvron et al. 2023) on tallow's kernels: Llama,
Mistral, SmolLM (plain Llama) and Qwen2 (bias on the Q/K/V projections).

Pre-norm blocks: RMSNorm → grouped-query attention with rotary position
embeddings (RoPE, Su et al. 2021; the "rotate half" layout of Hugging Face
checkpoints) → residual → RMSNorm → SwiGLU MLP (Shazeer 2020) → residual;
a final RMSNorm and the LM head (tied to the token embedding or not).

Generation runs on ``tallow.models.scheduler.GenerationScheduler`` exactly
as GPT-2's does (the scheduler's model interface: ``prefill_rows``,
``decode_rows``, ``new_cache``, ``kv_bytes_per_token``, ``config``,
``tokenizer``). The KV pool holds the *key/value* heads only
(``[slots, kv_heads, len, head_dim]`` per layer): grouped-query attention
shares each of them between ``heads / kv_heads`` query heads, so the pool is
that many times smaller than GPT-2's for the same width.

Attention on tallow's kernel, which wants q, k and v with the same number of
heads: a prefill repeats each key/value head for its query heads (a copy of
the prompt's keys only); a decode step folds the query heads of a group into
the query-length axis (q ``[B, kv_heads, group, d]`` against the cache
``[B, kv_heads, keys, d]``, no causal mask: every cached key is in the past),
so the cache is read in place, bf16 included (the kernel's decode path,
group <= 4: Llama-3 and SmolLM2 have 4 and 3; a larger group is correct but
makes the kernel widen a bf16 cache to fp32 first).

The fused projections (Q/K/V in one Dense, gate and up in another) are one
GEMM each instead of three / two; INT8 quantizes weights and activations
per block of 32 input features (tallow.ops.int8_block), so the fusion
changes nothing in the quantized weights.

Checkpoints: a Hugging Face directory (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``; config.json, safetensors) via
:func:`load_llama`, or a GGUF file via :mod:`tallow.models.gguf`, which maps
its tensors to the same names (and undoes llama.cpp's Q/K row permutation)
before this module checks and loads them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import attention
from ._checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict, strip_prefix
from .gpt2 import GPT2LMHeadModel
from .decoder_native import NativeDecoder, native_decoder_wanted
from .layers import Dense, count_parameters, quantize_model
from .tokenizer import Tokenizer, read_chat_config

_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LlamaConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None   # {"rope_type": "linear"|"llama3", "factor": ...}
    attention_bias: bool = False          # bias on q/k/v (Qwen2: always; Llama: attention_bias, also on o_proj)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None  # Mistral: attention window; the context is capped to it
    bos_token_id: Optional[int] = None
    eos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = field(default=())  # every id that ends a generation (eos first)
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if not self.eos_token_ids:
            self.eos_token_ids = (self.eos_token_id,)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face config.json (transformers 4 or 5 layout)."""
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise CheckpointError(f"config.json model_type is {mt!r}, expected one of {list(MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"config.json hidden_act is {act!r}; tallow's Llama implements 'silu' (SwiGLU)")
        if int(d.get("pretraining_tp", 1) or 1) != 1:
            raise CheckpointError("config.json sets pretraining_tp != 1, which tallow's Llama does not implement")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            rope = d.get("rope_parameters") or {}
            scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
            eos = d.get("eos_token_id")
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
            window = d.get("sliding_window") if (mt == "mistral" or d.get("use_sliding_window")) else None
            cfg = cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=dict(scaling) if scaling else None,
                attention_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
                o_proj_bias=mt != "qwen2" and bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
                eos_token_id=eos_ids[0] if eos_ids else 2,
                eos_token_ids=eos_ids,
                pad_token_id=None if d.get("pad_token_id") is None else int(d["pad_token_id"]),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks {exc.args[0]!r}, which a {mt} model needs") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json has a malformed value: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim {self.head_dim} is odd: RoPE rotates pairs of dimensions")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in _ROPE_TYPES:
                raise CheckpointError(f"rope scaling type {kind!r} is not implemented (supported: {list(_ROPE_TYPES)})")

    # -- the names the scheduler and the server read (GPT-2's) ------------------------------

    @property
    def n_positions(self) -> int:
        """The context limit: max_position_embeddings, capped to Mistral's sliding
        window (within the window, windowed attention is full attention)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.num_key_value_heads

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (self.vocab_size, e), "norm.weight": (e,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, e)
        for i in range(self.num_hidden_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
                p + "self_attn.q_proj.weight": (q, e), p + "self_attn.k_proj.weight": (kv, e),
                p + "self_attn.v_proj.weight": (kv, e), p + "self_attn.o_proj.weight": (e, q),
                p + "mlp.gate_proj.weight": (f, e), p + "mlp.up_proj.weight": (f, e),
                p + "mlp.down_proj.weight": (e, f),
            })
            if self.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.o_proj_bias:
                shapes[p + "self_attn.o_proj.bias"] = (e,)
            if self.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                               p + "mlp.down_proj.bias": (e,)})
        return shapes


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2], as transformers computes them
    (float32; 'linear' divides by the factor; 'llama3' is Llama 3.1's
    wavelength-dependent interpolation)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind, factor = s.get("rope_type", s.get("type")), float(s.get("factor", 1.0))
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), in float32."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout: x [B, H, T, d], cos/sin [B, 1, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _cat_bias(sd, names: Sequence[str]) -> Optional[torch.Tensor]:
    present = [n in sd for n in names]
    if not any(present):
        return None
    return torch.cat([sd[n].float() if n in sd else torch.zeros(sd[n.replace(".bias", ".weight")].shape[0])
                      for n in names])


class LlamaBlock(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.group = self.n_head // self.n_kv
        a, m = prefix + "self_attn.", prefix + "mlp."
        self.input_layernorm = RMSNorm(sd[prefix + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = [a + "q_proj", a + "k_proj", a + "v_proj"]
        self.qkv_proj = Dense(torch.cat([sd[n + ".weight"] for n in qkv]), _cat_bias(sd, [n + ".bias" for n in qkv]))
        self.o_proj = Dense(sd[a + "o_proj.weight"], sd.get(a + "o_proj.bias"))
        self.post_attention_layernorm = RMSNorm(sd[prefix + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gu = [m + "gate_proj", m + "up_proj"]
        self.gate_up_proj = Dense(torch.cat([sd[n + ".weight"] for n in gu]), _cat_bias(sd, [n + ".bias" for n in gu]))
        self.down_proj = Dense(sd[m + "down_proj.weight"], sd.get(m + "down_proj.bias"))
        self.intermediate = cfg.intermediate_size

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, E] → q [B, heads, T, d], k and v [B, kv_heads, T, d], q and k rotated."""
        b, t, _ = x.shape
        d, hq, hk = self.head_dim, self.n_head * self.head_dim, self.n_kv * self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        q = qkv[..., :hq].view(b, t, self.n_head, d).transpose(1, 2)
        k = qkv[..., hq:hq + hk].view(b, t, self.n_kv, d).transpose(1, 2)
        v = qkv[..., hq + hk:].view(b, t, self.n_kv, d).transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _finish(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [B, T, heads * d] → the block's output (attention out, residual, MLP, residual)."""
        x = x + self.o_proj(ctx)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).split(self.intermediate, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: Optional[torch.Tensor],
                cache_v: Optional[torch.Tensor], padding: Optional[torch.Tensor]) -> torch.Tensor:
        """A prompt from position 0: x [B, T, E]; its keys/values are written to
        cache[:, :, :T] when a cache is given; causal attention over them."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if cache_k is not None:
            cache_k[:, :, :t] = k
            cache_v[:, :, :t] = v
        if self.group > 1:  # query head h reads key/value head h // group (transformers' repeat_kv)
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        ctx = attention(q, k, v, causal=True, key_padding_mask=padding)  # [B, heads, T, d]
        return self._finish(x, ctx.transpose(1, 2).reshape(b, t, -1))

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, write, keys: int, padding: Optional[torch.Tensor]) -> torch.Tensor:
        """One decode step, rows at their own positions (as GPT2Block.forward_rows):
        x [B, 1, E]; ``write`` = one position for every row, or (arange(B), positions)."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        if isinstance(write, int):
            cache_k[:, :, write] = k[:, :, 0]
            cache_v[:, :, write] = v[:, :, 0]
        else:
            cache_k[write[0], :, write[1]] = k[:, :, 0].to(cache_k.dtype)  # [B, kv_heads, d]
            cache_v[write[0], :, write[1]] = v[:, :, 0].to(cache_v.dtype)
        # The group's query heads as the query-length axis: [B, kv_heads, group, d]. No causal
        # mask: every key up to ``keys`` is at or before each row's position (padding hides the rest).
        qg = q.reshape(b, self.n_kv, self.group, self.head_dim)
        ctx = attention(qg, cache_k[:, :, :keys], cache_v[:, :, :keys], causal=False, key_padding_mask=padding)
        return self._finish(x, ctx.reshape(b, 1, -1))


class LlamaForCausalLM(torch.nn.Module):
    """A Llama-family causal LM. ``tokenizer``: a :class:`~tallow.models.Tokenizer`
    (or the GGUF one); ``chat_template``: the model's Jinja chat template, if any."""

    def __init__(self, cfg: LlamaConfig, sd: dict[str, torch.Tensor], tokenizer: Optional[Tokenizer],
                 quantize: Optional[str] = None, kv_cache_dtype: Optional[str] = None,
                 chat_template: Optional[str] = None, special_tokens: Optional[dict[str, str]] = None):
        super().__init__()
        if kv_cache_dtype is None:
            kv_cache_dtype = "float32" if quantize is None else "bfloat16"
        if kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(_KV_DTYPES)}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.config = cfg
        self.architecture = cfg.model_type
        self.tokenizer = tokenizer
        if chat_template is not None and tokenizer is not None:
            tokenizer.chat_template = chat_template  # travels with the tokenizer to the server process
        self._chat_template = chat_template
        self._special_tokens = special_tokens
        self.embed_tokens = torch.nn.Embedding.from_pretrained(sd["embed_tokens.weight"].float())
        self.layers = torch.nn.ModuleList([LlamaBlock(cfg, sd, f"layers.{i}.") for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(sd["norm.weight"], cfg.rms_norm_eps)
        self.lm_head = Dense(sd["lm_head.weight"] if not cfg.tie_word_embeddings else sd["embed_tokens.weight"], None)
        # cos/sin tables [n_positions, d] (float32, transformers' formula: cat(freqs, freqs))
        freqs = torch.arange(cfg.n_positions, dtype=torch.int64).float()[:, None] * rope_inv_freq(cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        self.requires_grad_(False)
        # INT8 quantizes weights and activations per block of 32 features
        # (tallow.ops.int8_block): one scale per activation row cannot hold the few
        # outlier channels of these hidden states, nor one per weight row the
        # 4-bit blocks GGUF weights came from.
        self.quantization = quantize_model(self, quantize, blocks=True)
        # The decode step as one native call (decoder_native.py), chosen once here;
        # None keeps the per-op decode_rows below (its reference).
        self.native = NativeDecoder(self, "llama") if native_decoder_wanted() else None

    # -- what chat templates and the server read ----------------------------------------------

    @property
    def chat_template(self) -> Optional[str]:
        return self._chat_template

    @property
    def eos_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.config.bos_token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", "eos_token": "</s>", ...}: the strings chat templates
        use; from tokenizer_config.json for a Hugging Face directory, else (GGUF)
        the tokens of the ids the config names."""
        if self._special_tokens:
            return dict(self._special_tokens)
        tok = getattr(self.tokenizer, "_tok", None)
        out = {}
        for name, i in (("bos_token", self.config.bos_token_id), ("eos_token", self.config.eos_token_id),
                        ("pad_token", self.config.pad_token_id)):
            if i is not None and tok is not None and tok.id_to_token(i) is not None:
                out[name] = tok.id_to_token(i)
        return out

    # -- the scheduler's model interface --------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        dtype = _KV_DTYPES[self.kv_cache_dtype]
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * _KV_DTYPES[self.kv_cache_dtype].itemsize

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] → cos, sin [B, 1, T, d]."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache, padding: Optional[torch.Tensor],
             take: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(ids)
        cos, sin = self._rope(positions)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, None if cache is None else cache[0][i], None if cache is None else cache[1][i],
                      padding)
        if take is not None:
            x = x[torch.arange(x.shape[0]), take][:, None]
        return self.lm_head(self.norm(x))

    @torch.inference_mode()
    def prefill_rows(self, prompts: Sequence[Sequence[int]], cache) -> torch.Tensor:
        """As GPT2LMHeadModel.prefill_rows: right-padded prompts from position 0,
        keys written into the slots in place; the float32 logits [n, vocab]
        after each prompt's last token."""
        if self.native is not None:
            return self.native.prefill_rows(prompts, cache)
        n, longest = len(prompts), max(len(p) for p in prompts)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_id
        ids = torch.full((n, longest), pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
        positions = torch.arange(longest).expand(n, longest)
        return self._run(ids, positions, cache, None, take=last)[:, 0].float()

    @torch.inference_mode()
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """As GPT2LMHeadModel.decode_rows: token b at positions[b]; the float32 logits [B, vocab]."""
        if self.native is not None:
            return self.native.decode_rows(tokens, positions, cache)
        lo, hi = int(positions.min()), int(positions.max())
        keys, padding, write = hi + 1, None, hi
        if lo < hi:
            padding = torch.arange(keys)[None, :] > positions[:, None]  # [B, keys]
            write = (torch.arange(len(positions)), positions)
        x = self.embed_tokens(tokens[:, None])
        cos, sin = self._rope(positions[:, None])
        for i, block in enumerate(self.layers):
            x = block.forward_rows(x, cos, sin, cache[0][i], cache[1][i], write, keys, padding)
        return self.lm_head(self.norm(x))[:, 0].float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab] for every position (left padding allowed)."""
        b, t = input_ids.shape
        self._check_length(t)
        padding, positions = GPT2LMHeadModel._padding_and_positions(attention_mask, b, t)
        return self._run(input_ids, positions, None, padding)

    def _check_length(self, total: int) -> None:
        if total > self.config.n_positions:
            raise ValueError(f"{total} positions exceed the model's context limit of {self.config.n_positions} "
                             "(prompt tokens + max_new_tokens)")

    # -- generation: GPT-2's, which needs only the scheduler interface above and the tokenizer --

    _encode_prompts = GPT2LMHeadModel._encode_prompts
    generate_ids = GPT2LMHeadModel.generate_ids
    _decode = GPT2LMHeadModel._decode
    stream = GPT2LMHeadModel.stream
    generate = GPT2LMHeadModel.generate

    def num_parameters(self) -> int:
        return count_parameters(self)

    def __repr__(self) -> str:
        c = self.config
        return (f"LlamaForCausalLM(architecture={c.model_type}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}, kv_heads={c.num_key_value_heads}, context={c.n_positions}, "
                f"dtype=float32, quantization={self.quantization or 'none'}, kv_cache={self.kv_cache_dtype}, "
                f"parameters={self.num_parameters():,})")


def build_llama(cfg: LlamaConfig, sd: dict[str, torch.Tensor], tokenizer, *, source: str,
                quantize: Optional[str] = None, kv_cache_dtype: Optional[str] = None,
                chat_template: Optional[str] = None, special_tokens: Optional[dict[str, str]] = None
                ) -> LlamaForCausalLM:
    """Checks every tensor's name and shape against ``cfg`` (a CheckpointError
    names each one that is missing, unexpected or mis-shaped), then builds the model."""
    expected = cfg.expected_shapes()
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    check_state_dict(sd, expected, ignorable=("rotary_emb.inv_freq",), source=source)
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        cfg = _untie(cfg)
    return LlamaForCausalLM(cfg, sd, tokenizer, quantize, kv_cache_dtype, chat_template, special_tokens)


def _untie(cfg: LlamaConfig) -> LlamaConfig:
    from dataclasses import replace

    return replace(cfg, tie_word_embeddings=False)


def _generation_eos(path: Path) -> tuple[int, ...]:
    """generation_config.json's eos ids (Llama 3 Instruct lists several there)."""
    gc = path / "generation_config.json"
    if not gc.is_file():
        return ()
    try:
        eos = json.loads(gc.read_text()).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(gc)!r} is not valid JSON: {exc}") from exc
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))


def load_llama(path: str | Path, quantize: Optional[str] = None,
               kv_cache_dtype: Optional[str] = None) -> LlamaForCausalLM:
    """A Hugging Face Llama / Mistral / Qwen2 causal-LM directory (config.json,
    safetensors; tokenizer.json and the chat template when present)."""
    path = Path(path)
    cfg = LlamaConfig.from_dict(read_config(path))
    extra = [e for e in _generation_eos(path) if e not in cfg.eos_token_ids]
    if extra:
        cfg.eos_token_ids = cfg.eos_token_ids + tuple(extra)
    sd = strip_prefix(read_state_dict(path), "model.")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        # add_special_tokens: a tokenizer that prepends BOS (Llama 2/3) does so, as transformers' does
        tokenizer = Tokenizer(path, max_length=cfg.n_positions, add_special_tokens=True)
    template, special = read_chat_config(path)
    return build_llama(cfg, sd, tokenizer, source=str(path), quantize=quantize, kv_cache_dtype=kv_cache_dtype,
                       chat_template=template, special_tokens=special)
