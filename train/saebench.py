"""`train eval`'s figures in SAEBench's core-evaluation layout (saebench_core.json).

SAEBench (github.com/adamkarvonen/SAEBench, sae_bench/evals/core: main.py, eval_output.py,
eval_config.py) writes one JSON object per SAE:

    eval_type_id "core", eval_config (CoreEvalConfig's fields), eval_id (a UUID),
    datetime_epoch_millis, eval_result_metrics {
        model_behavior_preservation    kl_div_score, kl_div_with_ablation, kl_div_with_sae
        model_performance_preservation ce_loss_score, ce_loss_with_ablation, ce_loss_with_sae, ce_loss_without_sae
        reconstruction_quality         explained_variance, mse, cossim
        shrinkage                      l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias
        sparsity                       l0, l1
        token_stats                    total_tokens_eval_reconstruction, total_tokens_eval_sparsity_variance
        misc_metrics                   freq_over_1_percent, freq_over_10_percent, normalized_freq_over_1_percent,
                                       normalized_freq_over_10_percent, average_max_encoder_cosine_sim,
                                       average_max_decoder_cosine_sim, frac_alive },
    eval_result_details (one CoreFeatureMetric per latent), sae_bench_commit_hash, sae_lens_id,
    sae_lens_release_id, sae_lens_version, sae_cfg_dict, eval_result_unstructured.

We write that layout for the SAE's primary encoding (the one `train export` writes), with the
figures computed by SAEBench's definitions on our held-out data, in raw activation units (the
exported SAE takes raw activations; `CoreSums` divides by the scaling factor s):

    cossim, l2_ratio           mean over tokens of cos(x, x_hat) and ||x_hat|| / ||x|| (||x|| < 1e-4 counts as 1)
    l2_norm_in, l2_norm_out    mean over tokens of ||x||, ||x_hat||
    relative_reconstruction_bias  per batch E||x_hat||^2 / E<x, x_hat>, averaged over batches
    explained_variance         mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2 (SAEBench's
                               per-token form; our global ratio is eval.json's explained_variance)
    mse                        mean over tokens of ||x - x_hat||^2 (SAELens' corrected definition, PR #711;
                               the SAEBench commit we read divides it again by the batch's token count)
    feature densities          fraction of evaluated tokens each latent fired on; misc_metrics from them
    weight metrics             of the exported (scaling-folded) weights: encoder norms, biases, the
                               cosine of each latent's encoder column and decoder row, the largest
                               cosine with any other latent's encoder / decoder (average_max_*)

A "batch" is one held-out store batch (the run's batch_size rows) for the reconstruction figures,
one LM batch (--lm-batch-size contexts) for CE / KL. What we cannot compute is null with the
reason in eval_result_unstructured.null_reasons (consistent_activation_heuristic needs per-prompt
grouping that the shuffled store rows do not keep; the LM groups with --skip-lm). Nothing here
was run by SAEBench or SAELens: sae_bench_commit_hash says so and the SAELens ids are null.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch
from torch import Tensor

SAEBENCH_FILENAME = "saebench_core.json"
SOURCE = ("github.com/adamkarvonen/SAEBench sae_bench/evals/core (main.py, eval_output.py, eval_config.py)")
COSINE_CHUNK = 1024  # latents per block of the max-cosine computation ([chunk, m] at a time)


class CoreSums:
    """Accumulator (train.heldout) of SAEBench's per-token shrinkage / quality sums, in raw units.

    x, x_hat arrive in the training (normalised) space; dividing by `scale` gives raw activations."""

    def __init__(self, scale: float):
        self.scale = float(scale)
        self.n = 0
        self.norm_in = self.norm_out = self.ratio = self.cos = self.ev = self.sq_err = 0.0
        self.rrb: list[float] = []

    @torch.no_grad()
    def update(self, x: Tensor, f: Tensor, x_hat: Tensor) -> None:
        x = x.double() / self.scale
        y = x_hat.double() / self.scale
        n_in, n_out = x.norm(dim=-1), y.norm(dim=-1)
        self.norm_in += float(n_in.sum())
        self.norm_out += float(n_out.sum())
        self.ratio += float((n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
        err = ((x - y) ** 2).sum(-1)
        self.sq_err += float(err.sum())
        self.ev += float((1 - err / ((x - x.mean(0)) ** 2).sum(-1)).sum())
        self.rrb.append(float((y**2).sum(-1).mean() / (x * y).sum(-1).mean()))
        self.n += x.shape[0]

    def figures(self) -> dict[str, float]:
        n = self.n
        return {"l2_norm_in": self.norm_in / n, "l2_norm_out": self.norm_out / n, "l2_ratio": self.ratio / n,
                "relative_reconstruction_bias": sum(self.rrb) / len(self.rrb),
                "cossim": self.cos / n, "explained_variance_per_token": self.ev / n, "mse": self.sq_err / n}


def density_figures(density: Tensor) -> dict[str, float]:
    """SAEBench's misc density figures of per-latent firing fractions density [m]."""
    d = density.double()
    total = float(d.sum())
    return {
        "freq_over_1_percent": float((d > 0.01).double().mean()),
        "freq_over_10_percent": float((d > 0.1).double().mean()),
        "normalized_freq_over_1_percent": float(d[d > 0.01].sum()) / total if total > 0 else 0.0,
        "normalized_freq_over_10_percent": float(d[d > 0.1].sum()) / total if total > 0 else 0.0,
        "frac_alive": float((d > 0).double().mean()),
    }


