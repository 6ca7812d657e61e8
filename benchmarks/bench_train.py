"""tallow.train's Trainer against plain PyTorch loops on the same model,
data, optimizer and batch size (issue 12: >= 0.95x the samples/s).

    python benchmarks/bench_train.py [--quick]

Each call trains the digits ConvNet (tallow.train.vision.DigitsConvNet,
scikit-learn's 1,797 8x8 digits, 80 % train split) for 2 or 10 epochs from the
same initial weights with AdamW: the Trainer with its defaults (metrics as
counts, a checkpoint at every epoch end, metrics.jsonl, plain progress lines
to a null stream) against

- "plain loop (tensor indexing)": a hand-written loop that shuffles with
  torch.randperm and indexes the tensors (the fastest plain loop), and
- "plain loop (DataLoader)": the textbook loop over
  DataLoader(TensorDataset, shuffle=True).

Providers run interleaved (harness.py); unit: training samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import tallow  # noqa: F401  (first: OMP_WAIT_POLICY before torch loads libgomp)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Agreement, Case, run_suite  # noqa: E402

from tallow.train import Trainer  # noqa: E402
from tallow.train.vision import DigitsConvNet, digits_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    batch = 64
    (xt, yt), _ = digits_split(0)
    torch.manual_seed(0)
    init = DigitsConvNet().state_dict()
    tmp = tempfile.TemporaryDirectory()

    def fresh():
        m = DigitsConvNet()
        m.load_state_dict(init)
        return m

    def trainer(epochs):
        with contextlib.redirect_stdout(io.StringIO()):
            Trainer(fresh(), torch.utils.data.TensorDataset(xt, yt), out_dir=tempfile.mkdtemp(dir=tmp.name),
                    num_classes=10, lr=2e-3,
                    epochs=epochs, batch_size=batch, live=False, plots=False).fit()

    def plain_indexing(epochs):
        m = fresh()
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        for _ in range(epochs):
            perm = torch.randperm(len(yt))
            for i in range(0, len(yt), batch):
                idx = perm[i:i + batch]
                loss = F.cross_entropy(m(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    def plain_dataloader(epochs):
        m = fresh()
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=batch, shuffle=True)
        for _ in range(epochs):
            for x, y in loader:
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    cases = []
    for n_epochs in ([1] if args.quick else [2, 10]):
        def run(fn, n=n_epochs):
            return lambda: fn(n)
        cases.append(Case(f"digits convnet {n_epochs} epochs b{batch}",
                          {"tallow Trainer": run(trainer), "plain loop (tensor indexing)": run(plain_indexing),
                           "plain loop (DataLoader)": run(plain_dataloader)},
                          work=n_epochs * len(yt), unit="samples/s", params={"epochs": n_epochs, "batch_size": batch},
                          warmup=1, min_reps=3 if args.quick else 11,
                          agreement=Agreement(skip="training runs with their own shuffles: the outputs are "
                                                   "trained models, compared by accuracy in tests/train, not "
                                                   "elementwise; this case times samples/s")))
    rows = run_suite("train", cases, min_time=0.5 if args.quick else 10.0)
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = next(r for r in rows if r["case"] == case and r["provider"] == "tallow Trainer")
        for r in rows:
            if r["case"] == case and r is not ours:
                print(f"{case}: Trainer / {r['provider']}: {r['median_ms'] / ours['median_ms']:.3f}x the samples/s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
