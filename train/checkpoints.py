"""Run folders and checkpoints, written so that kill -9 at any moment loses at most the work
since the last checkpoint and never leaves a half-written one that could be loaded.

The names (RUN/checkpoints/step-N/ with sae.safetensors, trainer.pt, state.json) are
train.layout's. A checkpoint is built in `.tmp-step-N`, every file fsynced, then renamed into
place: the rename is the commit. Loading checks the checksums in state.json and falls back to the
previous checkpoint when the newest is damaged. Turning a checkpoint back into an SAE is train.runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.durable import FolderError, file_checksum, fsync_path, make_folder, write_atomic
from shared.errors import UserError
from shared.faults import fault_point
from train.layout import STATE, TRAINER, WEIGHTS, RunLayout, SweepLayout, is_checkpoint_dir

CHECKPOINT_FORMAT = 1


class CheckpointError(UserError):
    """No loadable checkpoint, or a damaged one; the message names the folder."""


def create_run_dir(parent: str | os.PathLike, name: str, checkpoints: bool = True) -> Path:
    """Create parent/name, or parent/name-2, -3 ... : an existing folder is never reused."""
    parent = make_folder(parent, "--out")
    for i in range(1, 10_000):
        path = parent / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as e:  # e.g. no permission to write in parent
            raise FolderError(f"--out {parent}: cannot create the run folder {path.name} ({e.strerror or e}); "
                              "choose a writable --out") from None
        if checkpoints:
            RunLayout(path).checkpoints.mkdir()
        fsync_path(parent)
        return path
    raise CheckpointError(f"too many runs named {name!r} under {parent}")


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], trainer: dict[str, Any],
                    state: dict[str, Any], keep: int) -> Path:
    """Commit checkpoint `step` atomically and delete all but the newest `keep`."""
    layout = RunLayout(run_dir)
    ckpts, final, tmp = layout.checkpoints, layout.step_dir(step), layout.tmp_step_dir(step)
    try:
        _write_checkpoint_dir(tmp, tensors, trainer, state, step)
    except Exception as e:  # torch.save / safetensors may report a full disk as their own errors
        if not _disk_full(e, ckpts):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give back the space of the partial checkpoint
        previous = list_checkpoints(run_dir)
        sweep = Path(run_dir).parent
        if SweepLayout.is_sweep(sweep):  # a sweep resumes as a whole, from scratch when nothing is committed
            kept = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                    else "no checkpoint is committed yet, so the sweep restarts from the beginning")
            then = f"continue with `train resume {sweep}`"
        elif previous:
            kept, then = f"the previous checkpoint {previous[-1].name} is intact", f"continue with `train resume {run_dir}`"
        else:
            kept = "no checkpoint is committed yet, so there is nothing to resume"
            then = f"start the run again with the same `train run` command (and delete {run_dir})"
        raise CheckpointError(f"disk full (no space left on device) while writing checkpoint {final}; {kept}. "
                              f"Free space, then {then}") from None
    for stale in layout.retired_dirs():  # left by a kill during an earlier deletion
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # same step written again after a resume: replace it
        _retire(final)
    os.rename(tmp, final)
    fsync_path(ckpts)
    for old in list_checkpoints(run_dir)[:-keep]:
        _retire(old)
    return final


def _retire(ckpt: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves it whole or gone: it is
    first renamed out of the committed names (atomic), then removed file by file."""
    trash = RunLayout.retired(ckpt)  # no stale one: save_checkpoint clears them first
    os.rename(ckpt, trash)
    fsync_path(ckpt.parent)
    fault_point("checkpoint_retire")
    shutil.rmtree(trash, ignore_errors=True)


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write was a full disk (or quota): by errno, by message, or by free space."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
        return True
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


def _write_checkpoint_dir(tmp: Path, tensors: dict[str, torch.Tensor], trainer: dict[str, Any],
                          state: dict[str, Any], step: int) -> None:
    """Write and fsync every file of a checkpoint into the (uncommitted) folder `tmp`."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    fault_point("checkpoint_mid_write")
    torch.save(trainer, tmp / TRAINER)
    sums = {}
    for name in (WEIGHTS, TRAINER):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
        sums[name] = file_checksum(tmp / name)
    state = {**state, "step": step, "checkpoint_format": CHECKPOINT_FORMAT, "checksums": sums}
    write_atomic(tmp / STATE, json.dumps(state, indent=1).encode())
    fsync_path(tmp)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoint folders of a run, oldest first."""
    return RunLayout(run_dir).step_dirs()


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """(tensors, trainer, state) of one checkpoint folder; CheckpointError if damaged."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        for name, digest in state["checksums"].items():
            if file_checksum(path / name) != digest:
                raise CheckpointError(f"checkpoint {path}: {name} fails its checksum")
        tensors = load_file(str(path / WEIGHTS), device=str(device))
        trainer = torch.load(path / TRAINER, map_location=device, weights_only=False)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    return tensors, trainer, state


def latest_checkpoint(run_dir_or_ckpt: str | os.PathLike, device: str | torch.device = "cpu"):
    """(run_dir, checkpoint_path, tensors, trainer, state) of the newest loadable checkpoint.

    Accepts a run folder or one checkpoint folder. A damaged newest checkpoint is reported with a
    warning and the previous one is used.
    """
    p = Path(run_dir_or_ckpt)
    if is_checkpoint_dir(p):
        return (RunLayout.of_checkpoint(p).root, p, *read_checkpoint(p, device))
    if not RunLayout(p).config.exists():
        raise CheckpointError(f"{p} is neither a run folder (no config.json) nor a checkpoint folder")
    candidates = list_checkpoints(p)
    for ckpt in reversed(candidates):
        try:
            return (p, ckpt, *read_checkpoint(ckpt, device))
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint")
    raise CheckpointError(f"{p} has no loadable checkpoint; start the run again with `train run`")
