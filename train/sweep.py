"""Sweeps: many SAEs trained together from one pass over the store (each batch read once).

A spec is a TOML file::

    name = "smollm2-l8-k"            # optional
    [base]                           # TrainConfig keys shared by every SAE
    store = "/data/acts"
    tokens = 1e6
    [grid]                           # every combination of these lists is one SAE
    arch = ["topk", "batchtopk"]
    k = [16, 32, 64]

Layout: `SWEEP/sweep.json` (the resolved configs, in order) and one run folder per SAE inside
SWEEP, each with its own checkpoints, metrics.jsonl and wandb run (group = sweep name). All SAEs
checkpoint at the same steps; resuming restores every unfinished SAE to the newest step all of
them committed, so the sweep resumes exactly as a whole.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

import torch

from shared.cache import write_atomic
from train.checkpoints import CheckpointError, create_run_dir, list_checkpoints, read_checkpoint
from train.config import ConfigError, TrainConfig, cfg_from_dict, get_default_cfg, post_init_cfg, update_cfg
from train.logs import RunLogger
from train.training import (Trainer, build_from_cfg, finish_run, make_optimizer, open_store, resolve_device,
                            train_loop, _init_b_dec)

# Keys that define the shared data stream and schedule: equal for every SAE of a sweep.
SHARED_KEYS = ("store", "site", "batch_size", "tokens", "window_shards", "heldout_shards", "normalize", "drop_bos",
               "seed", "checkpoint_every", "out")
SPEC_KEYS = {"name", "base", "grid", "devices"}


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"sweep spec {path} is not valid TOML: {e}") from None
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown top-level key(s) {sorted(unknown)}; use name, base, grid, devices")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep spec {path}: grid.{key} must be a non-empty list")
    return spec


def expand_spec(spec: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[TrainConfig]:
    """Every grid combination applied to base (+ overrides), validated; shared keys must agree."""
    base = update_cfg(get_default_cfg(), **spec.get("base", {}), **(overrides or {}))
    grid = spec.get("grid", {})
    for key in grid:
        if key in SHARED_KEYS:
            raise ConfigError(f"grid.{key}: {key} is shared by all SAEs of a sweep (one data stream); move it to [base]")
    keys = list(grid)
    configs = [update_cfg(base, **dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
    if not configs:
        raise ConfigError("the sweep spec describes no SAE")
    return configs


def sweep_name(spec: dict[str, Any], configs: list[TrainConfig]) -> str:
    digest = hashlib.sha256(json.dumps([c.to_dict() for c in configs], sort_keys=True).encode()).hexdigest()[:8]
    return f"sweep-{spec.get('name', 'sweep')}-{digest}"


def _devices(spec: dict[str, Any], n: int) -> list[torch.device]:
    names = spec.get("devices") or [None]
    return [resolve_device(names[i % len(names)]) if names[i % len(names)] else None for i in range(n)]


def run_sweep(spec_path: str | Path, overrides: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """Train every SAE of a spec together; returns the sweep folder."""
    spec = load_spec(spec_path)
    configs = expand_spec(spec, overrides)
    lead = configs[0]
    if not lead.store:
        raise ConfigError("the sweep has no store: set base.store (or --store)")
    if lead.keep_checkpoints < 2:
        configs = [update_cfg(c, keep_checkpoints=2) for c in configs]
    device = resolve_device(lead.device)
    store = open_store(lead, device)
    try:
        sweep_dir = create_run_dir(lead.out, sweep_name(spec, configs), checkpoints=False)
        name = sweep_dir.name
        devices = _devices(spec, len(configs))
        trainers, records = [], []
        for cfg, dev in zip(configs, devices):
            cfg = post_init_cfg(update_cfg(cfg, out=str(sweep_dir), wandb_group=cfg.wandb_group or name),
                                store.d_model, store.sites[0])
            if dev is not None:
                cfg = update_cfg(cfg, device=str(dev))
            sae = build_from_cfg(cfg, resolve_device(cfg.device))
            _init_b_dec(cfg, sae, store)
            run_dir = create_run_dir(sweep_dir, cfg.run_name)
            write_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1).encode())
            records.append({"run_dir": run_dir.name, "config": cfg.to_dict()})
            trainers.append(_trainer(cfg, sae, store, run_dir, progress))
        write_atomic(sweep_dir / "sweep.json", json.dumps({"name": name, "runs": records}, indent=1).encode())
        _train_and_finish(trainers, store, progress)
    finally:
        store.close()
    return sweep_dir


def _trainer(cfg: TrainConfig, sae, store, run_dir: Path, progress: bool, resume_step: int | None = None) -> Trainer:
    logger = RunLogger(run_dir, cfg.to_dict(), cfg.wandb_mode, cfg.wandb_project, cfg.wandb_group,
                       resume_step=resume_step)
    return Trainer(cfg, sae, store, make_optimizer(cfg, sae), run_dir, logger=logger, progress=progress)


def _train_and_finish(trainers: list[Trainer], store, progress: bool) -> None:
    try:
        train_loop(trainers, store, progress)
        for t in trainers:
            finish_run(t)
    finally:
        for t in trainers:
            t.logger.close()


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "sweep.json").exists()


def resume_sweep(sweep_dir: str | Path, progress: bool = True) -> Path:
    """Resume the unfinished SAEs of a sweep from the newest step all of them committed."""
    sweep_dir = Path(sweep_dir)
    record = json.loads((sweep_dir / "sweep.json").read_text())
    runs = [(sweep_dir / r["run_dir"], cfg_from_dict(r["config"])) for r in record["runs"]]
    pending = [(d, c) for d, c in runs if not (d / "done.json").exists()]
    if not pending:
        return sweep_dir
    steps = [{int(p.name.split("-")[1]) for p in list_checkpoints(d)} for d, _ in pending]
    common = set.intersection(*steps) if steps else set()
    lead = pending[0][1]
    store = open_store(lead, resolve_device(lead.device))
    try:
        trainers = []
        for run_dir, cfg in pending:
            sae = build_from_cfg(cfg, resolve_device(cfg.device))
            if common:
                step = max(common)
                tensors, trainer_state, state = read_checkpoint(run_dir / "checkpoints" / f"step-{step:09d}")
                t = _trainer(cfg, sae, store, run_dir, progress, resume_step=step)
                t.restore({k: v.to(t.device) for k, v in tensors.items()}, trainer_state, state)
            else:  # killed before the first common checkpoint: start these SAEs again
                store.seek(0)
                _init_b_dec(cfg, sae, store)
                t = _trainer(cfg, sae, store, run_dir, progress, resume_step=0)
            trainers.append(t)
        if not common:
            store.seek(0)
        _train_and_finish(trainers, store, progress)
    except CheckpointError as e:
        raise CheckpointError(f"sweep {sweep_dir}: {e}") from None
    finally:
        store.close()
    return sweep_dir
