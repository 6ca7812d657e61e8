"""Learning-rate schedules as pure functions of the optimizer step: the
learning rate after a resume is computed from the restored step, never
replayed (so it cannot lag an epoch behind)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class Schedule:
    """``constant``; ``linear``: warm-up from 0 to lr over ``warmup_steps``,
    then linear decay to 0 at ``total_steps``; ``cosine``: the same warm-up,
    then half a cosine down to ``min_ratio`` x lr."""

    kind: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.kind!r}")

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            return max(0.0, 1.0 - t)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def lr_at(self, step: int) -> float:
        return self.lr * self.factor(step)

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


def make_optimizer(name: str, params, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")
