"""Evaluation of a trained SAE checkpoint (`train eval`) and its calibration (`train calibrate`,
for variants whose inference needs one: BatchTopK).

The checkpoint is loaded by train.runs, its dataset scaling read back by train.scaling, the
held-out sums taken by train.heldout. Two families of figures, for each *encoding* of the SAE:

Reconstruction, on the run's held-out cache rows (the rows `evaluate_heldout` serves: the
held-out shards, without the rows the run's mask leaves out: train.row_mask):
    mse                 mean over tokens of sum_d (x - x_hat)^2, in the training (normalised) space
    mse_raw             the same in raw activation units (mse / scaling_factor^2)
    explained_variance  1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    cosine_similarity   mean over tokens of cos(x, x_hat)
    l0, l1              mean over tokens of #{f_i > 0} and of sum_i |f_i|
    dead                latents that never fired on the evaluated rows
    dense               latents firing on more than DENSE_THRESHOLD (10%) of the evaluated rows
    density_hist        histogram of log10 feature density (train.logs.density_histogram)

Model performance (train.lm_figures): the LM's next-token CE and KL on the held-out contexts,
clean, with the SAE's reconstruction spliced in at the site, and zero- / mean-ablated;
ce_loss_score, ce_degradation, kl_spliced, kl_div_score per encoding.

Beside eval.json, saebench_core.json holds the primary encoding's figures in SAEBench's core
layout and definitions (train.saebench: raw units, its per-token explained variance, shrinkage,
feature densities, weight-based figures of the exported form).

Encodings (each variant's `encodings()`, train.sae): TopK, vanilla and JumpReLU have one
("inference"). BatchTopK has two, labelled:
"threshold" (JumpReLU-style with the calibrated threshold: what `train export` writes and what
per-token inference uses) and "batch_topk" (the training-time rule: the k*B largest pre-activations
of each batch of B tokens; B is the run's batch_size for the reconstruction figures and the
spliced tokens of one LM batch for the CE figures). How a variant calibrates is its own
(`needs_calibration`, `calibrate`); this module only drives it.

Transcoders and CLTs (a run with in_site / out_site, train.site_pairs) are evaluated as
replacements of the MLPs they cover: train.transcoder_eval (per-layer FVU, L0 and dead latents of
the targets; CE with the covered MLP outputs replaced, and zero-ablated).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.autocast import canonical_autocast
from shared.cache import Cache
from shared.durable import make_folder, write_atomic
from shared.remote import is_remote
from train.activation_store import ActivationStore, cache_identity
from train.errors import EvalError
from train.eval_report import DENSE_THRESHOLD, format_table, log_to_wandb, scalar_figures  # noqa: F401 (as before)
from train.checkpoints import list_checkpoints, save_checkpoint
from train.config import TrainConfig, update_cfg
from train.heldout import evaluate_heldout
from train.layout import EVAL
from train.lm_figures import (DEFAULT_LM_BATCH_SIZE, autocast_dtype, ce_loss_score, heldout_contexts, lm_losses,
                              load_lm, splice_fn)
from train.logs import density_histogram
from train.row_mask import RowMask, SplicePositions, resolve_row_mask, spliced_positions
from train.runs import LoadedCheckpoint, load_sae_checkpoint, open_store, resolve_device  # noqa: F401 (as before)
from train.sae import BaseAutoencoder
from train.sae.base import Encoding
from train.sae.registry import SAE_REGISTRY
from train.saebench import SAEBENCH_FILENAME, CoreSums, saebench_core
from train.scaling import Scaling
from train.site_pairs import EncoderInputs, plan_of

DEFAULT_BATCHES = 50  # held-out store batches (of the run's batch_size) for reconstruction figures
DEFAULT_MAX_CONTEXTS = 64  # held-out contexts for the CE / KL figures


# --------------------------------------------------------------------------- loading


def open_cache_checked(cfg: TrainConfig, state: dict[str, Any], store_path: str | None = None) -> Cache:
    """The run's cache (or store_path), refused if it is not the cache the run was trained on."""
    path = store_path or cfg.store
    if not path or (not is_remote(path) and not Path(path).exists()):
        raise EvalError(f"the run's activation cache {path!r} does not exist; pass --store PATH to the cache it was trained on")
    cache = Cache.open(path)
    want = (state.get("store") or {}).get("cache_id")
    if want is not None and cache_identity(cache) != want:
        raise EvalError(f"{cache.root} is not the cache this run was trained on (its identity differs); "
                        "pass --store PATH to the original cache")
    return cache


