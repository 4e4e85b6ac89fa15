"""A training step's computed floor: its FLOPs and bytes, and the rates they are divided by.

Used by pipelines/bench_train_step.py. Shapes: batch B, d = d_in, m = width, k active latents per
token (TopK/BatchTopK), n_dead latents in AuxK's block. Parameters P = 2 d m + m + d, float32.

FLOPs (multiply-adds x 2, the matrix products only; element-wise work is counted in bytes):
  dense path (Vanilla, JumpReLU; TopK/BatchTopK with sparse_kernels=false): encoder forward 2Bdm,
    decoder forward 2Bmd, decoder weight and input gradients 2 x 2Bmd, encoder weight gradient
    2Bdm (b_dec's gradient is a matvec) = 10 B d m;
  sparse kernels (TopK/BatchTopK; Vanilla/JumpReLU when their step took the selected-entries
    path, k then the mean selected entries per token): encoder forward 2Bdm (dense), then decode,
    decoder weight gradient, active values' gradient and encoder weight gradient over the B k
    active entries, 4 x 2Bkd = 2 B d m + 8 B k d;
  AuxK on its block: the dense path's 10 B d n_dead.
Bytes (a lower bound on memory traffic, each tensor moved once where it must be):
  parameters: W_enc and W_dec read by the forward (2 x 4dm) and their gradients written (2 x 4dm);
    decoder-gradient projection (read gradient and W_dec, write gradient: 3 x 4dm); clipping reads
    every gradient (4P); fused Adam reads p, g, m, v and writes p, m, v (7 x 4P); renormalisation
    reads and writes W_dec (2 x 4dm);
  activations: the batch read by the forward and the backward (2 x 4Bd); each [B, m] tensor
    written once and read once, in the autocast dtype's size a (4, or 2 under bf16): the sparse
    kernels keep only the pre-activations (2aBm), the dense path also f and the gradient of the
    pre-activations (6aBm).
floor = max(FLOPs / GEMM rate, bytes / memory bandwidth) (a roofline: neither can be beaten), with
the GEMM rate of one dense [B, d] x [d, m] product in the step's precision and the bandwidth of a
large tensor copy, both measured in the benchmark's own process right after each of its steps
(the fastest of them: the least disturbed by other load on a shared machine).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

SPARSE_ARCHS = ("topk", "batchtopk")


class StepCost(NamedTuple):
    flops: float
    bytes: float


def step_cost(arch: str, B: int, d: int, m: int, k: float, *, sparse_kernels: bool = True, n_dead: int = 0,
              act_bytes: int = 4, selected: float | None = None) -> StepCost:
    """FLOPs and bytes of one training step (module docstring). selected: a threshold rule's mean
    selected entries per token when its step took the selected-entries path (it replaces k)."""
    sparse = sparse_kernels and (arch in SPARSE_ARCHS or selected is not None)
    k = k if selected is None else selected
    flops = (2 * B * d * m + 8 * B * k * d) if sparse else 10 * B * d * m
    flops += 10 * B * d * n_dead
    P = 2 * d * m + m + d
    param_bytes = 4 * (2 * d * m + 2 * d * m + 3 * d * m + P + 7 * P + 2 * d * m)
    act = 2 * 4 * B * d + (2 if sparse else 6) * act_bytes * B * m
    return StepCost(float(flops), float(param_bytes + act))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyProbe:
    """Times one copy of an nbytes float32 tensor (large enough to leave every cache) into another;
    `bytes_moved` (read + written) over the fastest time is the memory bandwidth."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.device, self.bytes_moved = device, 2.0 * nbytes
        self.src = torch.ones(nbytes // 4, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # touch every page before timing

    def seconds(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.dst.copy_(self.src)
        _sync(self.device)
        return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes/s (read + written) of the fastest of `repeats` copies (CopyProbe)."""
    probe = CopyProbe(device, nbytes)
    return probe.bytes_moved / min(probe.seconds() for _ in range(repeats))


def floor_seconds(cost: StepCost, flops_per_s: float, bytes_per_s: float) -> tuple[float, str]:
    """(the roofline floor in seconds, which bound sets it: "flops" or "bytes")."""
    compute, memory = cost.flops / flops_per_s, cost.bytes / bytes_per_s
    return (compute, "flops") if compute >= memory else (memory, "bytes")