@torch.no_grad()
def max_other_cosine(vectors: Tensor, chunk: int = COSINE_CHUNK) -> Tensor:
    """For vectors [m, d]: each one's largest cosine similarity with any *other* vector [m]."""
    v = torch.nn.functional.normalize(vectors.float(), dim=-1)
    m = v.shape[0]
    out = torch.empty(m, dtype=torch.float32, device=v.device)
    for i in range(0, m, chunk):
        sims = v[i : i + chunk] @ v.T
        rows = torch.arange(sims.shape[0], device=v.device)
        sims[rows, rows + i] = float("-inf")
        out[i : i + chunk] = sims.max(1).values
    return out


def weight_figures(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> dict[str, Tensor]:
    """Per-latent weight figures of exported weights W_enc [d, m], b_enc [m], W_dec [m, d] (each [m])."""
    enc, dec = W_enc.float().T, W_dec.float()
    return {"encoder_bias": b_enc.float(), "encoder_norm": enc.norm(dim=-1),
            "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(enc, dec, dim=-1),
            "max_encoder_cosine_sim": max_other_cosine(enc), "max_decoder_cosine_sim": max_other_cosine(dec)}


def _num(v: Any) -> Any:
    return None if v is None else float(v)


def core_output(results: dict[str, Any], *, core: dict[str, float], density: Tensor, weights: dict[str, Tensor],
                spec, sae_cfg_dict: dict[str, Any] | None, software_version: str) -> dict[str, Any]:
    """The saebench_core.json object for `results` (train.evaluation's, before writing), the primary
    encoding's CoreSums figures `core`, its per-latent densities [m] and weight figures."""
    primary = results["primary"]
    figs = results["encodings"][primary]
    lm = results["lm"]
    has_lm = "skipped" not in lm
    null_reasons = {"eval_result_details[].consistent_activation_heuristic":
                    "needs each latent's firing counted per prompt; the held-out store serves shuffled rows"}
    if not has_lm:
        for group in ("model_behavior_preservation", "model_performance_preservation"):
            null_reasons[group] = "the LM figures were skipped (--skip-lm)"
        null_reasons["token_stats.total_tokens_eval_reconstruction"] = "the LM figures were skipped (--skip-lm)"
    settings = results["settings"]
    autocast = settings["autocast"]
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": _num(figs.get("kl_div_score")), "kl_div_with_ablation": _num(lm.get("kl_zero_ablation")),
            "kl_div_with_sae": _num(figs.get("kl_spliced"))},
        "model_performance_preservation": {
            "ce_loss_score": _num(figs.get("ce_loss_score")), "ce_loss_with_ablation": _num(lm.get("ce_zero_ablation")),
            "ce_loss_with_sae": _num(figs.get("ce_spliced")), "ce_loss_without_sae": _num(lm.get("ce_clean"))},
        "reconstruction_quality": {"explained_variance": core["explained_variance_per_token"], "mse": core["mse"],
                                   "cossim": core["cossim"]},
        "shrinkage": {k: core[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")},
        "sparsity": {"l0": figs["l0"], "l1": figs["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": lm["contexts"] * lm["context_length"] if has_lm else None,
            "total_tokens_eval_sparsity_variance": figs["rows"]},
        "misc_metrics": {**density_figures(density),
                         "average_max_encoder_cosine_sim": float(weights["max_encoder_cosine_sim"].mean()),
                         "average_max_decoder_cosine_sim": float(weights["max_decoder_cosine_sim"].mean())},
    }
    w = {k: v.detach().cpu().tolist() for k, v in weights.items()}
    dens = density.detach().cpu().double().tolist()
    details = [{"index": i, "feature_density": dens[i], "consistent_activation_heuristic": None,
                "encoder_bias": w["encoder_bias"][i], "encoder_norm": w["encoder_norm"][i],
                "encoder_decoder_cosine_sim": w["encoder_decoder_cosine_sim"][i],
                "max_decoder_cosine_sim": w["max_decoder_cosine_sim"][i],
                "max_encoder_cosine_sim": w["max_encoder_cosine_sim"][i]} for i in range(len(dens))]
    dataset = spec.dataset or {}
    lm_batches = -(-lm["contexts"] // lm["lm_batch_size"]) if has_lm else 0
    eval_config = {
        "model_name": lm.get("model") or spec.model.get("id") or "",
        "llm_dtype": lm.get("autocast_dtype", "float32"),
        "batch_size_prompts": lm["lm_batch_size"] if has_lm else 0,
        "n_eval_reconstruction_batches": lm_batches,
        "n_eval_sparsity_variance_batches": settings["batches"],
        "dataset": str(dataset.get("id") or dataset.get("path") or ""),
        "context_size": spec.context_length,
        "compute_kl": has_lm, "compute_ce_loss": has_lm, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": False,
        "verbose": False,
    }
    unstructured = {
        "written_by": f"saeforge {software_version} (train eval), in the layout of {SOURCE}",
        "checkpoint": results["checkpoint"], "step": results["step"], "encoding": primary,
        "encoding_label": figs["label"], "autocast": autocast,
        "eval_json_explained_variance": figs["explained_variance"],
        "differences": [
            "held-out rows and contexts of the run's own cache, not a fresh sample of the dataset",
            "n_eval_sparsity_variance_batches counts held-out store batches of the run's batch_size rows "
            f"({settings['batch_size']}), not batches of prompts",
            "the rows the run's mask leaves out (settings.row_mask: position 0 under drop_bos, its token ids, norm "
            "outliers) are left out of the reconstruction figures and keep their clean activation in every LM "
            "intervention; SAEBench masks the tokenizer's special tokens instead",
            "mse is the mean over tokens of ||x - x_hat||^2 (SAELens PR #711), not divided by the batch's token count",
            "not computable figures are null, not -1",
        ],
        "null_reasons": null_reasons,
    }
    return {
        "eval_type_id": "core",
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": "none: not run by SAEBench",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg_dict,
        "eval_result_unstructured": unstructured,
    }


def saebench_core(run, cache, fold: tuple[float, float], results: dict[str, Any], density: Tensor,
                  core: dict[str, float], device) -> dict[str, Any]:
    """saebench_core.json's object for a loaded checkpoint `run` (train.runs.LoadedCheckpoint) on
    `cache`: the exported form's weights (scaling fold factors `fold`) and cfg.json (sae_cfg_dict;
    null, with the reason, when it cannot be exported)."""
    from shared.cache_spec import software_version
    from train.export import ExportError, saelens_config

    folded = run.sae.fold_scaling(*fold)
    weights = weight_figures(folded["W_enc"].to(device), folded["b_enc"], folded["W_dec"].to(device))
    reason = None
    try:
        cfg_dict = saelens_config(run.sae, run.cfg, cache.spec, scale=fold[0], checkpoint=run.checkpoint,
                                  run_dir=run.run_dir, step=run.state.get("step"), tokens=run.state.get("tokens"),
                                  cache_path=str(cache.root))
    except ExportError as e:
        cfg_dict, reason = None, str(e)
    out = core_output(results, core=core, density=density, weights=weights, spec=cache.spec,
                      sae_cfg_dict=cfg_dict, software_version=software_version())
    if reason:
        out["eval_result_unstructured"]["null_reasons"]["sae_cfg_dict"] = reason
    return out
