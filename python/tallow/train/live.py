"""Progress display: a rich live view on a terminal, plain lines otherwise
(a log file or CI keeps readable, one line per event, no control codes)."""

from __future__ import annotations

import sys
import time

from .._extras import import_extra


def _fmt(metrics: dict) -> str:
    parts = []
    for k, v in metrics.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4f}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k} {v}")
    return "  ".join(parts)


class PlainView:
    def __init__(self, stream=None, every: int = 50):
        self.stream = stream or sys.stdout
        self.every = every  # 0: epoch lines only
        self.t0 = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, total, done
        self.t0 = time.perf_counter()
        self._line(f"epoch {epoch + 1}/{epochs}: {total} batches" + (f" (resuming at batch {done})" if done else ""))

    def advance(self, metrics: dict) -> None:
        self.done += 1
        if self.every and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self._line(f"epoch {self.epoch + 1}/{self.epochs} batch {self.done}/{self.total}  {_fmt(metrics)}  "
                       f"({rate:.1f} batch/s)")

    def message(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        pass

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichView(PlainView):
    def __init__(self, every: int = 50):
        super().__init__(sys.stdout, every)
        import_extra("rich", "train", "the live training view (rich)")
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console()
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                                 console=self.console, transient=False, refresh_per_second=4)
        self.progress.start()
        self.task = None

    def start_epoch(self, epoch, epochs, total, done):
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, total, done
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task("", total=total, completed=done, epoch=f"{epoch + 1}/{epochs}",
                                           metrics="")

    def advance(self, metrics):
        self.done += 1
        # rich redraws from its own thread at refresh_per_second; formatting every step costs.
        if self.done % 10 == 0 or self.done == self.total:
            self.progress.update(self.task, completed=self.done, metrics=_fmt(metrics))

    def message(self, text):
        self.console.print(text)

    def close(self):
        self.progress.stop()


def make_view(live: bool | None, is_main: bool, every: int):
    """``live=None``: rich when stdout is a terminal; False: plain lines."""
    if not is_main:
        return None
    if live is None:
        live = sys.stdout.isatty()
    if live:
        try:
            return RichView(every)
        except ImportError:
            pass
    return PlainView(every=every)
