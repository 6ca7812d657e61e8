"""The lower-level training loop: the caller writes the step (a GAN's two
optimizers, anything); the loop handles the data order (global batches dealt
to torchrun's processes), checkpoints and their resume, metrics.jsonl, the
live view and run.json. ``Trainer`` is built on it.

Resume restores every registered object (models, optimizers, counters), the
RNG states of every process, the loop's position — epoch, batch within the
epoch, optimizer step — and the partial sums of the epoch's metrics; the
sampler starts at the next unseen batch (nothing is replayed), and
metrics.jsonl is cut back to what it held when the checkpoint was written,
so no epoch or step appears twice.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import distributed as D
from .live import make_view
from .state import is_complete, load_state, rng_state, set_rng_state, snapshot, write_snapshot

_CKPT = re.compile(r"^step-(\d+)$")


@dataclass
class StepContext:
    epoch: int
    batch: int  # index of this (micro-)batch in the epoch
    step: int  # optimizer steps done before this batch
    sync: bool  # the last micro-batch of its accumulation window: step the optimizer after it
    global_count: int  # samples in this global micro-batch (all processes)
    window_count: int  # samples in the accumulation window (all processes)
    world_size: int


def versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        out["tallow"] = version("tallow")
    except Exception:
        pass
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT.match(p.name))), reverse=True)
    for _, p in found:  # the newest readable one (after an OS crash the newest may be torn)
        if is_complete(p):
            return p
    return None


class TrainLoop:
    def __init__(self, out_dir: str | Path, dataset, *, batch_size: int, epochs: int, collate_fn=None,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, grad_accum: int = 1,
                 checkpoint_every: int = 0, keep_last: int = 2, resume: Optional[str] = None,
                 live: Optional[bool] = None, log_every: int = 50, run_info: Optional[dict] = None,
                 dist_info: Optional[D.DistInfo] = None, lengths=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.info = dist_info or D.setup()
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.epochs, self.grad_accum = epochs, grad_accum
        self.checkpoint_every, self.keep_last = checkpoint_every, keep_last
        self.log_every = log_every
        self.sampler = D.GlobalBatchSampler(len(dataset), batch_size, rank=self.info.rank,
                                            world_size=self.info.world_size, shuffle=shuffle, seed=seed,
                                            drop_last=drop_last, lengths=lengths)
        self.seed = seed
        self.objects: dict[str, Any] = {}
        self.pos = {"epoch": 0, "batch": 0, "step": 0, "samples": 0}
        self.sums: dict[str, float] = {}  # this epoch's step outputs (summed) and their count
        self.extra: dict[str, Any] = {}  # saved with checkpoints (early stopping, best metric, ...)
        self.resume = resume
        self.resumed_from: Optional[str] = None
        self.live = live
        self.view = None
        self.run_info = dict(run_info or {})
        self.stop_requested = False
        self.last_record: dict = {}
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)

    # -- objects and logs -----------------------------------------------------------------

    def register(self, **objects) -> None:
        """Objects with state_dict()/load_state_dict() saved in checkpoints."""
        for name, obj in objects.items():
            if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
                obj = obj.module
            self.objects[name] = obj

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module for training: DistributedDataParallel under torchrun."""
        if not self.info.enabled:
            return module
        dev = self.info.device
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda"
                                                         else None)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def log(self, record: dict) -> None:
        """Appends one JSON line to metrics.jsonl (rank 0 only)."""
        if not self.info.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def message(self, text: str) -> None:
        if self.view is not None:
            self.view.message(text)

    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def steps_per_epoch(self) -> int:
        n = self.batches_per_epoch()
        return -(-n // self.grad_accum)

    def total_steps(self) -> int:
        return self.steps_per_epoch() * self.epochs

    # -- checkpoints ------------------------------------------------------------------------

    def _ckpt_state(self) -> dict:
        rngs = D.gather_objects(rng_state(), self.info)
        offset = self.metrics_path.stat().st_size if self.info.is_main and self.metrics_path.exists() else 0
        return {"loop": {"pos": dict(self.pos), "sums": dict(self.sums), "extra": self.extra,
                         "metrics_offset": offset, "world_size": self.info.world_size},
                "objects": {k: v.state_dict() for k, v in self.objects.items()}, "rng": rngs}

    def save_checkpoint(self, name: Optional[str] = None) -> Optional[Path]:
        """All processes call it (RNG states are gathered); rank 0 copies the
        state now and writes checkpoints/step-N (or checkpoints/<name>) in a
        background thread while training goes on (one write at a time), then
        keeps the last N. ``wait_checkpoints()`` waits for the write."""
        state = self._ckpt_state()
        path = None
        if self.info.is_main:
            d = self.out_dir / "checkpoints"
            path = d / (name or f"step-{self.pos['step']:08d}")
            skeleton, tensors = snapshot(state)
            self.wait_checkpoints()

            def write():
                write_snapshot(path, skeleton, tensors)
                if name is None:
                    old = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT.match(p.name)))
                    for _, p in old[:-self.keep_last]:
                        shutil.rmtree(p, ignore_errors=True)

            self._writer = _Writer(write)
        D.barrier(self.info)
        return path

    def wait_checkpoints(self) -> None:
        """Blocks until the last checkpoint is on disk; raises its error, if any."""
        w, self._writer = getattr(self, "_writer", None), None
        if w is not None:
            w.join()

    def _restore(self, path: Path) -> None:
        st = load_state(path)
        for k, obj in self.objects.items():
            if k not in st["objects"]:
                raise ValueError(f"checkpoint {str(path)!r} has no state for {k!r}")
            obj.load_state_dict(st["objects"][k])
        loop = st["loop"]
        self.pos = dict(loop["pos"])
        self.sums = dict(loop["sums"])
        self.extra = loop["extra"]
        rngs = st["rng"]
        set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
        if self.info.is_main and self.metrics_path.exists():
            with open(self.metrics_path, "r+") as f:  # forget what was logged after the checkpoint
                f.truncate(loop["metrics_offset"])
        self.resumed_from = str(path)

    def _fresh_start(self) -> None:
        """A new run in this directory: the previous run's metrics and
        checkpoints go (a later resume='auto' must not find them)."""
        if self.info.is_main:
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
        D.barrier(self.info)

    def _maybe_resume(self) -> None:
        if self.resume in (None, "", "never"):
            self._fresh_start()
            return
        if self.resume == "auto":
            path = D.broadcast_object(latest_checkpoint(self.out_dir), self.info)
            if path is None:
                self._fresh_start()
                return
        else:
            path = Path(self.resume)
            if not (path / "state.json").is_file():
                raise ValueError(f"resume: {str(path)!r} is not a checkpoint directory (no state.json)")
        D.barrier(self.info)
        self._restore(Path(path))

    def _write_run_json(self) -> None:
        if not self.info.is_main:
            return
        run_path = self.out_dir / "run.json"
        prev = json.loads(run_path.read_text()) if run_path.exists() and self.resumed_from else {}
        info = {**self.run_info, "world_size": self.info.world_size, "backend": self.info.backend or None,
                "seed": self.seed, "epochs": self.epochs, "global_batch_size": self.sampler.batch_size,
                "grad_accum": self.grad_accum, "batches_per_epoch": self.batches_per_epoch(),
                "versions": versions(), "machine": machine(), "argv": sys.argv,
                "started": prev.get("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                "resumes": prev.get("resumes", []) + ([{"from": self.resumed_from, "at": dict(self.pos),
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
                                                       if self.resumed_from else [])}
        run_path.write_text(json.dumps(info, indent=2))

    # -- the loop ---------------------------------------------------------------------------

    def _batches(self, epoch: int, start: int):
        self.sampler.set_epoch(epoch, start)
        ds = self.dataset
        if isinstance(ds, torch.utils.data.TensorDataset) and self.collate_fn is None:
            for idx in self.sampler:  # tensors indexed directly: no per-sample collate
                t = torch.as_tensor(idx, dtype=torch.long)
                yield tuple(x[t] for x in ds.tensors)
            return
        loader = torch.utils.data.DataLoader(ds, batch_sampler=self.sampler, collate_fn=self.collate_fn)
        yield from loader

    def run(self, step_fn: Callable[[Any, StepContext], Optional[dict]], *,
            epoch_end: Optional[Callable[[int], dict]] = None,
            after_step: Optional[Callable[[StepContext], None]] = None) -> dict:
        """Calls ``step_fn(batch, ctx)`` for every micro-batch of every epoch.
        The step returns a dict of floats (summed over the epoch's batches and
        averaged in the epoch record), or None. ``epoch_end(epoch)`` returns
        extra metrics (validation) for the epoch record; ``self.stop_requested``
        ends training after the current epoch."""
        self._maybe_resume()
        self._write_run_json()
        self.view = make_view(self.live, self.info.is_main, self.log_every)
        sizes = self.sampler.global_sizes()
        n_batches = len(sizes)
        try:
            if self.resumed_from:
                self.message(f"resumed from {self.resumed_from} at epoch {self.pos['epoch'] + 1}, "
                             f"batch {self.pos['batch']}, step {self.pos['step']}")
            while self.pos["epoch"] < self.epochs and not self.extra.get("stopped"):
                epoch = self.pos["epoch"]
                start = self.pos["batch"]
                if self.view:
                    self.view.start_epoch(epoch, self.epochs, n_batches, start)
                t0 = time.perf_counter()
                for b, batch in enumerate(self._batches(epoch, start), start=start):
                    w0 = (b // self.grad_accum) * self.grad_accum
                    w1 = min(w0 + self.grad_accum, n_batches)
                    ctx = StepContext(epoch=epoch, batch=b, step=self.pos["step"], sync=(b + 1 == w1),
                                      global_count=sizes[b], window_count=sum(sizes[w0:w1]),
                                      world_size=self.info.world_size)
                    out = step_fn(batch, ctx)
                    self.pos["batch"] = b + 1
                    self.pos["samples"] += sizes[b]
                    if out:
                        for k, v in out.items():
                            self.sums[k] = self.sums.get(k, 0.0) + float(v)
                        self.sums["_batches"] = self.sums.get("_batches", 0.0) + 1
                    if ctx.sync:
                        self.pos["step"] += 1
                        if after_step is not None:
                            after_step(ctx)
                    if self.view:
                        self.view.advance(self.last_record)
                    if ctx.sync and self.checkpoint_every and self.pos["step"] % self.checkpoint_every == 0 \
                            and b + 1 < n_batches:
                        self.save_checkpoint()
                record = {"type": "epoch", "epoch": epoch + 1, "step": self.pos["step"],
                          "samples": self.pos["samples"], "seconds": round(time.perf_counter() - t0, 3)}
                nb = self.sums.pop("_batches", 0.0)
                record.update({f"train_{k}": v / max(nb, 1) for k, v in self.sums.items()
                               if not k.startswith("_")})
                if epoch_end is not None:
                    record.update(epoch_end(epoch))
                self.log(record)
                if self.view:
                    self.view.message(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in record.items() if k != "type"))
                self.sums = {}
                self.pos["epoch"], self.pos["batch"] = epoch + 1, 0
                if self.stop_requested:
                    self.extra["stopped"] = True
                self.save_checkpoint()
        finally:
            if self.view:
                self.view.close()
            self.wait_checkpoints()
        D.barrier(self.info)
        return dict(self.pos)


class _Writer:
    """A checkpoint write on a thread of its own; ``join`` re-raises its error."""

    def __init__(self, fn):
        import threading

        self.error: Optional[BaseException] = None

        def target():
            try:
                fn()
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=target, name="tallow-checkpoint", daemon=False)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"writing a checkpoint failed: {self.error}") from self.error
