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

import math
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
    # Token ids that end this row besides the model's eos (a chat template's
    # end of turn, e.g. <|im_end|> on a model whose eos is another token):
    # finish_reason "stop", the token itself not streamed. Honoured even with
    # stop_at_eos=False (they are the caller's, not the model's).
    stop_token_ids: Sequence[int] = field(default_factory=tuple)

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
        if isinstance(self.stop_token_ids, int) and not isinstance(self.stop_token_ids, bool):
            self.stop_token_ids = (self.stop_token_ids,)
        try:
            ids = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must hold int token ids >= 0, got {t!r}")
        self.stop_token_ids = ids

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


# Top-p without top-k, without sorting the vocabulary (a full sort of 32 rows
# of GPT-2's 50257 logits took ~150 ms on one Zen 3 core, longer than the
# decode step): a radix-select. Bucket the tokens by log2 of their
# probability relative to the row's largest, 1/64 bit wide (the last bucket
# takes everything below 2^-48), add up each bucket's mass (float64): every
# token in a bucket before the one where the running mass reaches p is kept
# (the mass before it is < p), every token after it dropped, and only that
# edge bucket's tokens (a few to a few hundred) are sorted to place the cut.
_BUCKETS_PER_BIT, _BUCKET_BITS = 64, 48

def top_k_top_p_candidates(logits: torch.Tensor, top_k: int,
                           top_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The tokens top-k then top-p (Hugging Face's order and definitions)
    keep from ``logits`` [n, V], as ``(values, ids)``: with top-k, the k
    largest logits [n, k] (descending; -inf where top-p then drops one) and
    their token ids; otherwise all V logits, -inf outside the nucleus, and
    ids None (vocabulary order)."""
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        vals, ids = torch.topk(logits, top_k, dim=-1)
        if top_p < 1.0:  # top-p over the renormalised top-k: sorted already
            probs = torch.softmax(vals.double(), dim=-1)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the mass before a token reached p
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        return vals, ids
    if top_p >= 1.0:
        return logits, None
    return torch.where(_top_p_keep(logits, top_p), logits, float("-inf")), None


def _top_p_keep(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus of each row of ``logits`` [n, V] as a bool mask (see _BUCKETS_PER_BIT)."""
    n = logits.shape[0]
    nb = _BUCKETS_PER_BIT * _BUCKET_BITS
    top = logits.amax(dim=-1, keepdim=True)
    shifted = logits - top  # <= 0
    # float32 probabilities and bucket sums (a bucket's tokens are within 2^(1/64)
    # of each other), float64 sums over the buckets: with the running mass in
    # float32 the cut at p = 0.999 moved by a token; converting the whole
    # vocabulary to float64 doubled the cost.
    weights = torch.exp(shifted)
    bucket = shifted.mul_(-_BUCKETS_PER_BIT / math.log(2)).nan_to_num_(nan=nb - 1).clamp_(max=nb - 1).long()
    mass = torch.zeros(n, nb, dtype=torch.float32).scatter_add_(1, bucket, weights).double()
    total = mass.sum(dim=-1, keepdim=True)
    cum = torch.cumsum(mass, dim=-1).div_(total)
    edge_b = (cum < top_p).sum(dim=-1, keepdim=True).clamp_(max=nb - 1)  # the bucket where the mass reaches p
    before = torch.where(edge_b > 0, cum.gather(1, (edge_b - 1).clamp(min=0)), torch.zeros_like(cum[:, :1]))
    keep = bucket < edge_b
    edge = bucket == edge_b
    width = int(edge.sum(dim=-1).max())
    vals, ids = torch.topk(torch.where(edge, logits, float("-inf")), width, dim=-1)  # the edge tokens, descending
    in_edge = edge.gather(1, ids)
    p_edge = weights.gather(1, ids).double().div_(total) * in_edge
    keep_edge = in_edge & ((before + torch.cumsum(p_edge, dim=-1) - p_edge) < top_p)
    return keep.scatter_(1, ids, keep.gather(1, ids) | keep_edge)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets the logits outside the top-k / nucleus to -inf (top_k_top_p_candidates, scattered back)."""
    vals, ids = top_k_top_p_candidates(logits, top_k, top_p)
    return vals if ids is None else torch.full_like(logits, float("-inf")).scatter(-1, ids, vals)


GeneratorArg = Union[None, torch.Generator, Sequence[Optional[torch.Generator]]]


def next_tokens(logits: torch.Tensor, params: "SamplingParams | Sequence[SamplingParams]", seen: torch.Tensor,
                generator: GeneratorArg) -> torch.Tensor:
    """Picks one token per row from float32 logits [B, V].

    ``params``: one SamplingParams for every row, or one per row. Rows with
    different settings are processed together: the repetition penalty and
    the temperature as per-row tensors, greedy rows by one argmax, top-k /
    top-p once per group of rows with equal settings, on the candidates
    top_k_top_p_candidates keeps (not a sorted copy of the vocabulary). The draw is by inverse
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
    if all(t == 1.0 for t in temps):
        scaled = sub
    else:
        scaled = sub / (temps[0] if len(set(temps)) == 1 else torch.tensor(temps, dtype=sub.dtype)[:, None])
    # A temperature so small (a subnormal) that the logits overflow: its limit is greedy.
    overflow = ~torch.isfinite(scaled.amax(dim=-1))
    groups: dict[tuple[int, float], list[int]] = {}
    for j, i in enumerate(sampled):
        groups.setdefault((rows[i].top_k, rows[i].top_p), []).append(j)
    u = _uniforms(sampled, generator)
    pick = torch.empty(len(sampled), dtype=torch.long)
    for (top_k, top_p), members in groups.items():
        m = None if len(members) == len(sampled) else torch.tensor(members, dtype=torch.long)
        vals, ids = top_k_top_p_candidates(scaled if m is None else scaled[m], top_k, top_p)
        at = slice(None) if m is None else m
        # inverse CDF over the row's candidates (the same distribution as torch.multinomial)
        cdf = torch.cumsum(torch.softmax(vals, dim=-1), dim=-1)
        j = torch.searchsorted(cdf, (u[at] * cdf[:, -1].double()).to(cdf.dtype)[:, None], right=True)
        j = j.clamp_(max=vals.shape[-1] - 1)
        pick[at] = (j if ids is None else ids.gather(-1, j)).squeeze(-1)
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
