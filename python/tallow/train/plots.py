"""PNG plots of a run from its metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .._extras import import_extra


def read_metrics(out_dir: str | Path) -> list[dict]:
    p = Path(out_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_run(out_dir: str | Path, val: Optional[dict] = None) -> list[Path]:
    matplotlib = import_extra("matplotlib", "train", "plot_run (training plots)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    recs = read_metrics(out_dir)
    epochs = [r for r in recs if r.get("type") == "epoch"]
    steps = [r for r in recs if r.get("type") == "step"]
    written = []
    if epochs:
        skip = {"type", "epoch", "step", "samples", "seconds", "lr", "early_stopped"}
        names = []
        for r in epochs:
            for k, v in r.items():
                if k in skip or not isinstance(v, (int, float)):
                    continue
                base = k.split("_", 1)[1] if k.startswith(("train_", "val_")) else k
                if base not in names:
                    names.append(base)
        names = names[:6]
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        for name, ax in zip(names, axes[0]):
            for key in (f"train_{name}", f"val_{name}", name):
                pts = [(r["epoch"], r[key]) for r in epochs if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, label=key)
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "curves.png", dpi=90)
        plt.close(fig)
        written.append(out_dir / "curves.png")
    lrs = [(s["step"], s["lr"]) for s in steps if "lr" in s]
    if lrs:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(*zip(*lrs))
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        fig.tight_layout()
        fig.savefig(out_dir / "lr.png", dpi=90)
        plt.close(fig)
        written.append(out_dir / "lr.png")
    if val and "confusion_matrix" in val:
        cm = val["confusion_matrix"]
        names = val["labels"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1 + 0.6 * len(names)))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "confusion.png", dpi=90)
        plt.close(fig)
        written.append(out_dir / "confusion.png")
    return written
