"""Data-parallel training on torch.distributed (torchrun), kept out of the training loop's way.

Each rank takes its slice of every global batch from the store; gradients are averaged with one
all-reduce per parameter; the dead-latent counters are merged so every rank holds the state a
single process would; rank 0 alone writes checkpoints, logs and the final evaluation. With
`World.single()` every method is a no-op, so the loop is the same code with and without ranks.

A sweep can instead spread its SAEs over the ranks (train.sweep): each rank reads whole batches
and trains its own SAEs, each as a single process would (`SoloWorld`), and the ranks only meet at
barriers (after every common checkpoint, and at the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def single(cls) -> "World":
        return cls()

    @classmethod
    def from_env(cls, backend: str | None = None) -> "World":
        """The torchrun world (RANK / WORLD_SIZE), initialising the process group once (backend:
        nccl where CUDA is available, else gloo; a sweep spread over ranks only needs gloo)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls.single()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend, timeout=timedelta(hours=2))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK under torchrun."""
        if self.size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each rank's loss is a mean over its slice: the global mean's gradient is their average."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.size)

    def merge_dead_counters(self, counters: torch.Tensor, before: torch.Tensor, global_tokens: int) -> None:
        """counters [m]: this rank's counts after a step that started at `before` (the same on all
        ranks). A latent that fired on any rank restarts at 0, others advance by the global batch."""
        if self.size == 1:
            return
        fired = (counters < before + (global_tokens // self.size)).to(torch.int32)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        counters.copy_(torch.where(fired.bool(), torch.zeros_like(counters), before + global_tokens))

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's [b, d] slice in rank order: the global batch."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's Python object on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def share(self, n: int) -> list[int]:
        """The items of 0..n-1 this rank owns when n items are dealt round-robin: i % size == rank."""
        return list(range(self.rank, n, self.size))

    def subgroup(self, ranks: list[int]) -> Any:
        """A process group of `ranks`; every rank must call this (it is a collective). None (the
        default group) when `ranks` is every rank."""
        if self.size == 1 or sorted(ranks) == list(range(self.size)):
            return None
        return dist.new_group(ranks=sorted(ranks), timeout=timedelta(hours=2))


@dataclass(frozen=True)
class SoloWorld(World):
    """The world of a trainer whose SAE this rank trains alone, beside other ranks that train other
    SAEs from the same batches (a sweep spread over ranks). To the training step it is a single
    process (rank 0 of 1: whole batches, no all-reduce, writes its own files), but barrier() waits
    for every rank of `group` (None: the default group), which keeps the ranks' checkpoints in step.
    """

    group: Any = None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)
