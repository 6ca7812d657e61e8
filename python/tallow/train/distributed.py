"""Data parallelism through torchrun: the process group comes from the
environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR/PORT or a c10d
rendezvous); gloo on CPU, nccl on CUDA. There is no launcher here.

Samplers: training batches are *global* (the batch size does not change with
the number of processes); each global batch is dealt out to the ranks, so
2 processes x B/2 see exactly the samples of 1 process x B. Validation is
sharded without padding — every sample is seen once — and the per-class
counts are summed with all_reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Joins torchrun's process group when WORLD_SIZE > 1 (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() and world > 1 else "cpu"
    dev = torch.device(device)
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                    backend=backend, device=dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class GlobalBatchSampler:
    """Per epoch, a permutation seeded by (seed, epoch) cut into global batches
    of ``batch_size``; yields this rank's share of each (positions
    rank, rank + world, ... inside the batch). ``start_batch`` skips the
    batches already trained on, without loading them (resume mid-epoch).

    A last global batch smaller than the number of processes is dropped
    (some rank would have nothing to compute); otherwise nothing is dropped
    unless ``drop_last``.

    With ``lengths`` (one per sample, e.g. tokens), batches are bucketed by
    length: the permutation is cut into windows of ``BUCKET_WINDOW`` batches,
    each sorted by length and cut into batches, and the full batches are
    then shuffled as wholes — the same samples per epoch, far less padding.
    """

    BUCKET_WINDOW = 50

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, lengths=None):
        if batch_size < world_size:
            raise ValueError(f"batch_size ({batch_size}) must be >= the number of processes ({world_size})")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} samples")
        self.lengths = list(lengths) if lengths is not None else None
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_sizes(self) -> list[int]:
        """Samples in each global batch of an epoch."""
        full, rest = divmod(self.n, self.batch_size)
        sizes = [self.batch_size] * full
        if rest and not self.drop_last and rest >= self.world:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return len(self.global_sizes())

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return order
        w = self.batch_size * self.BUCKET_WINDOW
        order = [i for s in range(0, self.n, w) for i in sorted(order[s:s + w], key=self.lengths.__getitem__)]
        full = self.n // self.batch_size
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(full)]
        perm = torch.randperm(full, generator=g).tolist()
        return [i for b in perm for i in batches[b]] + order[full * self.batch_size:]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        sizes = self.global_sizes()
        pos = sum(sizes[: self.start_batch])
        for size in sizes[self.start_batch:]:
            batch = order[pos:pos + size]
            pos += size
            yield batch[self.rank::self.world]


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """Evaluation shard: every sample exactly once over all ranks, no padding."""
    return list(range(info.rank, n, info.world_size))
