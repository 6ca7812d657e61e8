"""The native kernels in fork()ed children: multiprocessing with the 'fork'
start method and torch DataLoader workers, after the parent has used them.

fork() copies only the calling thread, so the native thread pool's workers
(csrc/common/thread_pool.cpp) do not exist in the child; the pool must start
new ones there rather than wait for the parent's forever. Every child's work
runs under a generous timeout, so a regression fails here instead of hanging
CI; the timeouts are "never hang" guards, not speed checks.

Torch's own OpenMP runtime (libgomp) hangs in a fork child once the parent
has run an OpenMP region: that is torch's limitation, not tallow's, and
DataLoader sets torch to one thread in its workers for that reason. The
multiprocessing children here do the same and send numpy arrays back (a
tensor would be copied into shared memory by torch's reducer, an OpenMP loop).
"""

from __future__ import annotations

import faulthandler
import multiprocessing

import numpy as np
import pytest
import torch

import tallow
from tallow.ops import attention, preprocess

pytestmark = [
    pytest.mark.native,
    # Forking a process with threads is what this file is about (Python 3.12+ warns about it).
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

NEVER_HANG_S = 120


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # Several array images: one native call, split across the pool's threads.
    return [rng.integers(0, 256, size=(97 + 13 * i, 129 - 7 * i, 3), dtype=np.uint8) for i in range(6)]


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Far above the size under which the attention kernel runs serially (~2e6 flops and
    # 256 KB of keys and values, attention_kernel.h): the pool certainly splits it.
    return tuple(torch.randn(2, 4, 256, 64, generator=g) for _ in range(3))


def _preprocess_in_child(_: int) -> np.ndarray:
    return preprocess(_images(), resize=64, crop=56).numpy()


def _attention_in_child(_: int) -> np.ndarray:
    return attention(*_qkv(), causal=True).numpy()


def _like_a_dataloader_worker() -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _the_parent_never_hangs():
    """The children are bounded by their timeouts; a parent stuck in fork() (the
    pool's prepare handler) or in its own next kernel call would hang CI: past
    the bound, faulthandler prints every thread's stack and ends the run."""
    faulthandler.dump_traceback_later(4 * NEVER_HANG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def pool_in_use(monkeypatch):
    """Native backend for sure (an explicit backend raises rather than falls
    back), and a pool with worker threads even on a one-CPU machine."""
    monkeypatch.setenv("TALLOW_BACKEND", "cpu")
    before = tallow.get_num_threads()
    tallow.set_num_threads(max(2, before))
    try:
        yield
    finally:
        tallow.set_num_threads(before)


def _run_in_fork_children(fn) -> list[np.ndarray]:
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2, initializer=_like_a_dataloader_worker)
    try:
        # map_async().get(timeout): a hung child fails the test, and
        # terminate() below reaps it.
        return pool.map_async(fn, range(2)).get(timeout=NEVER_HANG_S)
    except multiprocessing.TimeoutError:
        pytest.fail(f"a fork child did not return within {NEVER_HANG_S} s: the native thread pool is not "
                    "usable after fork()")
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.parametrize("op", [_preprocess_in_child, _attention_in_child], ids=["preprocess", "attention"])
def test_a_fork_child_gets_the_parents_results_after_the_parent_used_the_kernels(pool_in_use, op):
    parent = op(0)  # the parent's pool now has running workers
    children = _run_in_fork_children(op)
    assert len(children) == 2
    for got in children:
        np.testing.assert_array_equal(got, parent)
    # and the parent's pool still works after the forks
    np.testing.assert_array_equal(op(0), parent)


class _PreprocessDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.images = _images()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return preprocess(self.images[i:i + 1] * 3, resize=64, crop=56)


def test_dataloader_workers_preprocess_after_the_parent_did(pool_in_use):
    dataset = _PreprocessDataset()
    expected = [dataset[i] for i in range(len(dataset))]  # the parent uses the kernels first
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=NEVER_HANG_S)
    got = list(loader)  # DataLoader's timeout raises if a worker never delivers
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"item {i} differs between the DataLoader worker and the parent"
