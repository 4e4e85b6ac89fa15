"""Sweeps: many SAEs trained together from one pass over the store (each batch read once).

A spec is a TOML file::

    name = "smollm2-l8-k"            # optional
    distribute = "sae"               # optional; how torchrun ranks share the sweep (below)
    [base]                           # TrainConfig keys shared by every SAE
    store = "/data/acts"
    tokens = 1e6
    [grid]                           # every combination of these lists is one SAE
    arch = ["topk", "batchtopk"]
    k = [16, 32, 64]

The runs may read different sites (SAEs on several sites, transcoders on several site pairs:
grid keys site, in_site, out_site, arch, sparsity): the one store serves the union of their sites
row-aligned (train.site_pairs.union_sites), so each batch is still read once for all of them.

Layout (train.layout.SweepLayout): `SWEEP/sweep.json` (the resolved configs, in order) and one
run folder per SAE inside SWEEP, each with its own checkpoints, metrics.jsonl and wandb run (group
= sweep name). Each SAE's trainer is made by train.training.build_trainer, as a single run's is.
All SAEs checkpoint at the same steps; resuming restores every unfinished SAE to the newest step
all of them committed, so the sweep resumes exactly as a whole.

Ranks. Under torchrun (`torchrun --nproc_per_node=R -m train sweep SPEC.toml`) a sweep spreads its
SAEs over the ranks, `distribute = "sae"` (the default and, for now, the only choice: a sweep is
never data-parallel; train one SAE data-parallel with `torchrun -m train run`). Rank r trains the
SAEs with index i % R == r; every rank reads the whole of every global batch from the store itself
(same seed, same order: no data is communicated), and writes its own SAEs' run folders,
checkpoints and metrics; rank 0 writes sweep.json. The ranks meet at a barrier after each common
checkpoint and at the end, so no rank runs more than one checkpoint ahead. Each SAE ends
bit-identical (on CPU) to the same SAE of a one-process sweep. `train resume SWEEP` works on any
number of ranks (the unfinished SAEs are dealt round-robin again; each one's state is
self-contained); ranks beyond the number of SAEs idle. The out folder must be on a filesystem all
ranks share; the spec key `devices` (GPUs of a one-process sweep) is refused under torchrun, where
each rank uses its own device (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch

from shared.durable import write_atomic
from train.checkpoints import CheckpointError, create_run_dir, list_checkpoints, read_checkpoint
from train.config import (ConfigError, TrainConfig, cfg_from_saved, get_default_cfg, post_init_cfg,
                          sweep_shared_keys, update_cfg)
from train.distributed import SoloWorld, World
from train.layout import RunLayout, SweepLayout, step_of
from train.precision import resolve_new_run, write_measurement
from train.row_mask import resolve_row_mask
from train.runs import check_training_memory, open_cache, open_store, resolve_device, warn_many_epochs
from train.site_pairs import plan_of, resolve_run_sites, union_sites
from train.training import Restore, build_trainer, run_to_end

# Keys that define the shared data stream and schedule, equal for every SAE of a sweep: those
# declared sweep_shared in train.config.
SHARED_KEYS = sweep_shared_keys()
SPEC_KEYS = {"name", "base", "grid", "devices", "distribute"}
DISTRIBUTE = ("sae",)  # how torchrun ranks share a sweep: each rank trains some of its SAEs


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
        raise ConfigError(f"sweep spec {path}: unknown top-level key(s) {sorted(unknown)}; "
                          f"use name, base, grid, devices, distribute")
    distribute = spec.get("distribute", "sae")
    if distribute not in DISTRIBUTE:
        raise ConfigError(f"sweep spec {path}: distribute = {distribute!r} is not supported; use \"sae\" (under "
                          f"torchrun each rank trains some of the SAEs; sweeps are never data-parallel: train a "
                          f"single SAE data-parallel with `torchrun -m train run`)")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep spec {path}: grid.{key} must be a non-empty list")
    return spec


def expand_spec(spec: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[TrainConfig]:
    """Every grid combination applied to base, validated; shared keys must agree.

    overrides (the command line's --store, --out, --set) win over the spec: over its [base], and
    over its [grid] too, where a key they set is no longer varied (it takes the one value)."""
    overrides = overrides or {}
    base = update_cfg(get_default_cfg(), **{**spec.get("base", {}), **overrides})
    grid = {k: v for k, v in spec.get("grid", {}).items() if k not in overrides}
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
    """Train every SAE of a spec together; returns the sweep folder (on every rank).

    Under torchrun the SAEs are spread over the ranks (see the module docstring)."""
    spec = load_spec(spec_path)
    configs = expand_spec(spec, overrides)
    lead = configs[0]
    if not lead.store:
        raise ConfigError("the sweep has no store: set base.store (or --store)")
    if lead.keep_checkpoints < 2:  # the newest step committed by every SAE must still be on disk
        configs = [update_cfg(c, keep_checkpoints=2) for c in configs]
    if spec.get("devices") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("spec key devices places the SAEs of a one-process sweep on GPUs; under torchrun each "
                          "rank trains its share of the SAEs on its own device (cuda:LOCAL_RANK): remove devices")
    world = World.from_env(backend="gloo")
    cache = open_cache(lead)
    name = sweep_name(spec, configs)
    configs = [resolve_run_sites(cfg, cache.spec) for cfg in configs]
    if lead.mask_norm_multiple is not None and len({cfg.site for cfg in configs}) > 1:
        raise ConfigError("mask_norm_multiple measures norms at the run's site, and this sweep's SAEs read different "
                          "sites (one data stream needs one mask): sweep one site, or drop mask_norm_multiple")
    masked = resolve_row_mask(configs[0], cache, progress=progress and world.is_main)  # one mask: the keys are shared
    configs = [update_cfg(cfg, mask_token_ids=masked.mask_token_ids, mask_norm_threshold=masked.mask_norm_threshold)
               for cfg in configs]
    lead = configs[0]
    store = open_store(lead, _device(lead, world), sites=_sites(configs), cache=cache)  # every rank reads every batch
    try:
        created = None
        for cfg in configs:  # a model that cannot fit is refused before any folder is made
            check_training_memory(post_init_cfg(cfg, store.d_model, cfg.site), _device(cfg, world))
        if world.is_main:
            warn_many_epochs(lead, store)
            sweep_dir = create_run_dir(lead.out, name, checkpoints=False)
            name = sweep_dir.name
            records, measured = [], {}  # shape -> train.precision.Measurement (autocast=auto)
            for cfg, dev in zip(configs, _devices(spec, len(configs))):
                given = update_cfg(cfg, out=str(sweep_dir), wandb_group=cfg.wandb_group or name,
                                   **({"device": str(dev)} if dev is not None else {}))
                cfg, m = resolve_new_run(given, post_init_cfg(given, store.d_model, cfg.site), store,
                                         _device(given, world), measured=measured)  # autocast=auto: train.precision
                run_dir = create_run_dir(sweep_dir, cfg.run_name)
                write_atomic(RunLayout(run_dir).config, json.dumps(cfg.to_dict(), indent=1).encode())
                write_measurement(run_dir, m)
                records.append({"run_dir": run_dir.name, "config": cfg.to_dict()})
            write_atomic(SweepLayout(sweep_dir).spec, json.dumps({"name": name, "runs": records}, indent=1).encode())
            created = str(sweep_dir)
        sweep_dir = Path(world.broadcast(created))
        runs = _read_runs(sweep_dir, world)
        _train_share(runs, store, world, progress, step=None)
    finally:
        store.close()
    return sweep_dir


def _sites(configs: list[TrainConfig]) -> str | list[str]:
    """What the sweep's store serves: the union of the (resolved) runs' sites."""
    return union_sites([plan_of(c) for c in configs], configs[0].site)


def _device(cfg: TrainConfig, world: World) -> torch.device:
    """cfg.device; under torchrun a CUDA device becomes this rank's own GPU (cuda:LOCAL_RANK)."""
    device = resolve_device(cfg.device)
    return world.device(torch.device(device.type)) if world.size > 1 else device


def sweep_runs(sweep_dir: str | Path) -> list[tuple[Path, TrainConfig]]:
    """(run folder, config) of every SAE of a sweep folder, in sweep.json's order."""
    return _read_runs(Path(sweep_dir), World.single())


def _read_runs(sweep_dir: Path, world: World) -> list[tuple[Path, TrainConfig]]:
    """(run folder, config) of every SAE of a sweep, in sweep.json's order."""
    layout = SweepLayout(sweep_dir)
    try:
        record = json.loads(layout.spec.read_text())
    except FileNotFoundError:
        where = f" (rank {world.rank} of {world.size}: the out folder must be on a filesystem every rank shares)"
        raise ConfigError(f"{layout.spec} does not exist{where if world.size > 1 else ''}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{layout.spec} is not valid JSON ({e}); it is written once when the sweep starts: "
                          f"restore it, or start the sweep again with `train sweep SPEC`") from None
    try:
        return [(layout.run(r["run_dir"]).root, cfg_from_saved(r["config"])) for r in record["runs"]]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{layout.spec} does not describe a sweep (missing {e}); restore it, or start the sweep "
                          f"again with `train sweep SPEC`") from None


