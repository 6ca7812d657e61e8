"""Trains a small MLP with tallow.train.Trainer; run by test_distributed.py
as a plain process, under torchrun, and killed with SIGKILL mid-epoch."""

from __future__ import annotations

import argparse
import os
import signal

import torch


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.TensorDataset(centers[y] + torch.randn(n, 6, generator=g), y)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process at that training micro-batch")
    a = p.parse_args(argv)
    from tallow.train import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(a.dropout),
                                torch.nn.Linear(16, 3))
    calls = {"n": 0}

    def forward(m, batch):
        if m.training:
            calls["n"] += 1
            if calls["n"] == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return m(batch[0]), batch[1]

    tr = Trainer(model, data(203, 0), val_data=data(101, 1), out_dir=a.out, num_classes=3, lr=0.05,
                 optimizer=a.optimizer, schedule="cosine", warmup_steps=2, epochs=a.epochs, batch_size=a.batch_size,
                 grad_accum=a.grad_accum, checkpoint_every=3, keep_last=2, resume="auto", live=False, log_every=1,
                 plots=False, forward=forward)
    tr.fit()
    if tr.info.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.out, "params.safetensors"))


if __name__ == "__main__":
    main()
