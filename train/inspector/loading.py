"""What `train inspect` opens: the SAE of a run or checkpoint, its cache, its scaling, its encoder,
and the shards to stream. Every use of the training code's loaders is in `load_target`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from shared.cache import Cache
from shared.errors import UserError


class InspectError(UserError):
    """A run cannot be inspected as asked; the message says what to do."""


@dataclass
class Target:
    """A loaded SAE and what its inputs were.

    scale: the factor s the run multiplied raw activations by (1 without normalize).
    drop_bos: the run skipped rows at context position 0; mask: all the rows it left out
    (train.row_mask). heldout: the run's held-out shards.
    """

    run_dir: Path
    checkpoint: Path
    cfg: Any  # train.config.TrainConfig
    state: dict[str, Any]
    sae: Any  # train.sae.BaseAutoencoder
    cache: Cache
    scale: float
    drop_bos: bool
    heldout: list[int]
    mask: Any  # train.row_mask.RowMask


def load_target(path: str | os.PathLike, store_path: str | None = None) -> Target:
    """The SAE of a run folder (newest loadable checkpoint) or of one checkpoint folder, on the CPU,
    with the cache it was trained on (or store_path), checked to be that cache."""
    from train.errors import EvalError
    from train.evaluation import checkpoint_scaling, open_cache_checked
    from train.row_mask import RowMask, resolve_row_mask
    from train.runs import load_sae_checkpoint

    run = load_sae_checkpoint(path)
    try:
        cache = open_cache_checked(run.cfg, run.state, store_path)
    except EvalError as e:
        raise InspectError(str(e)) from None
    shards = cache.shards
    n_held = run.cfg.heldout_shards if 0 < run.cfg.heldout_shards < len(shards) else 0
    return Target(run.run_dir, run.checkpoint, run.cfg, run.state, run.sae, cache,
                  checkpoint_scaling(run, cache).factor(run.cfg.site), bool(run.cfg.drop_bos), shards[len(shards) - n_held :],
                  RowMask.from_cfg(resolve_row_mask(run.cfg, cache)))


def inference_encoder(sae, checkpoint: Path | str) -> tuple[Callable[[Tensor], Tensor], str]:
    """(encode: x [B, d] normalised -> f [B, m], a label): the per-token encoding the SAE exports as
    (its first declared encoding). A variant whose inference needs a calibration it has not had
    (BatchTopK without a threshold) is refused."""
    if not sae.calibrated:
        raise InspectError(f"{checkpoint} is a {sae.title} SAE without a calibrated inference threshold, so it has "
                           f"no per-token encoding to inspect; run `train calibrate {checkpoint}` first")
    enc = sae.encodings()[0]
    return (lambda x: enc.encode(sae, x)), enc.label


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_shards(text: str, available: list[int], where: str) -> list[int]:
    """'3,5-7' -> [3, 5, 6, 7], each checked against the cache's readable shards."""
    out: list[int] = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise InspectError(f"--shards {text!r}: {part.strip()!r} is not a shard or a range like 5-7")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise InspectError(f"--shards {text!r}: range {lo}-{hi} is empty; write it low-high")
        out.extend(range(lo, hi + 1))
    have = set(available)
    missing = [k for k in out if k not in have]
    if missing:
        span = f"0..{max(available)}" if available == list(range(len(available))) else f"{len(available)} shards"
        raise InspectError(f"--shards: shard {missing[0]} is not in the cache {where} (it has {span}); "
                           "choose shards from `harvest info`")
    return sorted(set(out))


def choose_shards(target: Target, shards: str | None) -> list[int]:
    """The shards to stream: --shards, else the run's held-out shards."""
    if shards is not None:
        return parse_shards(shards, target.cache.shards, target.cache.where)
    if not target.heldout:
        raise InspectError(f"run {target.run_dir} kept no held-out shards (heldout_shards=0); pass --shards "
                           "(e.g. --shards 0-3; note the run trained on them)")
    return list(target.heldout)


def resolve_device(spec: str) -> torch.device:
    from shared.devices import DeviceError, resolve_device as resolve

    try:
        return resolve(spec, "--device")
    except DeviceError as e:
        raise InspectError(str(e)) from None
