"""Export a trained SAE for SAELens 6.x (`train export CHECKPOINT --format saelens --out DIR`).

DIR gets the two files `SAE.load_from_disk(DIR)` reads, a model card README.md for the hub
(train.model_card: architecture, recipe, provenance hashes, training tokens, eval figures) and,
when the checkpoint has been evaluated, `train eval`'s saebench_core.json:

    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input (true),
                              normalize_activations ("none"), reshape_activations ("none"),
                              k and rescale_acts_by_decoder_norm (false) for topk, and metadata:
                              sae_lens_version (the 6.x schema), model_name, hook_name
                              (TransformerLens name), hook_head_index, context_size, prepend_bos,
                              dataset_path, and "saeforge" (our provenance: run, checkpoint, cache
                              spec, training config, folded scaling factor).
    sae_weights.safetensors   exactly the tensors of the SAELens class (its load is strict):
                              standard / topk: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                              b_dec [d_in]; jumprelu: the same plus threshold [d_sae]; gated:
                              W_enc, b_gate, r_mag, b_mag [d_sae], W_dec, b_dec.

Each variant declares its exported form (train.sae: `saelens_arch`, `export_tensors`,
`export_config`): vanilla -> "standard", topk -> "topk", jumprelu -> "jumprelu" (threshold =
exp(log_threshold)), batchtopk and matryoshka -> "jumprelu" with the calibrated inference
threshold (global or per-feature, written per feature; a Matryoshka prefix is the export's first
m_i latents), gated -> "gated". A checkpoint whose variant needs a calibration and has none
(BatchTopK's and Matryoshka's intermediate checkpoints are never calibrated) is refused: `train
calibrate CHECKPOINT` writes one.

The dataset-level scaling s (the SAE was trained on x' = s x, s = sqrt(d / E||x||^2) from the
cache statistics; train.scaling, read from the checkpoint) is folded into the weights so the
exported SAE takes raw activations (BaseAutoencoder.fold_scaling): W_enc' = s W_enc,
b_dec' = b_dec / s, W_dec' = W_dec / s; b_enc and thresholds are unchanged (the pre-activations
are the same numbers). The exported decoder rows then have norm 1/s.
Transcoders (train.sae.transcoder) export as SAELens 6's transcoder forms: ReLU + L1 ->
"transcoder", JumpReLU and calibrated BatchTopK -> "jumprelu_transcoder", and with the skip map
"skip_transcoder" / "jumprelu_skip_transcoder" (TopK has none: refused). cfg.json then has d_out,
apply_b_dec_to_input false (SAELens transcoders have no input centre: b_in is folded into b_enc),
metadata.hook_name the input site and hook_name_out / hook_layer_out the target site; the input
and target scalings fold separately (Transcoder.fold_scaling). A CLT has no SAELens form: `train
export --format circuit-tracer` (train.export_circuit_tracer) writes it, and sets of per-layer
transcoders, for circuit-tracer.

SAELens' inference equations (the ones the export targets; see also tests/test_export.py):

    standard: f = relu((x - b_dec) W_enc + b_enc)
    topk:     h = (x - b_dec) W_enc + b_enc; f = relu of the k largest h per token, 0 elsewhere
    jumprelu: h = (x - b_dec) W_enc + b_enc; f = relu(h) * (h > relu(threshold))
    gated:    f = ((x - b_dec) W_enc + b_gate > 0) * relu((x - b_dec) (W_enc * exp(r_mag)) + b_mag)
    decode:   x_hat = f W_dec + b_dec
    transcoders: h = x W_enc + b_enc; f as above; y_hat = f W_dec + b_dec (+ x W_skip^T)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shared.cache_spec import software_version
from shared.errors import UserError
from shared.durable import make_folder, write_atomic
from train.errors import EvalError
from train.evaluation import checkpoint_scaling, open_cache_checked
from train.model_card import CARD_FILENAME, check_repo_id, find_eval, model_card
from train.model_card import push_to_hub as model_card_push
from train.row_order import cache_identity
from train.runs import load_sae_checkpoint
from train.saebench import SAEBENCH_FILENAME
from train.sae import BaseAutoencoder
from train.sae.registry import SAE_REGISTRY
from train.site_pairs import plan_of

SAELENS_SCHEMA_VERSION = "6.0.0"  # cfg.json layout written here (SAELens >= 6.0 reads it as-is)
SAELENS_TITLES = {"standard": "standard", "topk": "TopK", "jumprelu": "JumpReLU", "gated": "Gated",  # SAELens' architectures
                  "transcoder": "transcoder", "skip_transcoder": "skip transcoder",
                  "jumprelu_transcoder": "JumpReLU transcoder", "jumprelu_skip_transcoder": "JumpReLU skip transcoder"}
SAELENS_KEYS = {  # the exact tensor set of each SAELens class (its load_state_dict is strict)
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "transcoder": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"),
    "jumprelu_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "jumprelu_skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"),
}
FORMATS = ("saelens", "circuit-tracer")
CFG_FILENAME, WEIGHTS_FILENAME = "cfg.json", "sae_weights.safetensors"


class ExportError(UserError):
    """A checkpoint cannot be exported faithfully; the message says what to do."""


def check_exportable(sae: BaseAutoencoder, checkpoint: Path | str = "CHECKPOINT") -> str:
    """The SAELens architecture name for `sae` (its variant's saelens_arch), or ExportError saying
    why it cannot be exported."""
    arch = getattr(sae, "saelens_arch", None)
    if arch not in SAELENS_KEYS and hasattr(sae, "n_layers"):
        raise ExportError(f"{checkpoint}: a clt has no SAELens form; export it with --format circuit-tracer")
    if arch not in SAELENS_KEYS and getattr(sae, "rule", None):  # a transcoder whose sparsity has no transcoder form
        from train.sae.transcoder import compose, sparsity_names

        shape = type(sae).__bases__[-1]  # (rule, shape)
        ok = [s for s in sparsity_names() if compose(shape, s).saelens_arch in SAELENS_KEYS]
        raise ExportError(f"{checkpoint}: a {sae.rule} {sae.arch} has no SAELens or circuit-tracer form (their "
                          f"transcoders are ReLU or JumpReLU); train it with --sparsity one of {', '.join(ok)}")
    if arch not in SAELENS_KEYS:
        exportable = [name for name, cls in SAE_REGISTRY.items() if cls.saelens_arch in SAELENS_KEYS]
        raise ExportError(f"{checkpoint}: architecture {getattr(sae, 'arch', None)!r} has no SAELens equivalent "
                          f"(exportable: {', '.join(exportable)})")
    if sae.needs_calibration and not sae.calibrated:
        raise ExportError(
            f"{checkpoint} is a {sae.title} SAE without a calibrated inference threshold, so it has no faithful "
            f"per-token ({SAELENS_TITLES[arch]}) form: only a run's final checkpoint is calibrated. Calibrate this "
            f"one with `train calibrate {checkpoint}` (held-out rows; --kind global|per_feature), then export again")
    threshold = sae.inference_threshold()
    if threshold is not None and bool((threshold < 0).any()):
        raise ExportError(f"{checkpoint}: negative thresholds cannot be expressed in SAELens' JumpReLU "
                          "(it applies relu(threshold))")
    return arch


@torch.no_grad()
def saelens_state_dict(sae: BaseAutoencoder, scale_in: float,
                       scale_out: float | None = None) -> dict[str, torch.Tensor]:
    """SAELens tensors (float32, CPU, contiguous) with the dataset scaling folded in: the SAE was
    trained on scale_in * x and predicts scale_out * x (default: scale_in; an SAE has one site)."""
    arch = check_exportable(sae)
    scales = [scale_in, scale_in if scale_out is None else scale_out]
    for s in scales:
        if not float(s) > 0 or float(s) != float(s) or float(s) == float("inf"):
            raise ExportError(f"scaling factor {s!r} must be a positive finite number")
    try:
        out = sae.export_tensors(*map(float, scales))
    except ValueError as e:  # e.g. an SAE's input and output scaling differ
        raise ExportError(str(e)) from None
    if tuple(out) != SAELENS_KEYS[arch]:
        raise ExportError(f"{sae.arch} exports tensors {', '.join(out)}, but SAELens' {arch} class has "
                          f"{', '.join(SAELENS_KEYS[arch])}")
    return {k: v.contiguous() for k, v in out.items()}


def saelens_config(sae: BaseAutoencoder, cfg, spec, *, scale: float, checkpoint: Path, run_dir: Path,
                   step: int | None, tokens: int | None, model_name: str | None = None,
                   cache_path: str | None = None, scale_out: float | None = None) -> dict[str, Any]:
    """cfg.json contents (SAELens 6.x SAEConfig.to_dict layout); scale_out: a transcoder's target scaling."""
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
    out.update(sae.export_config())
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
            "trained_arch": sae.arch,
            "threshold_kind": sae.describe()["threshold_kind"],
            "k": sae.describe()["k"],
            "variant": sae.describe(),
            "folded_scaling_factor": scale,
            "folded_scaling_factor_out": scale if scale_out is None else scale_out,
            "normalize": cfg.normalize,
            "drop_bos": cfg.drop_bos,
            "mask_token_ids": cfg.mask_token_ids,
            "mask_norm_threshold": cfg.mask_norm_threshold,
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
    out_site = getattr(cfg, "out_site", None)
    if out_site and arch.endswith("transcoder"):  # what the decoder predicts (SAELens' transcoders name it so)
        target = next(s for s in spec.sites if s.name == out_site)
        out["metadata"].update(hook_name_out=out_site, hook_layer_out=target.layer, hook_head_index_out=None)
        out["metadata"]["saeforge"]["site_out"] = {"name": target.name, "layer": target.layer, "kind": target.kind,
                                                   "hf_module": target.hf_module}
    return out


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "saelens",
                      model_name: str | None = None, store_path: str | None = None,
                      force: bool = False, push_to_hub: str | None = None) -> Path:
    """Write `path`'s SAE (a run folder's newest checkpoint, or one checkpoint folder) to out_dir:
    cfg.json, sae_weights.safetensors, the model card README.md (train.model_card) and, when the
    checkpoint's eval.json has one beside it, saebench_core.json. push_to_hub: then upload the
    folder to that hub model repository (train.model_card.HubError when offline: the folder stays).
    fmt "circuit-tracer": train.export_circuit_tracer (path may then be a list of per-layer transcoders)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    if fmt == "circuit-tracer":
        from train.export_circuit_tracer import export_circuit_tracer

        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        out = export_circuit_tracer(paths, out_dir, model_name=model_name, store_path=store_path, force=force)
        if push_to_hub is not None:
            model_card_push(out, push_to_hub)
        return out
    if not isinstance(path, (str, os.PathLike)):
        if len(path) != 1:
            raise ExportError(f"--format saelens exports one checkpoint, got {len(path)}; export each on its own")
        path = path[0]
    run = load_sae_checkpoint(path)
    check_exportable(run.sae, run.checkpoint)
    try:
        cache = open_cache_checked(run.cfg, run.state, store_path)
    except EvalError as e:
        raise ExportError(f"{e} (the export needs its scaling factor and provenance)") from None
    if model_name is None and cache.spec.model.get("source") in ("folder", "gguf"):
        warnings.warn(f"metadata.model_name will be the local path {cache.spec.model.get('id')!r} the cache was "
                      "harvested from, which SAELens and other tools cannot load by name; pass --model-name with the "
                      "model's hub id (e.g. --model-name HuggingFaceTB/SmolLM2-135M)")
    plan = plan_of(run.cfg)
    s_in, s_out = checkpoint_scaling(run, cache).fold_factors(plan.inputs[0], (plan.outputs or plan.inputs)[0])
    tensors = saelens_state_dict(run.sae, s_in, s_out)
    config = saelens_config(run.sae, run.cfg, cache.spec, scale=s_in, checkpoint=run.checkpoint,
                            run_dir=run.run_dir, step=run.state.get("step"), tokens=run.state.get("tokens"),
                            model_name=model_name, cache_path=str(cache.root), scale_out=s_out)
    found = find_eval(run.checkpoint, run.run_dir)
    card = model_card(config, run.cfg, cache.spec, cache_id=cache_identity(cache), found=found,
                      checkpoint=run.checkpoint)
    bench = found[1].parent / SAEBENCH_FILENAME if found else None
    bench_bytes = bench.read_bytes() if bench is not None and bench.exists() else None
    out = Path(out_dir)
    existing = [n for n in (CFG_FILENAME, WEIGHTS_FILENAME, CARD_FILENAME, SAEBENCH_FILENAME) if (out / n).exists()]
    if existing and not force:
        raise ExportError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --force")
    make_folder(out, "--out")
    tmp = out / f".{WEIGHTS_FILENAME}.tmp.{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILENAME)
    write_atomic(out / CFG_FILENAME, json.dumps(config, indent=1).encode())
    write_atomic(out / CARD_FILENAME, card.encode())
    if bench_bytes is not None:
        write_atomic(out / SAEBENCH_FILENAME, bench_bytes)
    elif (out / SAEBENCH_FILENAME).exists():  # --force over an older export: do not keep another SAE's figures
        (out / SAEBENCH_FILENAME).unlink()
    if push_to_hub is not None:
        model_card_push(out, push_to_hub)
    return out
