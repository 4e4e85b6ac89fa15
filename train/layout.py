"""The layout of a run folder and of a sweep folder: every name in one place.

    RUN/config.json                  the resolved TrainConfig
    RUN/precision.json               what autocast=auto measured and chose (train.precision; only then)
    RUN/metrics.jsonl                logged metrics (train.logs)
    RUN/checkpoints/step-000001234/  one committed checkpoint (train.checkpoints writes and reads it):
        sae.safetensors              weights and buffers (dead counters, thresholds)
        trainer.pt                   optimiser state, RNG states, logging accumulators
        state.json                   step, tokens, store position, the SAE's architecture and
                                     constructor arguments, the dataset scaling, checksums of the two files above
    RUN/checkpoints/.tmp-step-N/     a checkpoint being written (renaming it is the commit)
    RUN/checkpoints/.del-step-N/     a checkpoint being deleted
    RUN/done.json                    written when training (and calibration) finished
    RUN/eval.json                    `train eval`'s figures (in the folder evaluated: run or checkpoint)
    RUN/saebench_core.json           the same evaluation in SAEBench's core layout (train.saebench)
    RUN/report.md, report.png        `train report`
    SWEEP/sweep.json                 a sweep's resolved configs, in order; then one RUN folder per SAE
    SWEEP/report.md, curves.png, frontier.png

Loading a run or a checkpoint (its config, its SAE, its store) is train.runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
WEIGHTS, TRAINER, STATE = "sae.safetensors", "trainer.pt", "state.json"  # the files of a checkpoint
EVAL = "eval.json"


def step_name(step: int) -> str:
    """step-000001234: the folder name of checkpoint `step` (zero-padded, so names sort by step)."""
    return f"{STEP_PREFIX}{step:09d}"


def step_of(checkpoint: str | os.PathLike) -> int | None:
    """The step of a committed checkpoint folder (by its name), or None if the name is not one."""
    name = Path(checkpoint).name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX):].isdigit():
        return None
    return int(name[len(STEP_PREFIX):])


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint folder of a run (RUN/checkpoints/step-N with its state.json)."""
    p = Path(path)
    return (p / STATE).exists() and p.parent.name == CHECKPOINTS


@dataclass(frozen=True)
class RunLayout:
    """The names of one run folder (see the module docstring)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def precision(self) -> Path:
        return self.root / "precision.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def step_dir(self, step: int) -> Path:
        """The committed folder of checkpoint `step`."""
        return self.checkpoints / step_name(step)

    def tmp_step_dir(self, step: int) -> Path:
        """Where checkpoint `step` is written before the rename that commits it."""
        return self.checkpoints / f".tmp-{step_name(step)}"

    @staticmethod
    def retired(checkpoint: Path) -> Path:
        """The name a checkpoint folder is renamed to before it is deleted."""
        return checkpoint.with_name(f".del-{checkpoint.name}")

    def retired_dirs(self) -> list[Path]:
        """Checkpoint folders left half-deleted by a kill during a deletion."""
        return sorted(self.checkpoints.glob(".del-*"))

    def step_dirs(self) -> list[Path]:
        """Committed checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and step_of(p) is not None)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunLayout:
        """The run folder a checkpoint folder belongs to."""
        return cls(Path(checkpoint).parent.parent)


@dataclass(frozen=True)
class SweepLayout:
    """The names of a sweep folder: sweep.json, then one run folder per SAE."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def spec(self) -> Path:
        return self.root / "sweep.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def frontier_png(self) -> Path:
        return self.root / "frontier.png"

    def run(self, name: str) -> RunLayout:
        return RunLayout(self.root / name)

    @staticmethod
    def is_sweep(path: str | os.PathLike) -> bool:
        return SweepLayout(path).spec.exists()
