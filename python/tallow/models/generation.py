"""Token sampling for autoregressive generation: greedy, temperature, top-k,
top-p (nucleus), repetition penalty, and stop conditions.

The processors follow the Hugging Face ``generate`` definitions so that the
same settings give the same distributions:
- repetition penalty (Keskar et al. 2019, CTRL): a logit of a token already in
  the sequence is divided by ``penalty`` if positive, multiplied if negative;
- top-k keeps the k largest logits; top-p keeps the smallest set of tokens
  whose probability mass reaches p (always at least one token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0            # 0 → off
    top_p: float = 1.0        # 1 → off
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    stop_at_eos: bool = True
    seed: Optional[int] = None

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch.Generator's range), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: "float | torch.Tensor") -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool (token occurs in prompt or output);
    penalty a float or a per-row float32 tensor [B, 1] (rows at 1.0 come out
    unchanged, bit for bit: x / 1 and x * 1 are exact)."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets the logits outside the top-k / nucleus to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token; drop a token once the mass before it reaches p.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


GeneratorArg = Union[None, torch.Generator, Sequence[Optional[torch.Generator]]]


def next_tokens(logits: torch.Tensor, params: "SamplingParams | Sequence[SamplingParams]", seen: torch.Tensor,
                generator: GeneratorArg) -> torch.Tensor:
    """Picks one token per row from float32 logits [B, V].

    ``params``: one SamplingParams for every row, or one per row. Rows with
    different settings are processed together: the repetition penalty and
    the temperature as per-row tensors, greedy rows by one argmax, top-k /
    top-p once per group of rows with equal settings. The draw is by inverse
    CDF: one uniform per sampled row, from that row's generator when
    ``generator`` is a sequence (None entries, or ``generator=None``: torch's
    default generator; one Generator: B uniforms from it, row order), then
    one vectorised ``searchsorted`` over the rows' cumulative probabilities
    (the same distribution as ``torch.multinomial``; it draws one number per
    row instead of V, and a row's draw depends only on its own generator).
    Every operation is row-wise, so a row's token does not depend on the
    other rows of the batch.
    """
    b, vocab = logits.shape
    rows = [params] * b if isinstance(params, SamplingParams) else list(params)
    if len(rows) != b:
        raise ValueError(f"next_tokens: {len(rows)} SamplingParams for {b} rows")
    penalties = [p.repetition_penalty for p in rows]
    if any(x != 1.0 for x in penalties):
        pen = penalties[0] if len(set(penalties)) == 1 else torch.tensor(penalties, dtype=logits.dtype)[:, None]
        logits = apply_repetition_penalty(logits, seen, pen)
    sampled = [i for i, p in enumerate(rows) if not p.greedy]
    if len(sampled) < b:
        out = torch.argmax(logits, dim=-1)
    else:
        out = torch.empty(b, dtype=torch.long)
    if not sampled:
        return out
    every = len(sampled) == b
    idx = None if every else torch.tensor(sampled, dtype=torch.long)
    sub = logits if every else logits[idx]
    temps = [rows[i].temperature for i in sampled]
    scaled = sub / (temps[0] if len(set(temps)) == 1 else torch.tensor(temps, dtype=sub.dtype)[:, None])
    # A temperature so small (a subnormal) that the logits overflow: its limit is greedy.
    overflow = ~torch.isfinite(scaled.amax(dim=-1))
    groups: dict[tuple[int, float], list[int]] = {}
    for j, i in enumerate(sampled):
        groups.setdefault((rows[i].top_k, rows[i].top_p), []).append(j)
    for (top_k, top_p), members in groups.items():
        if top_k == 0 and top_p >= 1.0:
            continue
        if len(members) == len(sampled):
            scaled = filter_top_k_top_p(scaled, top_k, top_p)
        else:
            m = torch.tensor(members, dtype=torch.long)
            scaled[m] = filter_top_k_top_p(scaled[m], top_k, top_p)
    cdf = torch.cumsum(torch.softmax(scaled, dim=-1), dim=-1)
    u = _uniforms(sampled, generator)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1].double()).to(cdf.dtype)[:, None], right=True)
    pick = pick.squeeze(-1).clamp_(max=vocab - 1)
    if bool(overflow.any()):
        pick = torch.where(overflow, torch.argmax(sub, dim=-1), pick)
    if every:
        return pick
    out[idx] = pick
    return out


def _uniforms(sampled: list[int], generator: GeneratorArg) -> torch.Tensor:
    """One float64 uniform in [0, 1) per sampled row (see next_tokens)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(len(sampled), dtype=torch.float64, generator=generator)
    return torch.cat([torch.rand(1, dtype=torch.float64, generator=generator[i]) for i in sampled])


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` not to stream yet: an incomplete UTF-8
    sequence (decoded as U+FFFD) or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