def checkpoint_scaling(run: LoadedCheckpoint, cache: Cache) -> Scaling:
    """The dataset scaling the checkpoint's SAE was trained with: its state.json's record, else
    (a checkpoint older than the record) the cache statistics and the run's normalize setting."""
    scaling = Scaling.from_state(run.state, run.cfg.normalize)
    sites = plan_of(run.cfg).sites or [run.cfg.site]  # a transcoder's input and target sites
    if scaling is None or not all(scaling.has(s) for s in sites):
        scaling = Scaling.from_cache(cache, sites, run.cfg.normalize)
    return scaling


def _store_for(cfg: TrainConfig, store_path: str | None, heldout_shards: int | None, device) -> ActivationStore:
    changes: dict[str, Any] = {}
    if store_path:
        changes["store"] = str(store_path)
    if heldout_shards is not None:
        changes["heldout_shards"] = heldout_shards
    if changes:
        cfg = update_cfg(cfg, **changes)
    if cfg.heldout_shards == 0:
        raise EvalError("this run kept no held-out shards (heldout_shards=0); pass --heldout-shards N to use the "
                        "cache's last N shards (note: the run trained on them)")
    return open_store(cfg, device)


# --------------------------------------------------------------------------- encodings (sae.encodings())


def reconstruct_raw(sae: BaseAutoencoder, x: Tensor, scale: float, enc: Encoding) -> Tensor:
    """decode(encode(x * s)) / s for raw activations x [N, d] (float32)."""
    return sae.decode(enc.encode(sae, x * scale)) / scale


# --------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def reconstruction_pass(sae: BaseAutoencoder, store: ActivationStore, enc: Encoding, scale: float,
                        max_batches: int = DEFAULT_BATCHES) -> tuple[dict[str, Any], Tensor, dict[str, float]]:
    """One pass over held-out rows: (figures, per-latent firing fractions [m] float64, the CoreSums
    figures). figures: evaluate_heldout's plus cosine similarity, L1, dead/dense latents, the
    density histogram and SAEBench's shrinkage figures (train.saebench.CoreSums, raw units)."""
    sums = _LatentSums(sae.d_sae, sae.W_dec.device)
    core = CoreSums(scale)
    base = evaluate_heldout(sae, store, max_batches=max_batches, encoding=enc, accumulators=[sums, core])
    n = base["rows"]
    core_figs = core.figures()
    fired = sums.fired
    density = fired.double() / n
    dead = int((fired == 0).sum())
    dense = int((density > DENSE_THRESHOLD).sum())
    figures = {
        "rows": n,
        "mse": base["mse"],
        "mse_raw": base["mse"] / scale**2,
        "explained_variance": base["explained_variance"],
        "cosine_similarity": float(sums.cos) / n,
        "l0": base["l0"],
        "l1": float(sums.l1) / n,
        "dead": dead,
        "dead_fraction": dead / sae.d_sae,
        "dense": dense,
        "dense_fraction": dense / sae.d_sae,
        "density_hist": density_histogram(fired, n),
        **{k: core_figs[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
    }
    return figures, density, core_figs


class _LatentSums:
    """Accumulator (train.heldout): tokens each latent fired on [m], sums of cos(x, x_hat) and of sum_i |f_i|."""

    def __init__(self, d_sae: int, device: torch.device):
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.cos = torch.zeros((), dtype=torch.float64, device=device)
        self.l1 = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, x: Tensor, f: Tensor, x_hat: Tensor) -> None:
        self.fired.add_((f > 0).sum(0))
        self.cos += torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).double().sum()
        self.l1 += f.abs().double().sum()


# --------------------------------------------------------------------------- the evaluation


