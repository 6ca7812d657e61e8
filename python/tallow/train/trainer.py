"""``Trainer``: supervised classification on ``TrainLoop`` — optimizer
(AdamW, SGD with momentum), learning-rate schedule (constant, linear warm-up
+ decay, cosine), gradient accumulation, metrics as counts (loss, accuracy,
macro-F1, confusion matrix), checkpoints (every N steps, last N kept, the
best by a metric), early stopping, resume, and the outputs metrics.jsonl,
eval.json, run.json and PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import distributed as D
from .loop import StepContext, TrainLoop
from .metrics import ClassCounts
from .schedule import Schedule, make_optimizer


@dataclass
class EarlyStopping:
    """Stops after ``patience`` epochs without an improvement of ``metric``
    (a key of the epoch record, e.g. val_loss, val_accuracy, val_macro_f1)."""

    metric: str = "val_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {self.patience}")


def _better(value: float, best: Optional[float], mode: str, delta: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - delta if mode == "min" else value > best + delta


def default_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a batch (inputs, labels); dict inputs are keyword arguments."""
    x, y = batch[0], batch[-1]
    return (model(**x) if isinstance(x, dict) else model(x)), y


def _to(batch, device):
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class Trainer:
    def __init__(self, model: torch.nn.Module, train_data, *, out_dir: str | Path, num_classes: int,
                 val_data=None, label_names: Optional[list[str]] = None, optimizer: str = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9, schedule: str = "constant",
                 warmup_steps: int = 0, warmup_ratio: float = 0.0, epochs: int = 1, batch_size: int = 32,
                 eval_batch_size: int = 256, grad_accum: int = 1, collate_fn=None,
                 forward: Callable = default_forward, seed: int = 0, checkpoint_every: int = 0,
                 keep_last: int = 2, best_metric: Optional[str] = "val_accuracy", best_mode: str = "max",
                 early_stopping: Optional[EarlyStopping] = None, restore_best: bool = True,
                 resume: Optional[str] = None, live: Optional[bool] = None, log_every: int = 50,
                 run_info: Optional[dict] = None, plots: bool = True, max_grad_norm: float = 0.0,
                 lengths=None):
        lr = float(lr)
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive number, got {lr}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.loop = TrainLoop(out_dir, train_data, batch_size=batch_size, epochs=epochs, collate_fn=collate_fn,
                              seed=seed, grad_accum=grad_accum, checkpoint_every=checkpoint_every,
                              keep_last=keep_last, resume=resume, live=live, log_every=log_every,
                              lengths=lengths, run_info={**(run_info or {}), "optimizer": optimizer, "lr": lr,
                                        "weight_decay": weight_decay, "schedule": schedule,
                                        "num_classes": num_classes, "labels": label_names})
        self.info = self.loop.info
        self.model = model.to(self.info.device)
        self.ddp_model = self.loop.wrap(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
        total = self.loop.total_steps()
        warm = warmup_steps or int(round(warmup_ratio * total))
        self.schedule = Schedule(schedule, lr, total, warm)
        self.num_classes = num_classes
        self.label_names = label_names or [str(i) for i in range(num_classes)]
        self.val_data = val_data
        self.eval_batch_size = eval_batch_size
        self.collate_fn = collate_fn
        self.forward = forward
        self.best_metric, self.best_mode = best_metric, best_mode
        self.early_stopping = early_stopping
        self.restore_best = restore_best
        self.plots = plots
        self.max_grad_norm = max_grad_norm
        self.train_counts = ClassCounts(num_classes)
        self.loop.register(model=self.model, optimizer=self.optimizer, train_counts=self.train_counts)

    @property
    def out_dir(self) -> Path:
        return self.loop.out_dir

    # -- steps ------------------------------------------------------------------------------

    def _step(self, batch, ctx: StepContext) -> None:
        model = self.ddp_model
        model.train()
        batch = _to(batch, self.info.device)
        if ctx.batch % self.loop.grad_accum == 0:
            self.optimizer.zero_grad(set_to_none=True)
        sync_ctx = model.no_sync() if (self.info.enabled and not ctx.sync) else _null()
        with sync_ctx:
            logits, labels = self.forward(model, batch)
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
            # DDP averages gradients over processes: scale so the result is the
            # mean over every sample of the accumulation window, on any world size.
            (loss_sum * (ctx.world_size / ctx.window_count)).backward()
        self.train_counts.update(logits, labels, float(loss_sum.detach()))
        if ctx.sync:
            lr = self.schedule.apply(self.optimizer, ctx.step)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.info.is_main and self.loop.log_every and (ctx.step + 1) % self.loop.log_every == 0:
                rec = {"type": "step", "epoch": ctx.epoch + 1, "step": ctx.step + 1, "lr": lr,
                       "loss": float(loss_sum.detach()) / max(len(labels), 1)}
                self.loop.log(rec)
                self.loop.last_record = {"loss": rec["loss"], "lr": lr}

    @torch.no_grad()
    def evaluate(self, data=None, *, probabilities: bool = False):
        """Counts over ``data`` (default: the validation set), each sample
        seen once over all processes; with ``probabilities`` also returns the
        softmax rows of this process's shard, in shard order."""
        data = self.val_data if data is None else data
        counts = ClassCounts(self.num_classes)
        self.model.eval()
        idx = D.shard_indices(len(data), self.info)
        probs = []
        for i in range(0, len(idx), self.eval_batch_size):
            chunk = idx[i:i + self.eval_batch_size]
            if isinstance(data, torch.utils.data.TensorDataset) and self.collate_fn is None:
                t = torch.as_tensor(chunk)
                batch = tuple(x[t] for x in data.tensors)
            else:
                coll = self.collate_fn or torch.utils.data.default_collate
                batch = coll([data[j] for j in chunk])
            batch = _to(batch, self.info.device)
            logits, labels = self.forward(self.model, batch)
            counts.update(logits, labels)
            if probabilities:
                probs.append(torch.softmax(logits.float(), -1).cpu())
        counts = counts.reduce(self.info)
        if probabilities:
            return counts, (torch.cat(probs) if probs else torch.empty(0, self.num_classes))
        return counts

    def _epoch_end(self, epoch: int) -> dict:
        rec = {"lr": self.schedule.lr_at(max(self.loop.pos["step"] - 1, 0))}
        train = self.train_counts.reduce(self.info).summary()
        rec.update({f"train_{k}": v for k, v in train.items() if k != "n"})
        self.train_counts.__init__(self.num_classes)
        if self.val_data is not None:
            val = self.evaluate().summary()
            rec.update({f"val_{k}": v for k, v in val.items() if k != "n"})
        ex = self.loop.extra
        if self.best_metric and self.best_metric in rec:
            value = rec[self.best_metric]
            if _better(value, ex.get("best_value"), self.best_mode):
                ex["best_value"], ex["best_epoch"] = value, epoch + 1
                self.loop.save_checkpoint("best")
        es = self.early_stopping
        if es is not None:
            if es.metric not in rec:
                raise ValueError(f"early stopping metric {es.metric!r} is not in the epoch record "
                                 f"(available: {', '.join(k for k in rec if k != 'type')})")
            if _better(rec[es.metric], ex.get("es_best"), es.mode, es.min_delta):
                ex["es_best"], ex["es_bad"] = rec[es.metric], 0
            else:
                ex["es_bad"] = ex.get("es_bad", 0) + 1
                if ex["es_bad"] >= es.patience:
                    self.loop.stop_requested = True
                    rec["early_stopped"] = True
                    self.loop.message(f"early stopping: {es.metric} has not improved for {es.patience} epochs")
        return rec

    def fit(self) -> dict:
        """Trains; writes metrics.jsonl, run.json, checkpoints, eval.json and plots.
        Returns eval.json's content (empty without validation data)."""
        self.loop.run(self._step, epoch_end=self._epoch_end)
        ex = self.loop.extra
        best = self.out_dir / "checkpoints" / "best"
        restored = False
        if self.restore_best and self.val_data is not None and ex.get("best_epoch"):
            from .state import load_state

            D.barrier(self.info)
            self.model.load_state_dict(load_state(best)["objects"]["model"])
            restored = True
        result: dict[str, Any] = {}
        if self.val_data is not None:
            counts = self.evaluate()
            result = {"val": counts.summary(self.label_names, full=True),
                      "epoch": ex.get("best_epoch") if restored else self.loop.pos["epoch"],
                      "restored_best": restored, "best_metric": self.best_metric}
        if self.info.is_main:
            (self.out_dir / "eval.json").write_text(json.dumps(result, indent=2))
            if self.plots:
                from .plots import plot_run

                plot_run(self.out_dir, result.get("val"))
        D.barrier(self.info)
        return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
