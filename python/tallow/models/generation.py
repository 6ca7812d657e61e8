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
from typing import Optional, Sequence

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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool (token occurs in prompt or output)."""
    if penalty == 1.0:
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


def next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Picks one token per row from float32 logits [B, V]."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scaled = logits / params.temperature
    if not torch.isfinite(scaled.amax(dim=-1)).all():
        # A temperature so small (a subnormal) that the logits overflow: its limit is greedy.
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1