def evaluate_checkpoint(path: str | os.PathLike, *, batches: int = DEFAULT_BATCHES,
                        max_contexts: int = DEFAULT_MAX_CONTEXTS, lm_batch_size: int = DEFAULT_LM_BATCH_SIZE,
                        model: str | None = None, skip_lm: bool = False, device: str | None = None,
                        store_path: str | None = None, heldout_shards: int | None = None,
                        autocast: str = "auto", out: str | os.PathLike | None = None,
                        wandb_mode: str | None = None) -> tuple[dict[str, Any], Path]:
    """Evaluate a run folder's newest checkpoint (or one checkpoint folder); returns (results, eval.json path).

    eval.json goes to `out`, else into the folder given (run folder or checkpoint folder);
    saebench_core.json (train.saebench) beside it.
    """
    if batches < 1 or max_contexts < 1 or lm_batch_size < 1:
        raise EvalError("--batches, --max-contexts and --lm-batch-size must be positive")
    autocast = canonical_autocast(autocast)  # none, bf16 or auto (bfloat16 = bf16)
    if out is not None:  # before the work: where eval.json goes must be a writable file path
        if Path(out).is_dir():
            raise EvalError(f"--out {out} is a folder; give the JSON file to write, e.g. --out {Path(out) / EVAL}")
        make_folder(Path(out).parent, "--out")
    run = load_sae_checkpoint(path)
    cfg, sae = run.cfg, run.sae
    dev = resolve_device(device or cfg.device)
    sae.to(dev)
    cache = open_cache_checked(cfg, run.state, store_path)
    if plan_of(cfg).outputs is not None:  # a transcoder or CLT: evaluated as a replacement (train.transcoder_eval)
        from train.transcoder_eval import evaluate_transcoder, write_results

        store = _store_for(cfg, str(cache.root), heldout_shards, dev)
        try:
            results = evaluate_transcoder(run, cache, store, checkpoint_scaling(run, cache), batches=batches,
                                          max_contexts=max_contexts, lm_batch_size=lm_batch_size, model=model,
                                          skip_lm=skip_lm, device=dev, autocast=autocast)
        finally:
            store.close()
        dest = write_results(results, Path(out) if out else Path(path) / EVAL)
        log_to_wandb(run.run_dir, cfg, results, wandb_mode or cfg.wandb_mode)
        return results, dest
    scale = checkpoint_scaling(run, cache).factor(cfg.site)
    store = _store_for(cfg, str(cache.root), heldout_shards, dev)
    try:
        modes = sae.encodings()
        per_mode: dict[str, Any] = {}
        for i, enc in enumerate(modes):
            figs, density, core = reconstruction_pass(sae, store, enc, scale, max_batches=batches)
            per_mode[enc.name] = {"label": enc.label, **figs}
            if i == 0:
                primary_density, primary_core = density, core
        held_shards = list(store.heldout_shards)
    finally:
        store.close()

    mask = RowMask.from_cfg(resolve_row_mask(cfg, cache))
    start = 1 if cfg.drop_bos else 0
    lm: dict[str, Any]
    lm_dtype = None if skip_lm else autocast_dtype(autocast, cache.spec.model.get("compute_dtype"), dev)
    if skip_lm:
        lm = {"skipped": "--skip-lm"}
    else:
        lm_model, site, check = load_lm(cache, cfg.site, model, dev)
        contexts = heldout_contexts(cache, held_shards, max_contexts)
        if contexts.shape[1] - start < 1:
            raise EvalError("contexts are too short to splice anything after position 0")
        mean = torch.tensor(cache.stats(cfg.site).mean, dtype=torch.float32, device=dev)
        where = SplicePositions(mask, site)  # the run's unmasked positions of each forward (train.row_mask)
        interventions = {
            "zero": splice_fn(lambda x: torch.zeros_like(x), where),
            "mean": splice_fn(lambda x: mean.expand_as(x), where),
        }
        for enc in modes:
            interventions[f"sae:{enc.name}"] = splice_fn(lambda x, enc=enc: reconstruct_raw(sae, x, scale, enc), where)
        res = lm_losses(lm_model, site, contexts, interventions, batch_size=lm_batch_size,
                        autocast_dtype=lm_dtype, positions=where)
        ce_clean, ce_zero = res["clean"]["ce"], res["zero"]["ce"]
        lm = {**check, "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
              "predictions": res["predictions"], "lm_batch_size": lm_batch_size,
              "autocast_dtype": str(lm_dtype).removeprefix("torch.") if lm_dtype else "float32",
              "ce_clean": ce_clean, "ce_zero_ablation": ce_zero, "ce_mean_ablation": res["mean"]["ce"],
              "kl_zero_ablation": res["zero"]["kl"], "kl_mean_ablation": res["mean"]["kl"]}
        for enc in modes:
            r = res[f"sae:{enc.name}"]
            per_mode[enc.name].update({
                "ce_spliced": r["ce"],
                "ce_degradation": r["ce"] - ce_clean,
                "ce_loss_score": ce_loss_score(ce_clean, r["ce"], ce_zero),
                "kl_spliced": r["kl"],
                "kl_div_score": (res["zero"]["kl"] - r["kl"]) / res["zero"]["kl"] if res["zero"]["kl"] > 0 else float("nan"),
            })
        for enc in modes:
            if enc.per_batch:  # the batch its rule selected over: one LM batch's spliced tokens
                first = contexts[: min(lm_batch_size, contexts.shape[0])]
                pos = torch.arange(first.shape[1]).expand_as(first)
                # the first LM batch's spliced tokens (None under a norm rule: they vary with the forward)
                per_mode[enc.name]["lm_batch_tokens"] = (
                    int(RowMask(mask.drop_bos, mask.token_ids).keep(pos, first).sum())
                    if mask.norm_threshold is None else None)
        del lm_model

    results = {
        "checkpoint": str(run.checkpoint),
        "run_dir": str(run.run_dir),
        "run_name": cfg.run_name,
        "step": run.state.get("step"),
        "tokens_trained": run.state.get("tokens"),
        "arch": cfg.arch,
        "site": cfg.site,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.describe()["k"],
        "threshold_kind": sae.describe()["threshold_kind"],
        "scaling_factor": scale,
        "cache": str(cache.root),
        "settings": {
            "batches": batches, "batch_size": cfg.batch_size, "max_contexts": max_contexts,
            "heldout_shards": held_shards, "drop_bos": cfg.drop_bos, "dense_threshold": DENSE_THRESHOLD,
            "row_mask": mask.record(),
            "spliced_positions": spliced_positions(mask),
            "ce_positions": "all next-token predictions (0..T-2 -> 1..T-1)",
            "device": str(dev), "autocast": autocast,
            # what the setting chose (auto included): the LM's compute dtype, None when the LM was skipped
            "lm_compute_dtype": None if skip_lm else str(lm_dtype or torch.float32).replace("torch.", ""),
        },
        "primary": modes[0].name,
        "encodings": per_mode,
        "lm": lm,
    }
    if sae.needs_calibration and not sae.calibrated:
        results["note"] = (f"no calibrated threshold: run `train calibrate {run.checkpoint}` for the "
                           "inference (exported) encoding")
    dest = Path(out) if out else Path(path) / EVAL
    bench = saebench_core(run, cache, checkpoint_scaling(run, cache).fold_factors(cfg.site), results,
                          primary_density, primary_core, dev)
    write_atomic(dest, json.dumps(_jsonable(results), indent=1).encode())
    write_atomic(dest.parent / SAEBENCH_FILENAME, json.dumps(_jsonable(bench), indent=1).encode())
    mode = wandb_mode or cfg.wandb_mode
    log_to_wandb(run.run_dir, cfg, results, mode)
    return results, dest


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- calibration


