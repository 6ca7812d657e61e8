"""GPT-2 (Radford et al. 2019) language model on tallow's kernels.

``forward()`` runs (left-padded) prompts through a KV cache of its own.
Generation runs on ``tallow.models.scheduler.GenerationScheduler``
(iteration-level batching; ``generate_ids`` drives a private one): a KV
pool of slots ``[slots, heads, len, head_dim]`` per layer, ``prefill_rows``
writing right-padded prompts into their slots, ``decode_rows`` feeding one
token per row at that row's own position, attention reading the pool
through strided views with each row's unused positions masked.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ..ops import attention
from ._checkpoint import CheckpointError, check_state_dict, read_config, read_state_dict, strip_prefix
from .generation import SamplingParams
from .decoder_native import NativeDecoder, native_decoder_wanted
from .layers import Dense, count_parameters, quantize_model
from .tokenizer import Tokenizer, read_chat_config

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

    def forward_rows(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write, keys: int,
                     padding: Optional[torch.Tensor]) -> torch.Tensor:
        """One decode step for rows at different positions (iteration-level
        batching): x [B, 1, E]; row b's new key/value go to cache[b, :, pos_b],
        ``write`` = pos (an int: every row at the same position) or the index
        pair (arange(B), positions [B]); attention reads cache[:, :, :keys] (a
        view), ``padding`` [B, keys] (True = not this row's) hiding each
        row's unused positions."""
        b, t, e = x.shape
        qkv = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if isinstance(write, int):
            cache_k[:, :, write] = qkv[1][:, :, 0]
            cache_v[:, :, write] = qkv[2][:, :, 0]
        else:
            cache_k[write[0], :, write[1]] = qkv[1][:, :, 0].to(cache_k.dtype)  # [B, heads, d]
            cache_v[write[0], :, write[1]] = qkv[2][:, :, 0].to(cache_v.dtype)
        ctx = attention(qkv[0], cache_k[:, :, :keys], cache_v[:, :, :keys], causal=True, key_padding_mask=padding)
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
        # The decode step as one native call (decoder_native.py), chosen once here;
        # None keeps the per-op decode_rows below (its reference).
        self.native = NativeDecoder(self, "gpt2") if native_decoder_wanted() else None
        # Chat (tallow.engine.chat): load_gpt2 fills these from the directory's tokenizer files.
        self.chat_template: Optional[str] = None
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as transformers names them
        self.bos_token_id: Optional[int] = None

    @property
    def eos_token_id(self) -> int:
        return self.config.eos_token_id

    # -- forward passes ---------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.n_layer, batch, c.n_head, max_len, c.head_dim)
        dtype = _KV_DTYPES[self.kv_cache_dtype]
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one row takes (keys and values, every layer)."""
        c = self.config
        return 2 * c.n_layer * c.n_embd * _KV_DTYPES[self.kv_cache_dtype].itemsize

    def _run(self, ids: torch.Tensor, cache, start: int, positions: torch.Tensor, padding: Optional[torch.Tensor],
             last_only: bool, take: Optional[torch.Tensor] = None) -> torch.Tensor:
        """cache: (keys, values), each indexable by layer → [B, heads, len, d].
        ``take`` [B]: logits only at position take[b] of row b → [B, 1, vocab]."""
        x = self.wte(ids) + self.wpe(positions)
        for i, block in enumerate(self.h):
            x = block(x, cache[0][i], cache[1][i], start, padding)
        if take is not None:
            x = x[torch.arange(x.shape[0]), take][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))

    @torch.inference_mode()
    def prefill_rows(self, prompts: Sequence[Sequence[int]], cache) -> torch.Tensor:
        """Prefills new rows into KV slots: ``cache`` = (keys, values), each a
        sequence over layers of [n, heads, len, d] views (len >= the longest
        prompt). The prompts are right-padded, so row b's tokens sit at
        positions 0..P_b-1 both in the batch and in its slot: the keys are
        written in place, no copy, and causal attention alone keeps the
        padding out of every real token's context (no key mask). Returns the
        float32 logits [n, vocab] after each prompt's last token."""
        if self.native is not None:
            return self.native.prefill_rows(prompts, cache)
        n, longest = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, longest), self.config.eos_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
        positions = torch.arange(longest).expand(n, longest)
        return self._run(ids, cache, 0, positions, None, False, take=last)[:, 0].float()

    @torch.inference_mode()
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decode step for B rows at their own positions: token b is fed at
        ``positions[b]`` (= the tokens already in row b's slot); ``cache`` as in
        prefill_rows, [B, heads, len, d] per layer. Attention reads the keys up
        to the longest row, each row's unused positions masked. Returns the
        float32 logits [B, vocab]."""
        if self.native is not None:
            return self.native.decode_rows(tokens, positions, cache)
        lo, hi = int(positions.min()), int(positions.max())
        keys, padding, write = hi + 1, None, hi
        if lo < hi:
            padding = torch.arange(keys)[None, :] > positions[:, None]  # [B, keys]
            write = (torch.arange(len(positions)), positions)
        x = self.wte(tokens[:, None]) + self.wpe(positions[:, None])
        for i, block in enumerate(self.h):
            x = block.forward_rows(x, cache[0][i], cache[1][i], write, keys, padding)
        return self.lm_head(self.ln_f(x))[:, 0].float()

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
        """Streams tokens for a batch of tokenized prompts of different lengths,
        on a :class:`~tallow.models.scheduler.GenerationScheduler` of its own:
        one prefill, then one decode step per token for the unfinished rows
        (a finished row leaves the batch). Every row samples with ``params``
        and its own generator: with ``params.seed`` = s, row i's is seeded with
        s + i (so a seeded batch is reproducible, and row 0 draws as a lone
        request with seed s would); unseeded, from torch's default generator."""
        from .scheduler import GenerationScheduler

        params.validate()
        b = len(prompt_ids)
        if b == 0:
            return
        rows = [params] * b
        if params.seed is not None and not params.greedy:
            rows = [replace(params, seed=(int(params.seed) + i + 2**63) % 2**64 - 2**63) for i in range(b)]
        reserve = max(len(p) for p in prompt_ids) + params.max_new_tokens
        sched = GenerationScheduler(self, max_rows=b, kv_budget_bytes=max(1, b * reserve * self.kv_bytes_per_token()),
                                    prefill_tokens_per_step=max(1, b * reserve))
        sched.add(0, prompt_ids, rows)
        while not sched.idle:
            for ev in sched.step():
                if ev.finish_reason == "error":
                    raise RuntimeError(f"generation failed for prompt {ev.row}: {ev.error}")
                if ev.token_id >= 0:
                    yield StreamEvent(ev.row, ev.token_id, ev.text, ev.finish_reason)

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
    model = GPT2LMHeadModel(cfg, sd, tokenizer, quantize, kv_cache_dtype)
    model.chat_template, model.special_tokens = read_chat_config(path)
    bos = read_config(path).get("bos_token_id")
    model.bos_token_id = int(bos) if isinstance(bos, int) else None
    return model
