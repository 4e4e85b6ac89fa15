"""The training loop: store -> SAE -> loss -> Adam -> logs / checkpoints, with exact resume.

`sae, run_dir = train_sae(model, cfg)` and `resume_training(model, cfg, checkpoint_path)` keep
the seed's names. Everything a step depends on (weights, Adam moments, step, store position,
dead-latent counters, RNG states) is in each checkpoint, and the learning-rate and sparsity
schedules are pure functions of the tokens seen, so a resumed run ends bit-identical (on CPU) to
an uninterrupted one; so is a variant's own schedule (TopK's k annealing: the SAE's
`set_training_tokens`, called before every step).

Here: the Trainer (one step, logging, checkpoints), train_loop (several trainers on one stream of
batches, as a sweep does), build_trainer (the one way to make a Trainer: new, or restored from a
checkpoint; train_sae, resume_training and train.sweep use it), finish_run (the variant's
calibration and final results, the final checkpoint, done.json). Elsewhere: the SAE and what its
variant declares (train.sae), held-out figures and threshold statistics (train.heldout), loading
a run, its config and its store (train.runs), the run folder's names (train.layout), the
dataset scaling (train.scaling). threshold_loop_collect / threshold_loop_compute, open_store,
load_run_config, resolve_device and build_from_cfg stay importable from here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from shared.durable import write_atomic
from shared.faults import fault_point
from train.activation_store import ActivationStore
from train.checkpoints import create_run_dir, latest_checkpoint, save_checkpoint
from train.config import TrainConfig, cfg_from_dict, post_init_cfg, resumable_keys, update_cfg
from train.distributed import World
from train.errors import TrainingError
from train.heldout import evaluate_heldout, threshold_loop_collect, threshold_loop_compute  # noqa: F401 (seed names)
from train.layout import RunLayout
from train.logs import FINAL, RunLogger, density_histogram, flatten
from train.precision import check_available, check_resolved, resolve_new_run, step_precision, write_measurement
from train.row_mask import resolve_row_mask
from train.runs import (check_training_memory, load_run_config, open_cache, open_store,  # noqa: F401 (as before)
                        resolve_device, warn_many_epochs)
from train.sae import BaseAutoencoder
from train.sae.base import device_of
from train.sae.losses import auxk_refresh_steps, refresh_auxk_candidates
from train.sae.registry import build_from_cfg, sae_record
from train.scaling import Scaling
from train.schedules import lr_multiplier, sparsity_multiplier  # noqa: F401 (importable from here, as before)
from train.site_pairs import EncoderInputs, SitePlan, plan_of, resolve_run_sites


def use_deterministic_kernels(device: torch.device, deterministic: bool) -> None:
    """On CUDA with `deterministic`, make every step bit-reproducible so that resume is exact:
    torch's deterministic algorithms (index_add_ / scatter without float atomics) and cuBLAS's
    fixed workspace (CUBLAS_WORKSPACE_CONFIG, if the user set none). Process-wide; warn_only, so an
    op without a deterministic version warns instead of failing. CPU kernels are deterministic."""
    if device.type != "cuda" or not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """One run's mutable state. `run()` trains until cfg.tokens, checkpointing on the way."""

    cfg: TrainConfig
    sae: BaseAutoencoder
    store: ActivationStore
    optimizer: torch.optim.Optimizer
    run_dir: Path
    step: int = 0
    tokens: int = 0
    fire_counts: torch.Tensor | None = None  # [m] tokens each latent fired on since last density log
    density_tokens: int = 0
    logger: RunLogger | None = None
    progress: bool = True
    last_checkpoint: Path | None = None
    world: World = field(default_factory=World)
    plan: SitePlan | None = None  # which sites of a store batch the model reads and predicts (train.site_pairs)
    _bad: torch.Tensor | None = field(default=None, repr=False)  # first step with a non-finite loss or grad; -1: none
    _auxk_due: bool = field(default=True, repr=False)  # refresh AuxK's candidates at the next step

    @property
    def device(self) -> torch.device:
        return device_of(self.sae)

    def __post_init__(self) -> None:
        check_resolved(self.cfg)  # autocast=auto is resolved when the run is created (train.precision)
        dev = device_of(self.sae)
        check_available(self.cfg, dev)  # autocast=tf32 on a device without TF32 (a resume elsewhere)
        if self.plan is None:
            self.plan = plan_of(self.cfg)
        use_deterministic_kernels(dev, self.cfg.deterministic)
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(self.sae.d_sae, dtype=torch.long, device=dev)
        self._bad = torch.full((), -1, dtype=torch.long, device=dev)
        self._micro = self.cfg.micro_batch_size or self.cfg.batch_size
        self._forward = torch.compile(self.sae) if self.cfg.compile else self.sae
        self._t_log, self._tok_log = time.perf_counter(), self.tokens
        self._auxk_every = auxk_refresh_steps(self.cfg.dead_tokens_threshold, self.cfg.batch_size)

    def _refresh_auxk(self) -> None:
        """AuxK's candidate latents, read on the host every _auxk_every steps and at the first step
        after a checkpoint or a restore (the same steps in a resumed run): train.sae.losses."""
        if self.sae.aux_coeff and (self._auxk_due or self.step % self._auxk_every == 0):
            refresh_auxk_candidates(self.sae, self._auxk_every * self.cfg.batch_size)
            self._auxk_due = False

    # ----- one step
    def train_step(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step on this rank's slice of the global batch: x [batch_size / world size,
        d_in], or the store's dict of sites, of which the model reads its input and target (an SAE's
        target is its input; self.plan); returns detached loss parts of the step (this rank's).
        Runs in the run's float32 matmul precision (train.precision.step_precision: TF32 under
        autocast tf32, exact float32 otherwise), the process's own restored after the step."""
        with step_precision(self.cfg):
            return self._step(batch)

    def _step(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg, sae = self.cfg, self.sae
        x, y = self.plan.pair(batch)
        x = x.to(self.device, non_blocking=True)
        y = None if y is None else y.to(self.device, non_blocking=True)
        counters_before = sae.tokens_since_fired.clone() if self.world.size > 1 else None
        self._refresh_auxk()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_multiplier(cfg, self.tokens) * group.get("lr_scale", 1.0)
        scale = sparsity_multiplier(cfg, self.tokens)
        sae.set_training_tokens(self.tokens)  # the variant's own schedule (k annealing), a function of tokens
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, torch.Tensor] = {}
        n = x.shape[0]
        targets = y.split(self._micro) if y is not None else [None] * -(-n // self._micro)
        for micro, target in zip(x.split(self._micro), targets):
            with torch.autocast(micro.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
                out = self._forward(micro, sparsity_coeff_scale=scale, latents=False,  # the step reads none
                                    **({} if target is None else {"target": target}))
            (out.loss * (micro.shape[0] / n)).backward()
            self.fire_counts += out.fired
            w = micro.shape[0] / n
            for k, v in {"loss": out.loss, **out.losses}.items():
                parts[k] = parts.get(k, 0) + v.detach() * w
        params = [p for p in sae.parameters() if p.grad is not None]
        self.world.average_gradients(params)
        if counters_before is not None:
            self.world.merge_dead_counters(sae.tokens_since_fired, counters_before, n * self.world.size)
        sae.remove_parallel_decoder_grad()
        if (self.step + 1) % cfg.log_every == 0:  # per-parameter norms before clipping, on log steps only
            for name, p in sae.named_parameters():
                if p.grad is not None:
                    parts[f"grad_norm/{name}"] = p.grad.norm()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm)
        diverged = ~(torch.isfinite(parts["loss"]) & torch.isfinite(parts["grad_norm"]))  # no host sync
        self._bad = torch.where(diverged & (self._bad < 0), self.step + 1, self._bad)
        self.optimizer.step()
        sae.make_decoder_unit_norm()
        self.step += 1
        self.tokens += n * self.world.size
        self.density_tokens += n
        return parts

    # ----- after each step
    def after_step(self, parts: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Log every cfg.log_every steps (the only host syncs of the loop); returns the metrics logged."""
        cfg = self.cfg
        if self.step % cfg.log_every:
            return None
        self._check_finite()
        now = time.perf_counter()
        metrics = self._metrics(parts, (self.tokens - self._tok_log) / max(now - self._t_log, 1e-9))
        self._t_log, self._tok_log = now, self.tokens
        if self.step % cfg.density_every == 0:
            metrics.update(self._density())
        self.log(metrics)
        return metrics

    def _check_finite(self) -> None:
        """TrainingError once a step's loss or gradient norm was inf or NaN (training diverged); no
        checkpoint is written after it, so the last one is the last good state."""
        step = int(self._bad)
        if step >= 0:
            where = (f"last good checkpoint: {self.last_checkpoint}, kept" if self.last_checkpoint
                     else "no checkpoint was written")
            raise TrainingError(
                f"training diverged at step {step}: the loss or its gradient norm became NaN or inf ({where}); lower "
                f"the learning rate (lr={self.cfg.lr:g}), check the cache with `harvest verify`, or clip gradients "
                f"harder (max_grad_norm={self.cfg.max_grad_norm})"
            )

    def _metrics(self, parts: dict[str, torch.Tensor], tokens_per_s: float) -> dict[str, Any]:
        sae = self.sae
        m: dict[str, Any] = {k: float(v) for k, v in parts.items()}
        m["tokens"] = self.tokens
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        m["dead_latents"] = int(sae.dead_mask().sum())
        m["dead_fraction"] = m["dead_latents"] / sae.d_sae
        m["tokens_per_s"] = tokens_per_s
        return m

    def _density(self) -> dict[str, Any]:
        hist = density_histogram(self.fire_counts, self.density_tokens)
        self.fire_counts.zero_()
        self.density_tokens = 0
        return {"density_hist": hist, "density/below_1e-5": hist["below_1e-5"], "density/below_1e-6": hist["below_1e-6"]}

    def evaluate(self) -> dict[str, float]:
        """Held-out reconstruction figures, logged as eval/*; training state is not touched."""
        if not self.store.heldout_shards or not self.world.is_main:
            return {}
        figures = evaluate_heldout(self.sae, self.store, max_batches=self.cfg.eval_batches, plan=self.plan)
        self.log({f"eval/{k}": v for k, v in figures.items()})
        return figures

    def log(self, metrics: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(self.step, metrics)

    # ----- checkpoints
    def checkpoint(self, extra_state: dict[str, Any] | None = None) -> Path | None:
        """Commit a checkpoint of everything the next step depends on (refused after a NaN).
        Rank 0 writes it; the other ranks wait for it."""
        self._check_finite()
        self._auxk_due = True  # a run resumed from here refreshes at its first step: so does this one
        if not self.world.is_main:
            self.world.barrier()
            return None
        trainer = {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "fire_counts": self.fire_counts,
            "density_tokens": self.density_tokens,
        }
        record = sae_record(self.sae)  # what rebuilds the SAE from this checkpoint alone (train.runs.load_sae)
        state = {"tokens": self.tokens, "store": self.store.state_dict(), "arch": self.sae.arch,
                 **({"sae": record} if record is not None else {}), **Scaling.from_store(self.store).to_state(),
                 "threshold_kind": self.sae.describe()["threshold_kind"], **(extra_state or {})}
        self.last_checkpoint = save_checkpoint(self.run_dir, self.step, self.sae.state_dict(), trainer, state,
                                               keep=self.cfg.keep_checkpoints)
        self.world.barrier()
        return self.last_checkpoint

    def restore(self, tensors: dict[str, torch.Tensor], trainer: dict[str, Any], state: dict[str, Any]) -> None:
        self.sae.load_state_dict(tensors)
        self.optimizer.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["torch_rng"].cpu())
        if trainer["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in trainer["cuda_rng"]])
        self.fire_counts = trainer["fire_counts"].to(self.device)
        self.density_tokens = trainer["density_tokens"]
        self.step, self.tokens = state["step"], state["tokens"]
        self._tok_log = self.tokens
        self.store.load_state_dict(state["store"])


def train_loop(trainers: list[Trainer], store: ActivationStore, progress: bool = True) -> None:
    """Train every trainer on the same batches (each read once) until their shared token budget,
    checkpointing all of them at the same steps so that a sweep resumes as a whole."""
    lead = trainers[0]
    cfg = lead.cfg
    desc = cfg.run_name if len(trainers) == 1 else f"sweep of {len(trainers)} SAEs"
    progress = progress and lead.world.is_main
    bar = tqdm(total=cfg.tokens, initial=lead.tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=desc, dynamic_ncols=True)
    next_ckpt = (lead.tokens // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    next_eval = (lead.tokens // cfg.eval_every + 1) * cfg.eval_every if cfg.eval_every else None
    try:
        while lead.tokens < cfg.tokens:
            batch = store.next_batch()  # a tensor, or a dict of sites each trainer takes its own from
            for t in trainers:
                metrics = t.after_step(t.train_step(batch))
                if metrics is not None and t is lead:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                    dead=metrics["dead_latents"], refresh=False)
            fault_point("after_optimizer_step")
            rows = batch if isinstance(batch, torch.Tensor) else next(iter(batch.values()))
            bar.update(rows.shape[0] * lead.world.size)
            if next_eval is not None and next_eval <= lead.tokens < cfg.tokens:
                for t in trainers:
                    t.evaluate()
                next_eval += cfg.eval_every
            if next_ckpt <= lead.tokens < cfg.tokens:
                for t in trainers:
                    t.checkpoint()
                next_ckpt += cfg.checkpoint_every
        for t in trainers:
            t._check_finite()
    finally:
        bar.close()


# --------------------------------------------------------------------------- construction


def generate_checkpoint_dir(cfg: TrainConfig) -> Path:
    """A new, never reused run folder under cfg.out named after cfg.run_name."""
    return create_run_dir(cfg.out, cfg.run_name)


def make_optimizer(cfg: TrainConfig, sae: BaseAutoencoder) -> torch.optim.Optimizer:
    """Adam over the SAE's parameter groups (sae.param_groups: one, unless a variant gives some
    parameters their own learning-rate factor "lr_scale", e.g. JumpReLU's thresholds)."""
    # fused: one pass over each parameter instead of about ten (CPU and CUDA kernels; same update rule)
    fused = device_of(sae).type in ("cpu", "cuda")
    groups = [{**g, "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in sae.param_groups()]
    return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _init_from_data(cfg: TrainConfig, sae: BaseAutoencoder, store: ActivationStore, world: World = World()) -> None:
    """b_dec (cfg.b_dec_init; a transcoder's input centre and output bias from its input and target
    rows), then the variant's own data-dependent init (sae.init_from_sample, from the input rows),
    from the first global training batch (the store is rewound afterwards)."""
    if cfg.b_dec_init == "zeros" and not sae.wants_init_sample:
        return
    x, y = plan_of(cfg).pair(store.next_batch())
    store.seek(0)
    samples = [world.gather_rows(t)[:4096].float() for t in (x, y) if t is not None]
    if cfg.b_dec_init != "zeros":
        sae.init_b_dec(*samples, method=cfg.b_dec_init)
    sae.init_from_sample(samples[0])


class Restore(NamedTuple):
    """A checkpoint to continue from: its folder and what train.checkpoints.read_checkpoint returns."""

    checkpoint: Path
    tensors: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    state: dict[str, Any]


def build_trainer(cfg: TrainConfig, store: ActivationStore, run_dir: Path, device: torch.device, *,
                  world: World = World(), progress: bool = True, restore: Restore | None = None,
                  restart: bool = False) -> Trainer:
    """The one way to make a Trainer (train_sae, resume_training and train.sweep).

    The SAE `cfg` describes, on `device`, with its optimiser and (rank 0) its logger; then either
    restored from `restore` (weights, optimiser, RNG states, counters, store position) or new: b_dec
    (and a variant's data-dependent init) from the store's first global batch, which must be at position 0 (it is rewound there).
    restart: a new start of an existing run folder (a sweep resumed without a common checkpoint),
    whose old metrics are dropped. A model whose class estimates its training memory (a clt) is
    refused first when it does not fit (train.runs.check_training_memory).
    """
    check_training_memory(cfg, device)
    sae = build_from_cfg(cfg, device)
    if restore is None:
        _init_from_data(cfg, sae, store, world)
    resume_step = restore.state["step"] if restore is not None else (0 if restart else None)
    logger = (RunLogger(run_dir, cfg.to_dict(), cfg.wandb_mode, cfg.wandb_project, cfg.wandb_group,
                        resume_step=resume_step) if world.is_main else None)
    trainer = Trainer(cfg, sae, store, make_optimizer(cfg, sae), run_dir, logger=logger, progress=progress,
                      world=world)
    if restore is not None:
        trainer.restore({k: v.to(trainer.device) for k, v in restore.tensors.items()}, restore.trainer, restore.state)
        trainer.last_checkpoint = restore.checkpoint
    return trainer


def _as_config(cfg: TrainConfig | dict[str, Any]) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else cfg_from_dict(cfg)


# --------------------------------------------------------------------------- after training


def calibrate_and_evaluate(trainer: Trainer) -> dict[str, Any]:
    """After training: the variant's calibration (if it needs one: cfg.threshold_kind on
    cfg.threshold_batches held-out batches), then its held-out results (sae.final_results)."""
    cfg, sae, store = trainer.cfg, trainer.sae, trainer.store
    if cfg.heldout_shards == 0:
        return {}
    if sae.needs_calibration:
        sae.calibrate(EncoderInputs(store, trainer.plan), cfg.threshold_kind, cfg.threshold_batches)
    return sae.final_results(lambda encoding: evaluate_heldout(sae, store, encoding=encoding, plan=trainer.plan))


# --------------------------------------------------------------------------- entry points


def run_to_end(trainers: list[Trainer], store: ActivationStore, progress: bool = True) -> None:
    """Train every trainer to the token budget (train_loop), finish each (finish_run), close the loggers."""
    try:
        train_loop(trainers, store, progress)
        for t in trainers:
            finish_run(t)
    finally:
        for t in trainers:
            if t.logger is not None:
                t.logger.close()


def finish_run(trainer: Trainer) -> None:
    """After training: calibrate, evaluate, write the final checkpoint, log the results, and last
    done.json, which marks the run finished (rank 0)."""
    if not trainer.world.is_main:
        trainer.world.barrier()
        return
    results = calibrate_and_evaluate(trainer)
    if trainer.density_tokens:  # the density since the last one logged: a short run gets one too
        trainer.log(trainer._density())
    final = trainer.checkpoint(extra_state={"results": results})
    if results:
        trainer.log({f"{FINAL}{k}": v for k, v in flatten(results).items()})
    done = {"checkpoint": str(final.relative_to(trainer.run_dir)), "step": trainer.step, "tokens": trainer.tokens,
            "results": results}
    write_atomic(RunLayout(trainer.run_dir).done, json.dumps(done, indent=1).encode())


def train_sae(model, cfg: TrainConfig | dict[str, Any], progress: bool = True) -> tuple[BaseAutoencoder, Path]:
    """Train one SAE on cfg.store; returns (sae, run folder). `model` is only used by evaluation.

    Under torchrun the SAE trains data-parallel: rank r gets its slice of every global batch.
    """
    cfg = _as_config(cfg)
    if not cfg.store:
        raise TrainingError("no store given: set store (train run --store PATH) to a sealed activation cache")
    world = World.from_env()
    device = world.device(resolve_device(cfg.device))
    cache = open_cache(cfg)
    cfg = resolve_row_mask(resolve_run_sites(cfg, cache.spec), cache, progress=progress and world.is_main)
    store = open_store(cfg, device, world, cache=cache)
    try:
        given = cfg
        cfg = post_init_cfg(cfg, store.d_model, cfg.site)
        store.check_compatible(cfg.site, cfg.d_in)
        if world.is_main:
            warn_many_epochs(cfg, store)
        check_training_memory(cfg, device)  # before the run folder is made
        cfg, measured = resolve_new_run(given, cfg, store, device, world)  # autocast=auto: train.precision
        run_dir = world.broadcast(generate_checkpoint_dir(cfg) if world.is_main else None)
        if world.is_main:
            write_atomic(RunLayout(run_dir).config, json.dumps(cfg.to_dict(), indent=1).encode())
            write_measurement(run_dir, measured)
        trainer = build_trainer(cfg, store, run_dir, device, world=world, progress=progress)
        run_to_end([trainer], store, progress)
    finally:
        store.close()
    return trainer.sae, run_dir


def resume_training(model, cfg: TrainConfig | dict[str, Any] | None, checkpoint_path: str | Path,
                    progress: bool = True) -> tuple[BaseAutoencoder, Path]:
    """Continue a run from its newest loadable checkpoint (or the given checkpoint folder).

    cfg None uses the run's saved config; a given cfg may only change how the run is observed
    (tokens, logging, device), never what it computes.
    """
    run_dir, ckpt, tensors, trainer_state, state = latest_checkpoint(checkpoint_path)
    saved = load_run_config(run_dir)
    if cfg is not None:
        allowed = resumable_keys()  # declared in train.config
        changes = {k: v for k, v in _as_config(cfg).to_dict().items() if v != getattr(saved, k) and k in allowed}
        saved = update_cfg(saved, **changes)
    cfg = saved
    world = World.from_env()
    device = world.device(resolve_device(cfg.device))
    store = open_store(cfg, device, world)
    try:
        trainer = build_trainer(cfg, store, run_dir, device, world=world, progress=progress,
                                restore=Restore(ckpt, tensors, trainer_state, state))
        run_to_end([trainer], store, progress)
    finally:
        store.close()
    return trainer.sae, run_dir
