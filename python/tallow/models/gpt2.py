"""GPT-2 (Radford et al. 2019) language model on tallow's kernels.

A preallocated KV cache ``[layers, B, heads, max_len, head_dim]`` per
generation; a prefill over the (left-padded) prompts, then one-token decode
steps whose attention reads the cache through strided views (no copies).
Linears run fp32 or INT8 (``quantize="int8"``; the LM head too — at batch 1
it is a third of the bytes read per token).

The KV cache is float32 or bfloat16 (``kv_cache_dtype``): a decode step
streams the whole cache, and bf16 halves those bytes; the attention kernel
reads bf16 keys/values directly and computes in float32. Default: float32
for an fp32 model (logits equal to transformers'), bfloat16 with
``quantize="int8"`` (the model is approximate already; its greedy tokens
match the fp32 cache's on the tests' prompts).

Checkpoints: a Hugging Face ``GPT2LMHeadModel`` directory. GPT-2's
``Conv1D`` stores weights as [in, out]; they are transposed once at load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import attention
from ._checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict, strip_prefix
from .generation import SamplingParams, find_stop, next_tokens
from .layers import Dense, count_parameters, quantize_model
from .tokenizer import Tokenizer

_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf", "relu": "relu"}


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        if d.get("model_type") != "gpt2":
            raise CheckpointError(f"config.json model_type is {d.get('model_type')!r}, expected 'gpt2'")
        act = d.get("activation_function", "gelu_new")
        if act not in _ACT:
            raise CheckpointError(f"unsupported activation_function {act!r}; supported: {sorted(_ACT)}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise CheckpointError(f"config.json sets {flag}, which tallow's GPT-2 does not implement")
        cfg = cls(
            vocab_size=int(d.get("vocab_size", 50257)),
            n_positions=int(d.get("n_positions", 1024)),
            n_embd=int(d.get("n_embd", 768)),
            n_layer=int(d.get("n_layer", 12)),
            n_head=int(d.get("n_head", 12)),
            n_inner=d.get("n_inner"),
            activation_function=act,
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            eos_token_id=int(d["eos_token_id"]) if d.get("eos_token_id") is not None else 50256,
        )
        if cfg.n_embd % cfg.n_head:
            raise CheckpointError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        return cfg

    @property
    def inner(self) -> int:
        return int(self.n_inner) if self.n_inner else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        e, f = self.n_embd, self.inner
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab_size, e),
            "wpe.weight": (self.n_positions, e),
            "ln_f.weight": (e,),
            "ln_f.bias": (e,),
        }
        for i in range(self.n_layer):
            p = f"h.{i}."
            shapes.update({
                p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
                p + "attn.c_attn.weight": (e, 3 * e), p + "attn.c_attn.bias": (3 * e,),
                p + "attn.c_proj.weight": (e, e), p + "attn.c_proj.bias": (e,),
                p + "ln_2.weight": (e,), p + "ln_2.bias": (e,),
                p + "mlp.c_fc.weight": (e, f), p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, e), p + "mlp.c_proj.bias": (e,),
            })
        return shapes


def _layer_norm(sd, prefix: str, dim: int, eps: float) -> torch.nn.LayerNorm:
    ln = torch.nn.LayerNorm(dim, eps=eps)
    ln.load_state_dict({"weight": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]})
    return ln


class GPT2Block(torch.nn.Module):
    def __init__(self, cfg: GPT2Config, sd: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.ln_1 = _layer_norm(sd, prefix + "ln_1", cfg.n_embd, cfg.layer_norm_epsilon)
        # Conv1D weights are [in, out]; Dense wants [out, in].
        self.c_attn = Dense(sd[prefix + "attn.c_attn.weight"].t(), sd[prefix + "attn.c_attn.bias"])
        self.c_proj = Dense(sd[prefix + "attn.c_proj.weight"].t(), sd[prefix + "attn.c_proj.bias"])
        self.ln_2 = _layer_norm(sd, prefix + "ln_2", cfg.n_embd, cfg.layer_norm_epsilon)
        self.c_fc = Dense(sd[prefix + "mlp.c_fc.weight"].t(), sd[prefix + "mlp.c_fc.bias"],
                          activation=_ACT[cfg.activation_function])
        self.mlp_proj = Dense(sd[prefix + "mlp.c_proj.weight"].t(), sd[prefix + "mlp.c_proj.bias"])

    def forward(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                padding: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, T, E] at positions [start, start+T); cache_k/v [B, heads, max_len, d]
        get the new keys/values; attention reads cache[:, :, :start+T]."""
        b, t, e = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        end = start + t
        cache_k[:, :, start:end] = qkv[1]
        cache_v[:, :, start:end] = qkv[2]
        # A prefill from position 0 attends to its own fresh (float32) keys:
        # the same values as the cache's for an fp32 cache, and no float32
        # copy of a bf16 cache. Later steps read the cache itself.
        keys, values = (qkv[1], qkv[2]) if start == 0 else (cache_k[:, :, :end], cache_v[:, :, :end])
        ctx = attention(qkv[0], keys, values, causal=True,
                        key_padding_mask=None if padding is None else padding[:, :end])
        x = x + self.c_proj(ctx.transpose(1, 2).reshape(b, t, e))
        return x + self.mlp_proj(self.c_fc(self.ln_2(x)))


