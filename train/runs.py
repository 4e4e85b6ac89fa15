"""Loading a run or a checkpoint: its config, its SAE, its store (the names are train.layout's).

    load_sae(path)             the SAE of a checkpoint folder, from that folder alone: state.json
                               records its architecture and constructor arguments
                               (train.sae.registry.sae_record). A checkpoint older than that
                               record is rebuilt from its run's config.json instead.
    load_sae_checkpoint(path)  the same for a run folder's newest loadable checkpoint (or one
                               checkpoint folder), with the run's config and the checkpoint's
                               state: what evaluation, calibration and export start from
    load_run_config(run_dir)   the run's resolved TrainConfig (config.json)
    open_store(cfg, device)    the run's ActivationStore (training rows; held-out shards for evaluation):
                               an SAE's site, or a transcoder's input and target sites (train.site_pairs)
    check_training_memory      refuses a model that would not fit (a clt: train.sae.clt's formula)
    warn_many_epochs(cfg, store)  a warning when the token budget is many passes over a small cache
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.cache import Cache
from shared.counts import format_count
from shared.devices import DeviceError, resolve_device as resolve_any_device
from train.activation_store import ActivationStore
from train.checkpoints import CheckpointError, latest_checkpoint, read_checkpoint
from train.config import TrainConfig, cfg_from_saved
from train.distributed import World
from train.errors import TrainingError
from train.layout import STATE, RunLayout, is_checkpoint_dir
from train.row_mask import RowMask, resolve_row_mask
from train.sae import BaseAutoencoder
from train.sae.clt import check_memory
from train.sae.registry import build_from_cfg, sae_class, sae_from_record
from train.site_pairs import plan_of


def resolve_device(device: str) -> torch.device:
    """A config's device setting (auto, cpu, cuda, cuda:N) as a torch.device; TrainingError if absent."""
    try:
        return resolve_any_device(device, "config key device:")
    except DeviceError as e:
        raise TrainingError(str(e)) from None


def open_cache(cfg: TrainConfig) -> Cache:
    """The config's cache (sealed, unless allow_unsealed)."""
    return Cache.open(cfg.store, allow_unsealed=cfg.allow_unsealed)


def open_store(cfg: TrainConfig, device: torch.device, world: World = World(), *,
               sites: str | list[str] | None = None, cache: Cache | None = None) -> ActivationStore:
    """The training store of a config (training rows only; held-out shards for evaluation): it
    serves an SAE's site as a tensor, a transcoder's sites (train.site_pairs.plan_of) as a dict, or
    `sites` (a sweep's union), without the rows of the config's mask (train.row_mask; an unresolved
    mask is resolved first, as at run creation). Under torchrun each rank is served its slice of every global batch."""
    if sites is None:
        plan = plan_of(cfg)
        sites = cfg.site if plan.outputs is None else plan.sites
    cache = cache if cache is not None else open_cache(cfg)
    mask = RowMask.from_cfg(resolve_row_mask(cfg, cache))  # a no-op for a run's (resolved) config
    return ActivationStore(
        cache, sites=sites, batch_size=cfg.batch_size, window_shards=cfg.window_shards,
        seed=cfg.seed, heldout_shards=cfg.heldout_shards, drop_bos=cfg.drop_bos, row_mask=mask,
        normalize=cfg.normalize, device=device, rank=world.rank, world_size=world.size,
        allow_unsealed=cfg.allow_unsealed, threads=cfg.store_threads, window_io=cfg.store_io,
    )


MANY_EPOCHS = 10  # a token budget this many times the training rows is worth a warning


def warn_many_epochs(cfg: TrainConfig, store: ActivationStore) -> None:
    """Warn when cfg.tokens means MANY_EPOCHS or more passes over the store's training rows (a small
    cache: every row is seen that many times, and the SAE may fit those rows rather than the model)."""
    epochs = cfg.tokens / max(store.rows_per_epoch, 1)
    if epochs >= MANY_EPOCHS:
        warnings.warn(f"tokens={format_count(cfg.tokens)} is {epochs:.0f} epochs over the {store.rows_per_epoch:,} "
                      f"training rows of {cfg.store}: each row is seen about {epochs:.0f} times; harvest more "
                      f"tokens (harvest run --tokens) or train on fewer (--tokens)")


def available_memory(device: torch.device) -> int:
    """Bytes free for a training run on `device`: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_training_memory(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse (train.sae.clt.MemoryLimitError, with the numbers) a model whose class estimates its
    training memory (`training_memory`: a clt) when the estimate exceeds memory_limit_gib or,
    without one, what `device` has available."""
    estimate = sae_class(cfg.arch).training_memory(cfg)
    if estimate is not None:
        check_memory(estimate, available_memory(device), str(device), cfg.memory_limit_gib)


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The run's config.json; keys added since it was written take the value it computed with."""
    return cfg_from_saved(json.loads(RunLayout(run_dir).config.read_text()))


@dataclass
class LoadedCheckpoint:
    run_dir: Path
    checkpoint: Path
    cfg: TrainConfig
    sae: BaseAutoencoder
    state: dict[str, Any]
    trainer_state: dict[str, Any]


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> BaseAutoencoder:
    """The SAE (eval mode) of a checkpoint folder, wherever it lies, or of a run folder's newest
    loadable checkpoint. Checksums are checked (train.checkpoints.read_checkpoint)."""
    p = Path(path)
    if (p / STATE).exists() and not is_checkpoint_dir(p):  # a checkpoint folder outside its run
        tensors, _, state = read_checkpoint(p)
        return _rebuild(p, state, tensors, None, torch.device(device))
    run_dir, ckpt, tensors, _, state = latest_checkpoint(p)
    return _rebuild(ckpt, state, tensors, run_dir, torch.device(device))


def load_sae_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """The SAE of a run folder (its newest loadable checkpoint) or of one checkpoint folder, with
    the run's config and the checkpoint's state."""
    run_dir, ckpt, tensors, trainer_state, state = latest_checkpoint(path)
    sae = _rebuild(ckpt, state, tensors, run_dir, torch.device(device))
    return LoadedCheckpoint(run_dir, ckpt, load_run_config(run_dir), sae, state, trainer_state)


def _rebuild(ckpt: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], run_dir: Path | None,
             device: torch.device) -> BaseAutoencoder:
    """The checkpoint's SAE with its weights: from its record, else from the run's config.json."""
    record = state.get("sae")
    try:
        if record is not None:
            sae = sae_from_record(record, device)
        elif run_dir is not None and RunLayout(run_dir).config.exists():  # a checkpoint older than the record
            sae = build_from_cfg(load_run_config(run_dir), device)
        else:
            raise CheckpointError(f"checkpoint {ckpt} does not record its SAE's architecture (it predates that "
                                  "record); load it from inside its run folder, whose config.json describes it")
    except ValueError as e:  # e.g. an architecture no longer registered
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from None
    sae.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    sae.eval()
    return sae
