"""Data-parallel training on torch.distributed (torchrun), kept out of the training loop's way.

Each rank takes its slice of every global batch from the store; gradients are averaged with one
all-reduce per parameter; the dead-latent counters are merged so every rank holds the state a
single process would; rank 0 alone writes checkpoints, logs and the final evaluation. With
`World.single()` every method is a no-op, so the loop is the same code with and without ranks.
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
    def from_env(cls) -> "World":
        """The torchrun world (RANK / WORLD_SIZE), initialising the process group once."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls.single()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
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
