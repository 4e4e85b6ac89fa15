"""The precision of a run's training steps: autocast none | tf32 | bf16, and auto, chosen by
measurement, once, when the run is created.

    none  exact float32: float32 tensors, float32 matrix products (matmul precision "highest"
          during the steps, whatever the process set)
    tf32  float32 tensors whose matrix products run on TF32 tensor cores (matmul precision "high"
          during the steps: torch.set_float32_matmul_precision); CUDA at compute capability >= 8.0
          only (`tf32_matrix_units`); refused elsewhere (`check_available`, one-line UnavailablePrecision)
    bf16  bfloat16 autocast of the matrix products

`step_precision(cfg)` is the context Trainer.train_step runs each step in: it sets the matmul
precision for the step and restores the process's own afterwards, so nothing leaks into other
code (evaluation, other runs in the process). Evaluation (held-out figures, calibration, `train
eval`) runs outside the steps, without autocast and at the process's float32 matmul precision
(torch's default "highest": exact float32) whatever the run trained in, as it always has for bf16
runs: a run's figures measure the SAE it trained, not its training arithmetic. What tf32 changes
is bounded as bf16's is: the products' inputs are rounded to TF32's 10-bit mantissa (float32
accumulation) while weights, gradients, Adam state and the loss stay float32.

`resolve_autocast(cfg, store, device)` returns (cfg with autocast none, tf32 or bf16, Measurement):

* CUDA: the candidates float32, tf32 (compute capability >= 8.0) and bf16
  (torch.cuda.is_bf16_supported()) are each timed as below; the fastest candidate other than float32
  is chosen when its median step took under BF16_MARGIN of float32's, else none;
* a CPU (no TF32) without bfloat16 matrix units (`bf16_matrix_units`: no AMX tiles, as torch
  reports torch.cpu._is_amx_tile_supported()) -> none, without timing: bf16 there only costs the
  casts; a GPU without either (before sm_80) likewise;
* each candidate is timed by a few training steps of the real model (this config's SAE, width, k, batch and
  kernels, built on a throwaway copy: `Trainer.train_step`, the trainer's own step) on the store's
  first batch; on a CPU with AMX float32 and then bf16 autocast -> bf16 when its median step took
  under BF16_MARGIN of float32's, else none (exact float32 keeps ties and near-ties).

What bf16 changes is numerically bounded: autocast runs the matrix products in bfloat16 while
weights, Adam state, the loss, the sparse gradients and JumpReLU's threshold stay float32
(tests/test_training.py, tests/test_jumprelu.py). The resolved value is what config.json
records, so a resumed run computes as it started, wherever it resumes; the measurement is
written beside it (RUN/precision.json, `Measurement.to_json`). The measurement leaves the global
RNG states and the store's position as it found them (fork_rng; the store is rewound to 0, where
a new run's store is). A Trainer refuses an unresolved auto (`check_resolved`).

train_sae and run_sweep call `resolve_new_run` (rank 0 measures, the other ranks receive the
result; a sweep measures each shape, `shape_of`, once) and `write_measurement`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from shared.durable import write_atomic
from train.config import TrainConfig, post_init_cfg, update_cfg
from train.distributed import World
from train.errors import TrainingError
from train.layout import RunLayout

WARMUP_STEPS = 2  # steps run before timing, per precision (kernel selection, allocator, caches)
TIMED_STEPS = 3  # timed steps per precision; their median is compared
BF16_MARGIN = 0.95  # tf32 or bf16 is chosen when its step takes under this fraction of float32's
TF32_CAPABILITY = (8, 0)  # CUDA compute capability from which tensor cores take TF32 (Ampere)


@dataclass(frozen=True)
class Measurement:
    """What auto measured: the device, whether it has bf16 matrix units (and how torch says so),
    the median ms per training step of each precision (None: not timed) and the choice."""

    device: str
    bf16_units: bool
    units: str  # what reported them, e.g. "AMX tiles (torch.cpu._is_amx_tile_supported)"
    ms_fp32: float | None
    ms_bf16: float | None
    chosen: str  # none | tf32 | bf16
    warmup_steps: int = WARMUP_STEPS
    timed_steps: int = TIMED_STEPS
    batch_rows: int | None = None
    torch: str = torch.__version__
    tf32_units: bool = False  # CUDA at compute capability >= 8.0 (then tf32 is timed)
    ms_tf32: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"requested": "auto", **asdict(self), "margin": BF16_MARGIN}

    def line(self) -> str:
        """One line for the log, e.g. `autocast=auto -> bf16 on cpu (AMX tiles): fp32 812 ms/step, bf16 402 ms/step`."""
        if self.ms_fp32 is None:
            return f"autocast=auto -> {self.chosen} on {self.device}: no bf16 matrix units ({self.units}); not timed"
        timed = [("fp32", self.ms_fp32), ("tf32", self.ms_tf32), ("bf16", self.ms_bf16)]
        figures = ", ".join(f"{name} {ms:.1f} ms/step" for name, ms in timed if ms is not None)
        return (f"autocast=auto -> {self.chosen} on {self.device} ({self.units}): {figures} "
                f"(median of {self.timed_steps} after {self.warmup_steps} warm-up)")


class UnresolvedAutocast(TrainingError):
    """A trainer was given autocast=auto, which only run creation resolves."""


class UnavailablePrecision(TrainingError):
    """autocast=tf32 on a device without TF32 matrix units (a CPU; CUDA before compute capability 8.0)."""


def check_resolved(cfg: TrainConfig) -> None:
    """UnresolvedAutocast unless cfg.autocast is none, tf32 or bf16."""
    if cfg.autocast == "auto":
        raise UnresolvedAutocast(
            f"{cfg.run_name or cfg.arch}: autocast='auto' is resolved to none, tf32 or bf16 when a run is created "
            "(train.precision.resolve_autocast, from train_sae or a sweep); a trainer needs the resolved value")


def tf32_matrix_units(device: torch.device) -> tuple[bool, str]:
    """(whether `device` multiplies float32 matrices on TF32 tensor cores, what says so): CUDA at
    compute capability >= TF32_CAPABILITY; never a CPU."""
    if device.type != "cuda":
        return False, f"{device.type}: TF32 is a CUDA tensor-core format"
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= TF32_CAPABILITY, f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}"


def check_available(cfg: TrainConfig, device: torch.device) -> None:
    """UnavailablePrecision when cfg.autocast is tf32 and `device` has no TF32 matrix units."""
    if cfg.autocast == "tf32":
        has, units = tf32_matrix_units(device)
        if not has:
            raise UnavailablePrecision(
                f"autocast='tf32' needs a CUDA GPU of compute capability >= {TF32_CAPABILITY[0]}.{TF32_CAPABILITY[1]} "
                f"(TF32 tensor cores); this run's device is {device} ({units}): use autocast none, bf16 or auto")


@contextmanager
def step_precision(cfg: TrainConfig) -> Iterator[None]:
    """The float32 matmul precision of a training step: "high" (TF32) under autocast tf32, else
    "highest" (exact float32, also outside bf16 autocast's casts); the process's own on exit."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if cfg.autocast == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def bf16_matrix_units(device: torch.device) -> tuple[bool, str]:
    """(whether `device` has bfloat16 matrix units, what says so). CPU: AMX tiles, as torch reports
    them (torch.cpu._is_amx_tile_supported; absent in older torch: none); CUDA: is_bf16_supported."""
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        has = bool(probe()) if probe is not None else False
        isa = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
        return has, f"{'AMX tiles' if has else 'no AMX tiles' if probe is not None else 'no AMX probe in this torch'}, {isa}"
    if device.type == "cuda":
        has = bool(torch.cuda.is_bf16_supported())
        major, minor = torch.cuda.get_device_capability(device)
        return has, f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}, bf16 {'yes' if has else 'no'}"
    return False, f"{device.type}: not measured"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(cfg: TrainConfig, store, device: torch.device, autocast: str) -> float:
    """Median ms of Trainer.train_step for `cfg` with `autocast` (none | tf32 | bf16) on the store's first
    batch (this rank's rows), after WARMUP_STEPS untimed steps; a throwaway SAE and optimiser,
    initialised from that batch as a new run's are (b_dec by the mean: the geometric median is slow)."""
    from train.training import Trainer, _init_from_data, build_from_cfg, make_optimizer

    cfg = update_cfg(cfg, autocast=autocast, wandb_mode="disabled",
                     b_dec_init="zeros" if cfg.b_dec_init == "zeros" else "mean")
    batch = store.next_batch()
    store.seek(0)
    sae = build_from_cfg(cfg, device)
    _init_from_data(cfg, sae, store)
    with tempfile.TemporaryDirectory(prefix="saeforge-precision-") as tmp:
        trainer = Trainer(cfg, sae, store, make_optimizer(cfg, sae), Path(tmp), progress=False)
        times = []
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_step(batch)
            _sync(device)
            if i >= WARMUP_STEPS:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def choose(ms_fp32: float, ms_bf16: float | None, ms_tf32: float | None = None) -> str:
    """The fastest of bf16 and tf32 (those timed: not None) when its step took under BF16_MARGIN
    of float32's, else none (exact float32 keeps ties and near-ties)."""
    timed = {name: ms for name, ms in (("tf32", ms_tf32), ("bf16", ms_bf16)) if ms is not None}
    best = min(timed, key=timed.get, default=None)
    return best if best is not None and timed[best] < BF16_MARGIN * ms_fp32 else "none"


