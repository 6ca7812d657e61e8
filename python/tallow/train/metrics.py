"""Classification metrics kept as counts — loss sum, sample count and a
confusion matrix — so evaluation memory does not grow with the data and the
counts of several processes add up exactly (all_reduce of one tensor)."""

from __future__ import annotations

import torch


class ClassCounts:
    """Loss sum, example count and the confusion matrix [true, predicted]."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.n = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: float | None = None) -> None:
        logits = logits.detach()
        labels = labels.detach().to(torch.long).cpu()
        if loss_sum is None:
            loss_sum = float(torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device),
                                                               reduction="sum"))
        self.loss_sum += float(loss_sum)
        self.n += int(labels.numel())
        pred = logits.argmax(-1).cpu()
        idx = labels * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes).double()

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.loss_sum, float(self.n)], dtype=torch.float64),
                          self.confusion.flatten()])

    @classmethod
    def from_tensor(cls, t: torch.Tensor, num_classes: int) -> "ClassCounts":
        c = cls(num_classes)
        c.loss_sum, c.n = float(t[0]), int(round(float(t[1])))
        c.confusion = t[2:].view(num_classes, num_classes).clone()
        return c

    def state_dict(self) -> dict:
        return {"counts": self.as_tensor()}

    def load_state_dict(self, st: dict) -> None:
        c = ClassCounts.from_tensor(st["counts"], self.num_classes)
        self.loss_sum, self.n, self.confusion = c.loss_sum, c.n, c.confusion

    def reduce(self, info) -> "ClassCounts":
        from .distributed import all_reduce_sum

        return ClassCounts.from_tensor(all_reduce_sum(self.as_tensor(), info), self.num_classes)

    def summary(self, label_names: list[str] | None = None, *, full: bool = False) -> dict:
        cm = self.confusion
        tp = cm.diag()
        fp = cm.sum(0) - tp
        fn = cm.sum(1) - tp
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                         torch.zeros_like(tp))
        present = (tp + fn) > 0  # macro-F1 over the classes that occur in the data
        out = {
            "loss": self.loss_sum / max(self.n, 1),
            "accuracy": float(tp.sum() / max(self.n, 1)),
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
            "n": self.n,
        }
        if full:
            names = label_names or [str(i) for i in range(self.num_classes)]
            out["per_class"] = {names[i]: {"precision": float(precision[i]), "recall": float(recall[i]),
                                           "f1": float(f1[i]), "support": int(tp[i] + fn[i]),
                                           "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])}
                                for i in range(self.num_classes)}
            out["labels"] = names
            out["confusion_matrix"] = cm.to(torch.long).tolist()
        return out