def calibrate_checkpoint(path: str | os.PathLike, *, kind: str | None = None, batches: int | None = None,
                         device: str | None = None, store_path: str | None = None,
                         heldout_shards: int | None = None) -> dict[str, Any]:
    """Calibrate the inference threshold of a checkpoint whose variant needs one (BatchTopK) on
    held-out rows and rewrite that checkpoint (atomically, same step) with it. Returns the
    calibration record (also in state.json)."""
    run = load_sae_checkpoint(path)
    cfg, sae = run.cfg, run.sae
    dev = resolve_device(device or cfg.device)
    sae.to(dev)
    if not sae.needs_calibration:
        need = [a for a, cls in SAE_REGISTRY.items() if cls.needs_calibration]
        raise EvalError(f"{run.checkpoint} is a {sae.arch} SAE; only {', '.join(need)} "
                        f"{'needs' if len(need) == 1 else 'need'} a threshold calibration")
    kind = kind or cfg.threshold_kind
    if kind not in ("global", "per_feature"):
        raise EvalError(f"threshold kind {kind!r} is not one of global, per_feature")
    n_batches = batches or cfg.threshold_batches
    cache = open_cache_checked(cfg, run.state, store_path)
    store = _store_for(cfg, str(cache.root), heldout_shards, dev)
    try:
        plan = plan_of(cfg)
        sae.calibrate(EncoderInputs(store, plan), kind, n_batches)
        held = evaluate_heldout(sae, store, max_batches=n_batches, encoding=sae.encodings()[0], plan=plan)
        held_shards = list(store.heldout_shards)
    finally:
        store.close()
    record = {"threshold_kind": kind, "batches": n_batches, "heldout_shards": held_shards,
              "inference_l0": held["l0"], "k": sae.describe()["k"], "explained_variance": held["explained_variance"]}
    state = {k: v for k, v in run.state.items() if k not in ("step", "checkpoint_format", "checksums")}
    state["threshold_kind"] = kind
    state["calibration"] = record
    keep = max(len(list_checkpoints(run.run_dir)), 1)  # rewrite this one; delete nothing
    save_checkpoint(run.run_dir, run.state["step"], sae.state_dict(), run.trainer_state, state, keep=keep)
    return record