def measure(cfg: TrainConfig, store, device: torch.device) -> Measurement:
    """The Measurement auto resolves by (module docstring); RNG states and the store as found."""
    has, units = bf16_matrix_units(device)
    tf32, _ = tf32_matrix_units(device)
    rows = store.local_batch_size if hasattr(store, "local_batch_size") else None
    if not has and not tf32:
        return Measurement(str(device), False, units, None, None, "none", batch_rows=rows)
    candidates = ("none", *(("tf32",) if tf32 else ()), *(("bf16",) if has else ()))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ms = {a: step_ms(cfg, store, device, a) for a in candidates}
    store.seek(0)
    return Measurement(str(device), has, units, ms["none"], ms.get("bf16"),
                       choose(ms["none"], ms.get("bf16"), ms.get("tf32")), batch_rows=rows, tf32_units=tf32,
                       ms_tf32=ms.get("tf32"))


SHAPE_KEYS = ("arch", "sparsity", "site", "in_site", "out_site", "d_in", "dict_size", "k", "aux_k", "batch_size",
              "micro_batch_size", "matryoshka_widths", "sparse_kernels", "compile", "device")


def shape_of(cfg: TrainConfig) -> tuple:
    """What sets a training step's cost (the keys of SHAPE_KEYS): a sweep measures each shape once."""
    return tuple(getattr(cfg, k) for k in SHAPE_KEYS)


