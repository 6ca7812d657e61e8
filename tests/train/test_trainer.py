"""tallow.train mechanics: metrics as counts, schedules, checkpoints without
pickles, the trainer's outputs, the live view off a terminal, early stopping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tallow.train import ClassCounts, EarlyStopping, Schedule, Trainer
from tallow.train.distributed import GlobalBatchSampler
from tallow.train.state import load_state, save_state


def _blobs(n=240, d=6, classes=3, seed=0):
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def test_counts_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g)
    labels = torch.randint(0, 4, (500,), generator=g)
    c = ClassCounts(4)
    for i in range(0, 500, 64):  # in batches: counts add up
        c.update(logits[i:i + 64], labels[i:i + 64])
    s = c.summary(full=True)
    pred = logits.argmax(1)
    assert s["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert s["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert s["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
    assert s["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert s["n"] == 500


def test_schedules():
    lin = Schedule("linear", 1.0, total_steps=110, warmup_steps=10)
    assert lin.lr_at(0) == pytest.approx(0.1) and lin.lr_at(9) == pytest.approx(1.0)
    assert lin.lr_at(60) == pytest.approx(0.5) and lin.lr_at(110) == 0.0
    cos = Schedule("cosine", 2.0, total_steps=100)
    assert cos.lr_at(0) == pytest.approx(2.0) and cos.lr_at(50) == pytest.approx(1.0) and cos.lr_at(100) < 1e-9
    assert Schedule("constant", 0.3, 10).lr_at(7) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        Schedule("step", 1.0, 10)


def test_checkpoint_roundtrip_has_no_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    import random

    np_state = np.random.get_state()
    state = {"opt": opt.state_dict(), "model": model.state_dict(), "rng": random.getstate(),
             "np": np_state, "x": (1, 2.5, "a", None)}
    save_state(tmp_path / "ck", state)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "tensors.safetensors"]
    back = load_state(tmp_path / "ck")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])  # int-keyed state restored
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["x"] == (1, 2.5, "a", None)
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], np_state[1])


def test_global_batches_are_dealt_to_ranks():
    one = list(GlobalBatchSampler(50, 8, seed=3))
    r0 = list(GlobalBatchSampler(50, 8, seed=3, rank=0, world_size=2))
    r1 = list(GlobalBatchSampler(50, 8, seed=3, rank=1, world_size=2))
    assert len(one) == len(r0) == len(r1) == 7
    for a, b, c in zip(one, r0, r1):
        assert sorted(a) == sorted(b + c)
    s = GlobalBatchSampler(50, 8, seed=3)
    s.set_epoch(0, start_batch=4)
    assert list(s) == one[4:]  # resume skips without replaying


def test_trainer_outputs_and_plain_lines(tmp_path, capsys):
    ds = _blobs()
    torch.manual_seed(0)
    tr = Trainer(torch.nn.Linear(6, 3), ds, val_data=_blobs(101, seed=1), out_dir=tmp_path, num_classes=3,
                 label_names=["a", "b", "c"], lr=0.05, epochs=3, batch_size=32, schedule="linear",
                 warmup_steps=2, grad_accum=2, checkpoint_every=2, keep_last=2, log_every=1, live=None)
    res = tr.fit()
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "epoch 3/3" in out  # stdout is not a TTY: plain lines
    assert res["val"]["n"] == 101 and res["val"]["accuracy"] > 0.8
    assert set(res["val"]["per_class"]) == {"a", "b", "c"}
    for name in ("metrics.jsonl", "eval.json", "run.json", "curves.png", "lr.png", "confusion.png"):
        assert (tmp_path / name).is_file(), name
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2, 3]
    steps = [r["step"] for r in recs if r["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 3 * math.ceil(8 / 2)  # 8 micro-batches, accumulation 2
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["world_size"] == 1 and run["grad_accum"] == 2 and "torch" in run["versions"]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "best" in ckpts and len([c for c in ckpts if c.startswith("step-")]) == 2


def test_early_stopping(tmp_path):
    ds = _blobs()
    tr = Trainer(torch.nn.Linear(6, 3), ds, val_data=ds, out_dir=tmp_path, num_classes=3, lr=1e-9, epochs=20,
                 batch_size=64, live=False, log_every=0, plots=False,
                 early_stopping=EarlyStopping("val_accuracy", "max", patience=2, min_delta=0.01))
    tr.fit()
    epochs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 3 and epochs[-1]["early_stopped"]  # 1 best + 2 without improvement


def test_trainer_rejects_bad_lr(tmp_path):
    with pytest.raises(ValueError, match="lr"):
        Trainer(torch.nn.Linear(2, 2), _blobs(d=2), out_dir=tmp_path, num_classes=3, lr=float("nan"))


def test_fresh_run_forgets_the_previous_one(tmp_path):
    ds = _blobs()
    kw = dict(out_dir=tmp_path, num_classes=3, lr=0.05, batch_size=32, live=False, log_every=0, plots=False)
    Trainer(torch.nn.Linear(6, 3), ds, epochs=3, **kw).fit()
    Trainer(torch.nn.Linear(6, 3), ds, epochs=1, **kw).fit()  # resume=None: a new run
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step-00000008"]  # not the first run's step-24, which resume='auto' would pick
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_skips_a_torn_newest_checkpoint(tmp_path):
    from tallow.train.loop import latest_checkpoint

    ds = _blobs()
    Trainer(torch.nn.Linear(6, 3), ds, out_dir=tmp_path, num_classes=3, lr=0.05, epochs=2, batch_size=32,
            keep_last=3, live=False, log_every=0, plots=False).fit()
    ck = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == ck / "step-00000016"
    (ck / "step-00000016" / "tensors.safetensors").write_bytes(b"")  # as after an OS crash without fsync
    assert latest_checkpoint(tmp_path) == ck / "step-00000008"
