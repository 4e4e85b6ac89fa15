"""Export a trained SAE for SAELens 6.x (`train export CHECKPOINT --format saelens --out DIR`).

DIR gets the two files `SAE.load_from_disk(DIR)` reads:

    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input (true),
                              normalize_activations ("none"), reshape_activations ("none"),
                              k and rescale_acts_by_decoder_norm (false) for topk, and metadata:
                              sae_lens_version (the 6.x schema), model_name, hook_name
                              (TransformerLens name), hook_head_index, context_size, prepend_bos,
                              dataset_path, and "saeforge" (our provenance: run, checkpoint, cache
                              spec, training config, folded scaling factor).
    sae_weights.safetensors   exactly the tensors of the SAELens class (its load is strict):
                              standard / topk: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                              b_dec [d_in]; jumprelu: the same plus threshold [d_sae].

Architectures: vanilla -> "standard", topk -> "topk", jumprelu -> "jumprelu" (threshold =
exp(log_threshold)), batchtopk -> "jumprelu" with its calibrated inference threshold (global or
per-feature, written per feature). A BatchTopK checkpoint without a calibrated threshold is
refused (intermediate checkpoints are never calibrated): `train calibrate CHECKPOINT` writes one.

The dataset-level scaling s (the SAE was trained on x' = s x, s = sqrt(d / E||x||^2) from the
cache statistics) is folded into the weights so the exported SAE takes raw activations:

    f     = act((s x - b_dec) W_enc + b_enc) = act((x - b_dec / s)(s W_enc) + b_enc)
    x_hat = (f W_dec + b_dec) / s            = f (W_dec / s) + b_dec / s

so W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s; b_enc and thresholds are unchanged
(the pre-activations are the same numbers). The exported decoder rows then have norm 1/s.
SAELens' inference equations (the ones the export targets; see also tests/test_export.py):

    standard: f = relu((x - b_dec) W_enc + b_enc)
    topk:     h = (x - b_dec) W_enc + b_enc; f = relu of the k largest h per token, 0 elsewhere
    jumprelu: h = (x - b_dec) W_enc + b_enc; f = relu(h) * (h > relu(threshold))
    decode:   x_hat = f W_dec + b_dec
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shared.cache_spec import software_version
from shared.durable import write_atomic
from train.evaluation import load_sae_checkpoint, open_cache_checked, scaling_factor
from train.sae import BaseAutoencoder

SAELENS_SCHEMA_VERSION = "6.0.0"  # cfg.json layout written here (SAELens >= 6.0 reads it as-is)
SAELENS_ARCH = {"vanilla": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
SAELENS_KEYS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}
FORMATS = ("saelens",)
CFG_FILENAME, WEIGHTS_FILENAME = "cfg.json", "sae_weights.safetensors"


class ExportError(Exception):
    """A checkpoint cannot be exported faithfully; the message says what to do."""


def check_exportable(sae: BaseAutoencoder, checkpoint: Path | str = "CHECKPOINT") -> str:
    """The SAELens architecture name for `sae`, or ExportError saying why it cannot be exported."""
    arch = getattr(sae, "arch", None)
    if arch not in SAELENS_ARCH:
        raise ExportError(f"{checkpoint}: architecture {arch!r} has no SAELens equivalent "
                          f"(exportable: {', '.join(SAELENS_ARCH)})")
    if arch == "batchtopk" and sae.threshold_kind == "none":
        raise ExportError(
            f"{checkpoint} is a BatchTopK SAE without a calibrated inference threshold, so it has no faithful "
            "per-token (JumpReLU) form: only a run's final checkpoint is calibrated. Calibrate this one with "
            f"`train calibrate {checkpoint}` (held-out rows; --kind global|per_feature), then export again")
    threshold = sae.inference_threshold()
    if threshold is not None and bool((threshold < 0).any()):
        raise ExportError(f"{checkpoint}: negative thresholds cannot be expressed in SAELens' JumpReLU "
                          "(it applies relu(threshold))")
    return SAELENS_ARCH[arch]


@torch.no_grad()
def saelens_state_dict(sae: BaseAutoencoder, scale: float) -> dict[str, torch.Tensor]:
    """SAELens tensors with the scaling s folded in (float32, CPU, contiguous)."""
    arch = check_exportable(sae)
    s = float(scale)
    if not s > 0 or s != s or s == float("inf"):
        raise ExportError(f"scaling factor {scale!r} must be a positive finite number")
    f32 = {name: p.detach().to("cpu", torch.float32) for name, p in
           (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec))}
    out = {
        "W_enc": f32["W_enc"] * s,
        "b_enc": f32["b_enc"].clone(),
        "W_dec": f32["W_dec"] / s,
        "b_dec": f32["b_dec"] / s,
    }
    if arch == "jumprelu":
        out["threshold"] = sae.inference_threshold().to("cpu", torch.float32)
    assert tuple(out) == SAELENS_KEYS[arch]
    return {k: v.contiguous() for k, v in out.items()}


def saelens_config(sae: BaseAutoencoder, cfg, spec, *, scale: float, checkpoint: Path, run_dir: Path,
                   step: int | None, tokens: int | None, model_name: str | None = None,
                   cache_path: str | None = None) -> dict[str, Any]:
    """cfg.json contents (SAELens 6.x SAEConfig.to_dict layout)."""
    arch = check_exportable(sae, checkpoint)
    bos_policy = (spec.bos_policy or {}).get("bos_policy")
    site = next(s for s in spec.sites if s.name == cfg.site)
    dataset = spec.dataset or {}
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        out["k"] = int(sae.k)
        out["rescale_acts_by_decoder_norm"] = False
    out["metadata"] = {
        "sae_lens_version": SAELENS_SCHEMA_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name or spec.model.get("id"),
        "hook_name": cfg.site,
        "hook_head_index": None,
        "context_size": spec.context_length,
        "prepend_bos": bos_policy == "context",
        "dataset_path": dataset.get("id") or dataset.get("path"),
        "neuronpedia_id": None,
        "saeforge": {
            "software_version": software_version(),
            "trained_arch": cfg.arch,
            "threshold_kind": getattr(sae, "threshold_kind", None) if cfg.arch == "batchtopk" else None,
            "k": cfg.k if cfg.arch in ("topk", "batchtopk") else None,
            "folded_scaling_factor": scale,
            "normalize": cfg.normalize,
            "drop_bos": cfg.drop_bos,
            "run_name": cfg.run_name,
            "run_dir": str(run_dir),
            "checkpoint": str(checkpoint),
            "step": step,
            "tokens_trained": tokens,
            "cache": cache_path,
            "site": {"name": site.name, "layer": site.layer, "kind": site.kind, "hf_module": site.hf_module},
            "model": spec.model,
            "dataset": dataset,
            "bos_policy": spec.bos_policy,
            "train_config": cfg.to_dict(),
        },
    }
    return out


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "saelens",
                      model_name: str | None = None, store_path: str | None = None,
                      force: bool = False) -> Path:
    """Write `path`'s SAE (a run folder's newest checkpoint, or one checkpoint folder) to out_dir."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    run = load_sae_checkpoint(path)
    check_exportable(run.sae, run.checkpoint)
    from train.evaluation import EvalError

    try:
        cache = open_cache_checked(run.cfg, run.state, store_path)
    except EvalError as e:
        raise ExportError(f"{e} (the export needs its scaling factor and provenance)") from None
    scale = scaling_factor(run.cfg, cache)
    tensors = saelens_state_dict(run.sae, scale)
    config = saelens_config(run.sae, run.cfg, cache.spec, scale=scale, checkpoint=run.checkpoint,
                            run_dir=run.run_dir, step=run.state.get("step"), tokens=run.state.get("tokens"),
                            model_name=model_name, cache_path=str(cache.root))
    out = Path(out_dir)
    existing = [n for n in (CFG_FILENAME, WEIGHTS_FILENAME) if (out / n).exists()]
    if existing and not force:
        raise ExportError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILENAME}.tmp.{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILENAME)
    write_atomic(out / CFG_FILENAME, json.dumps(config, indent=1).encode())
    return out