@dataclass
class Generation:
    """One prompt's result."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "eos" or "stop"
    prompt_tokens: int
    time_to_first_token_s: float
    total_s: float


@dataclass
class StreamEvent:
    """One streamed step: the new token of prompt ``index`` and its text delta."""

    index: int
    token_id: int
    text: str
    finish_reason: Optional[str] = None


class GPT2LMHeadModel(torch.nn.Module):
    architecture = "gpt2"

    def __init__(self, cfg: GPT2Config, sd: dict[str, torch.Tensor], tokenizer: Optional[Tokenizer],
                 quantize: Optional[str] = None, kv_cache_dtype: Optional[str] = None):
        super().__init__()
        if kv_cache_dtype is None:
            kv_cache_dtype = "float32" if quantize is None else "bfloat16"
        if kv_cache_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(_KV_DTYPES)}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.config = cfg
        self.tokenizer = tokenizer
        self.wte = torch.nn.Embedding.from_pretrained(sd["wte.weight"].float())
        self.wpe = torch.nn.Embedding.from_pretrained(sd["wpe.weight"].float())
        self.h = torch.nn.ModuleList([GPT2Block(cfg, sd, f"h.{i}.") for i in range(cfg.n_layer)])
        self.ln_f = _layer_norm(sd, "ln_f", cfg.n_embd, cfg.layer_norm_epsilon)
        lm_head = sd.get("lm_head.weight", sd["wte.weight"])  # tied to wte in GPT-2
        self.lm_head = Dense(lm_head, None)
        self.requires_grad_(False)
        self.quantization = quantize_model(self, quantize)

    # -- forward passes ---------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.n_layer, batch, c.n_head, max_len, c.head_dim)
        dtype = _KV_DTYPES[self.kv_cache_dtype]
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

    def _run(self, ids: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], start: int,
             positions: torch.Tensor, padding: Optional[torch.Tensor], last_only: bool) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(positions)
        for i, block in enumerate(self.h):
            x = block(x, cache[0][i], cache[1][i], start, padding)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, T, vocab] for every position (left padding allowed)."""
        b, t = input_ids.shape
        self._check_length(t)
        padding, positions = self._padding_and_positions(attention_mask, b, t)
        return self._run(input_ids, self.new_cache(b, t), 0, positions, padding, last_only=False)

    def _check_length(self, total: int) -> None:
        if total > self.config.n_positions:
            raise ValueError(f"{total} positions exceed GPT-2's context limit of {self.config.n_positions} "
                             "(prompt tokens + max_new_tokens)")

    @staticmethod
    def _padding_and_positions(mask: Optional[torch.Tensor], b: int, t: int):
        if mask is None or bool(mask.all()):
            return None, torch.arange(t).expand(b, t)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # first real token at position 0
        return mask == 0, positions

    # -- generation -----------------------------------------------------------------------

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without tokenizer.json")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of str (wrap a single prompt in a list)")
        return self.tokenizer.encode_ids(prompts)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[StreamEvent]:
        """Streams tokens for a batch of tokenized prompts of different lengths:
        left-padded prefill, then one decode step per token for all unfinished rows."""
        params.validate()
        b = len(prompt_ids)
        if b == 0:
            return
        lengths = [len(p) for p in prompt_ids]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty")
        longest = max(lengths)
        total = longest + params.max_new_tokens
        self._check_length(total)
        vocab = self.config.vocab_size
        for i, p in enumerate(prompt_ids):
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")

        ids = torch.full((b, longest), self.config.eos_token_id, dtype=torch.long)
        mask = torch.zeros((b, total), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, longest - len(p):] = 1  # generated positions are real tokens too
        padding = None if min(lengths) == longest else mask == 0
        positions = (mask[:, :longest].cumsum(-1) - 1).clamp_min(0)
        seen = torch.zeros((b, vocab), dtype=torch.bool)  # for the repetition penalty
        for i, p in enumerate(prompt_ids):
            seen[i, torch.tensor(p, dtype=torch.long)] = True
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(int(params.seed))

        cache = self.new_cache(b, total)
        finished = [False] * b
        emitted = [""] * b  # text already streamed per prompt
        out_ids: list[list[int]] = [[] for _ in range(b)]
        if params.max_new_tokens == 0:
            return
        logits = self._run(ids, cache, 0, positions, padding, last_only=True)[:, -1]
        next_pos = positions[:, -1] + 1
        for step in range(params.max_new_tokens):
            tok = next_tokens(logits.float(), params, seen, generator)
            for i in range(b):
                if finished[i]:
                    continue
                t = int(tok[i])
                out_ids[i].append(t)
                seen[i, t] = True
                reason = None
                if params.stop_at_eos and t == self.config.eos_token_id:
                    reason = "eos"
                    text = self._decode(out_ids[i][:-1])
                else:
                    text = self._decode(out_ids[i])
                    cut = find_stop(text, params.stop) if params.stop else -1
                    if cut >= 0:
                        reason, text = "stop", text[:cut]
                    elif step == params.max_new_tokens - 1:
                        reason = "length"
                    else:
                        text = text[: len(text) - _holdback(text, params.stop)]
                delta = text[len(emitted[i]):] if text.startswith(emitted[i]) else ""
                emitted[i] += delta
                if reason is not None:
                    finished[i] = True
                yield StreamEvent(i, t, delta, reason)
            if all(finished):
                return
            start = longest + step
            logits = self._run(tok[:, None], cache, start, next_pos[:, None], padding, last_only=True)[:, -1]
            next_pos = next_pos + 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Yields the text of one prompt's completion as it is produced."""
        for event in self.generate_ids(self._encode_prompts([prompt]), SamplingParams(**kwargs)):
            if event.text:
                yield event.text

    def generate(self, prompts: Sequence[str], **kwargs) -> list[Generation]:
        """Completes every prompt (batched). kwargs: SamplingParams fields."""
        t0 = time.perf_counter()
        prompt_ids = self._encode_prompts(prompts)
        params = SamplingParams(**kwargs)
        ids: list[list[int]] = [[] for _ in prompt_ids]
        reasons = ["length"] * len(prompt_ids)
        first: list[Optional[float]] = [None] * len(prompt_ids)
        texts = [""] * len(prompt_ids)
        for event in self.generate_ids(prompt_ids, params):
            ids[event.index].append(event.token_id)
            texts[event.index] += event.text
            if first[event.index] is None:
                first[event.index] = time.perf_counter() - t0
            if event.finish_reason:
                reasons[event.index] = event.finish_reason
        total = time.perf_counter() - t0
        return [Generation(texts[i], toks, reasons[i], len(prompt_ids[i]),
                           first[i] if first[i] is not None else total, total)
                for i, toks in enumerate(ids)]

    def num_parameters(self) -> int:
        return count_parameters(self)

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT2LMHeadModel(architecture=gpt2, layers={c.n_layer}, hidden={c.n_embd}, heads={c.n_head}, "
                f"context={c.n_positions}, dtype=float32, quantization={self.quantization or 'none'}, "
                f"kv_cache={self.kv_cache_dtype}, parameters={self.num_parameters():,})")


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to stream yet: an incomplete UTF-8
    sequence (decoded as U+FFFD) or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def load_gpt2(path: str | Path, quantize: Optional[str] = None,
              kv_cache_dtype: Optional[str] = None) -> GPT2LMHeadModel:
    path = Path(path)
    cfg = GPT2Config.from_dict(read_config(path))
    sd = strip_prefix(read_state_dict(path), "transformer.")
    expected = cfg.expected_shapes()
    if "lm_head.weight" in sd:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.n_embd)
    check_state_dict(sd, expected, ignorable=("attn.bias", "attn.masked_bias"), source=str(path))
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer(path, max_length=cfg.n_positions, add_special_tokens=False)
    return GPT2LMHeadModel(cfg, sd, tokenizer, quantize, kv_cache_dtype)