def _train_share(runs: list[tuple[Path, TrainConfig]], store, world: World, progress: bool,
                 step: int | None, fresh: bool = True) -> None:
    """Train this rank's share of `runs` (the j-th goes to rank j % world size) to the end.

    step: the checkpoint step every SAE restarts from; None or 0 starts them from scratch (fresh:
    new runs; else a resume that restarts them). The ranks that train SAEs meet at a barrier after
    each common checkpoint, all ranks (idle ones too) at the end."""
    mine = world.share(len(runs))
    group = world.subgroup(list(range(min(world.size, len(runs)))))  # collective: before any early return
    if not mine:
        warnings.warn(f"rank {world.rank} has no SAE to train ({len(runs)} SAEs over {world.size} ranks); "
                      f"it waits for the others")
        world.barrier()
        return
    progress = progress and world.is_main
    trainers = []
    for j in mine:
        run_dir, cfg = runs[j]
        # every SAE trains as in one process; the rank's last trainer checkpoints last, so its barrier
        # comes after all of this rank's SAEs committed the step: no rank gets a checkpoint ahead
        solo = SoloWorld(group=group) if world.size > 1 and j == mine[-1] else World.single()
        restore = None
        if step:
            ckpt = RunLayout(run_dir).step_dir(step)
            restore = Restore(ckpt, *read_checkpoint(ckpt))
        else:
            store.seek(0)
        trainers.append(build_trainer(cfg, store, run_dir, _device(cfg, world), world=solo, progress=progress,
                                      restore=restore, restart=not step and not fresh))
    if not step:
        store.seek(0)
    run_to_end(trainers, store, progress)
    world.barrier()