def resolve_autocast(cfg: TrainConfig, store, device: torch.device, log: bool = True
                     ) -> tuple[TrainConfig, Measurement | None]:
    """(cfg with autocast resolved, the Measurement); cfg unchanged and None unless autocast is auto.
    The store must be at position 0 (a new run's); it is left there. Logs the one line to stderr."""
    if cfg.autocast != "auto":
        return cfg, None
    m = measure(cfg, store, device)
    if log:
        print(m.line(), file=sys.stderr, flush=True)
    return update_cfg(cfg, autocast=m.chosen), m


def resolve_new_run(given: TrainConfig, cfg: TrainConfig, store, device: torch.device, world: World = World(),
                    measured: dict | None = None) -> tuple[TrainConfig, Measurement | None]:
    """A new run's config (post_init_cfg'd `cfg`, made from `given`) with autocast=auto resolved:
    measured on rank 0 (the others receive it), or taken from `measured` (shape_of -> Measurement,
    a sweep's: each shape is measured once); the run name is derived again from the resolved value
    (autocast enters the run identity when it is not none). (cfg, None) when autocast is not auto.
    UnavailablePrecision for autocast tf32 on a device without it (before any run folder is made)."""
    check_available(cfg, device)
    if cfg.autocast != "auto":
        return cfg, None
    key = shape_of(cfg)
    m = (measured or {}).get(key)
    if m is None:
        m = world.broadcast(resolve_autocast(cfg, store, device)[1] if world.is_main else None)
        if measured is not None:
            measured[key] = m
    return post_init_cfg(update_cfg(given, autocast=m.chosen), cfg.d_in, cfg.site), m


def write_measurement(run_dir, m: Measurement | None) -> None:
    """RUN/precision.json (atomic), when autocast=auto measured."""
    if m is not None:
        write_atomic(RunLayout(run_dir).precision, json.dumps(m.to_json(), indent=1).encode())