def is_sweep_dir(path: str | Path) -> bool:
    return SweepLayout.is_sweep(path)


def _resume_plan(runs: list[tuple[Path, TrainConfig]]) -> tuple[list[int], int]:
    """(indices of the unfinished SAEs, newest step all of them committed; 0 when none)."""
    pending = [i for i, (d, _) in enumerate(runs) if not RunLayout(d).done.exists()]
    steps = [{step_of(p) for p in list_checkpoints(runs[i][0])} for i in pending]
    common = set.intersection(*steps) if steps else set()
    return pending, max(common, default=0)


def resume_sweep(sweep_dir: str | Path, progress: bool = True) -> Path:
    """Resume the unfinished SAEs of a sweep from the newest step all of them committed, on any
    number of ranks (rank 0 reads the run folders; each SAE's state is self-contained)."""
    sweep_dir = Path(sweep_dir)
    world = World.from_env(backend="gloo")
    runs = _read_runs(sweep_dir, world)
    pending, step = world.broadcast(_resume_plan(runs) if world.is_main else None)
    if not pending:
        return sweep_dir
    runs = [runs[i] for i in pending]
    lead = runs[0][1]
    store = open_store(lead, _device(lead, world), sites=_sites([cfg for _, cfg in runs]))
    try:
        _train_share(runs, store, world, progress, step=step, fresh=False)
    except CheckpointError as e:
        raise CheckpointError(f"sweep {sweep_dir}: {e}") from None
    finally:
        store.close()
    return sweep_dir
