"""Export for circuit-tracer 0.5 (`train export CHECKPOINT... --format circuit-tracer --out DIR`):
a cross-layer transcoder (one checkpoint), or a set of per-layer transcoders (one checkpoint per
layer, covering layers 0..n-1 once each, all reading the same site kind and predicting the same).

DIR gets config.yaml (JSON text, which YAML reads) with the keys circuit-tracer's loaders read:

    model_kind            "transcoder_set" or "cross_layer_transcoder"
    model_name            the harvested model's id (--model-name overrides)
    scan                  an identifier of the export (circuit-tracer's feature-visualisation key)
    feature_input_hook    the input site's TransformerLens name below blocks.L (mlp_in: "ln2.hook_normalized",
                          resid_mid: "hook_resid_mid"); circuit-tracer hooks blocks.{layer}.{it}
    feature_output_hook   the same for the target site ("hook_mlp_out")
    saeforge              provenance: the runs, checkpoints, caches, sites and folded scaling factors

and the tensors (float32 safetensors, the dataset scaling and the input centre b_in folded in as
for SAELens: Transcoder.fold_scaling; circuit-tracer's encoder weight is [m, d], the transpose of
SAELens' W_enc [d, m]):

    transcoder_set            layer_{l}.safetensors: W_enc [m, d], b_enc [m], W_dec [m, d], b_dec [d],
                              activation_function.threshold [m] (JumpReLU forms), W_skip [d, d] (skip)
    cross_layer_transcoder    W_enc_{l}.safetensors: W_enc_{l} [m, d], b_enc_{l} [m], b_dec_{l} [d]
                              (target l's bias), threshold_{l} [m] (JumpReLU forms);
                              W_dec_{l}.safetensors: W_dec_{l} [m, L - l, d] (source l -> targets l..L-1)

circuit-tracer's inference (what the export targets; tests/test_export_circuit_tracer.py checks it
against an independent re-implementation and, where /opt/circuit-tracer-venv is present, the package):

    h_l = x_l W_enc_l^T + b_enc_l;  f_l = relu(h_l) or h_l * (h_l > threshold_l)
    transcoder:  y_hat_l = f_l W_dec_l + b_dec_l (+ x_l W_skip_l^T)
    clt:         y_hat_t = b_dec_t + sum_{l <= t} f_l W_dec_l[:, t - l]

Refused (ExportError, one line): TopK sparsity and an uncalibrated BatchTopK (no ReLU / JumpReLU
form), negative thresholds (circuit-tracer's JumpReLU has no relu), a set that is not layers 0..n-1
of one model with one input and one target kind and the same skip setting, a transcoder whose
input and target are at different layers, d_in != d_out. circuit-tracer's ReplacementModel
replaces every layer of the model: export a set or a CLT covering them all to trace with it.
Each file is written to a temporary name, fsynced and renamed (config.yaml last).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from shared.cache_spec import software_version
from shared.durable import write_atomic
from train.errors import EvalError
from train.evaluation import checkpoint_scaling, open_cache_checked
from train.export import ExportError, check_exportable
from train.runs import load_sae_checkpoint
from train.site_pairs import plan_of

CONFIG_FILENAME = "config.yaml"
_FORMS = ("transcoder", "jumprelu_transcoder", "skip_transcoder", "jumprelu_skip_transcoder")


def hook_suffix(site_name: str, layer: int) -> str:
    """A TransformerLens site name's part below blocks.{layer} ("blocks.3.ln2.hook_normalized" -> "ln2.hook_normalized")."""
    prefix = f"blocks.{layer}."
    if not site_name.startswith(prefix):
        raise ExportError(f"site {site_name!r} is not a block site of layer {layer}; circuit-tracer hooks "
                          "blocks.{layer}.<hook>")
    return site_name[len(prefix):]


def _check_thresholds(thresholds, where: str) -> None:
    for t in thresholds:
        if t is not None and bool((t < 0).any()):
            raise ExportError(f"{where}: negative thresholds cannot be expressed in circuit-tracer's JumpReLU "
                              "(it keeps h where h > threshold, without relu)")


def _sites(run, cache) -> list[tuple[Any, Any]]:
    """(input SiteRecord, target SiteRecord) per covered layer, each pair at one layer."""
    records = {r.name: r for r in cache.spec.sites}
    plan = plan_of(run.cfg)
    pairs = [(records[i], records[o]) for i, o in zip(plan.inputs, plan.outputs or ())]
    for i, o in pairs:
        if i.layer != o.layer:
            raise ExportError(f"{run.checkpoint}: reads {i.name} and predicts {o.name}, at different layers; "
                              "circuit-tracer reads and writes each layer's features at that layer")
    return pairs


def transcoder_layer_tensors(run, cache) -> tuple[int, dict[str, torch.Tensor], tuple[Any, Any], tuple[float, float]]:
    """(layer, circuit-tracer tensors, (input, target) SiteRecords, (s_in, s_out)) of a per-layer transcoder run."""
    sae = run.sae
    if getattr(type(sae), "site_layout", None) != "pair":
        raise ExportError(f"{run.checkpoint}: a {getattr(sae, 'arch', type(sae).__name__)} is not a transcoder; "
                          "circuit-tracer loads transcoders (arch transcoder / skip_transcoder) and clts")
    if check_exportable(sae, run.checkpoint) not in _FORMS:
        raise ExportError(f"{run.checkpoint}: no circuit-tracer form for {sae.saelens_arch}")
    (site_in, site_out), = _sites(run, cache)
    if sae.d_in != sae.d_out:
        raise ExportError(f"{run.checkpoint}: d_in {sae.d_in} != d_out {sae.d_out}; circuit-tracer's transcoders "
                          "map the residual width to itself")
    s_in, s_out = checkpoint_scaling(run, cache).fold_factors(site_in.name, site_out.name)
    t = sae.export_tensors(s_in, s_out)
    out = {"W_enc": t["W_enc"].t().contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "threshold" in t:
        _check_thresholds([t["threshold"]], str(run.checkpoint))
        out["activation_function.threshold"] = t["threshold"]
    if "W_skip" in t:
        out["W_skip"] = t["W_skip"]
    return site_out.layer, {k: v.contiguous() for k, v in out.items()}, (site_in, site_out), (s_in, s_out)


def clt_tensors(run, cache) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[Any, Any]], list[tuple[float, float]]]:
    """({filename: tensors}, (input, target) SiteRecords per layer, (s_in, s_out) per layer) of a clt run."""
    sae = run.sae
    form = type(sae.sources[0]).saelens_arch
    if form not in ("transcoder", "jumprelu_transcoder"):
        raise ExportError(f"{run.checkpoint}: a {sae.rule} clt has no circuit-tracer form (its clts are ReLU or "
                          "JumpReLU); train it with --sparsity vanilla, jumprelu or batchtopk")
    if sae.needs_calibration and not sae.calibrated:
        raise ExportError(f"{run.checkpoint} is a {sae.rule} clt without calibrated inference thresholds (only a "
                          f"run's final checkpoint is calibrated): run `train calibrate {run.checkpoint}`, then export")
    pairs = _sites(run, cache)
    if [o.layer for _, o in pairs] != list(range(len(pairs))):
        raise ExportError(f"{run.checkpoint} covers layers {[o.layer for _, o in pairs]}; circuit-tracer's clt "
                          "covers layers 0..n-1 in order: train the clt on those")
    scaling = checkpoint_scaling(run, cache)
    scales = [scaling.fold_factors(i.name, o.name) for i, o in pairs]
    layers = sae.export_layers([s for s, _ in scales], [s for _, s in scales])
    _check_thresholds([lay.get("threshold") for lay in layers], str(run.checkpoint))
    files = {}
    for l, lay in enumerate(layers):
        enc = {f"W_enc_{l}": lay["W_enc"].t(), f"b_enc_{l}": lay["b_enc"], f"b_dec_{l}": lay["b_dec"]}
        if "threshold" in lay:
            enc[f"threshold_{l}"] = lay["threshold"]
        files[f"W_enc_{l}.safetensors"] = {k: v.contiguous() for k, v in enc.items()}
        files[f"W_dec_{l}.safetensors"] = {f"W_dec_{l}": lay["W_dec"].contiguous()}
    return files, pairs, scales


def _provenance(run, cache, pairs, scales) -> dict[str, Any]:
    return {"run_name": run.cfg.run_name, "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint),
            "step": run.state.get("step"), "tokens_trained": run.state.get("tokens"), "arch": run.cfg.arch,
            "sparsity": getattr(run.sae, "rule", None), "threshold_kind": run.sae.describe()["threshold_kind"],
            "cache": str(cache.root),
            "layers": [{"layer": o.layer, "in_site": i.name, "out_site": o.name, "in_hf_module": i.hf_module,
                        "out_hf_module": o.hf_module, "folded_scaling_factor_in": si, "folded_scaling_factor_out": so}
                       for (i, o), (si, so) in zip(pairs, scales)]}


def export_circuit_tracer(paths: list, out_dir: str | os.PathLike, *, model_name: str | None = None,
                          store_path: str | None = None, force: bool = False) -> Path:
    """Write a clt (one path) or a set of per-layer transcoders (one path per layer) to out_dir (module docstring)."""
    if store_path is not None and len(paths) > 1:
        raise ExportError("--store names one cache; a set of transcoders is exported from the caches their runs name")
    opened = []
    for p in paths:
        run = load_sae_checkpoint(p)
        try:
            cache = open_cache_checked(run.cfg, run.state, store_path)
        except EvalError as e:
            raise ExportError(f"{e} (the export needs its scaling factors and provenance)") from None
        opened.append((run, cache))
    clts = [r for r, _ in opened if hasattr(r.sae, "sources")]
    files: dict[str, dict[str, torch.Tensor]] = {}
    if clts:
        if len(opened) != 1:
            raise ExportError("a clt is exported alone: pass its one checkpoint")
        run, cache = opened[0]
        files, pairs, scales = clt_tensors(run, cache)
        kind, provenance = "cross_layer_transcoder", [_provenance(run, cache, pairs, scales)]
    else:
        kind, provenance, pairs, by_layer = "transcoder_set", [], [], {}
        for run, cache in opened:
            layer, tensors, pair, scale = transcoder_layer_tensors(run, cache)
            if layer in by_layer:
                raise ExportError(f"{run.checkpoint} and {by_layer[layer]} both predict layer {layer}; pass one "
                                  "transcoder per layer")
            by_layer[layer] = run.checkpoint
            files[f"layer_{layer}.safetensors"] = tensors
            pairs.append(pair)
            provenance.append(_provenance(run, cache, [pair], [scale]))
        if sorted(by_layer) != list(range(len(by_layer))):
            raise ExportError(f"the transcoders predict layers {sorted(by_layer)}; circuit-tracer loads a set covering "
                              "layers 0..n-1, one transcoder each: add the missing layers")
        for what, names in (("input", {p[0].kind for p in pairs}), ("target", {p[1].kind for p in pairs})):
            if len(names) != 1:
                raise ExportError(f"the transcoders' {what} sites are of kinds {', '.join(sorted(names))}; a "
                                  f"circuit-tracer set reads one input hook and writes one output hook")
        if len({"W_skip" in t for t in files.values()}) != 1:
            raise ExportError("some transcoders have a skip map and some do not; circuit-tracer's set takes one setting")
    models = {(c.spec.model.get("id"), c.spec.model.get("config_hash")) for _, c in opened}
    if len(models) != 1:
        raise ExportError(f"the checkpoints come from caches of different models ({sorted(map(str, models))}); "
                          "a circuit-tracer export describes one model")
    site_in, site_out = pairs[0]
    spec = opened[0][1].spec
    config = {
        "model_kind": kind,
        "model_name": model_name or spec.model.get("id"),
        "scan": f"saeforge/{opened[0][0].cfg.run_name}" + (f"+{len(opened) - 1}" if len(opened) > 1 else ""),
        "feature_input_hook": hook_suffix(site_in.name, site_in.layer),
        "feature_output_hook": hook_suffix(site_out.name, site_out.layer),
        "saeforge": {"software_version": software_version(), "format": "circuit-tracer 0.5", "model": spec.model,
                     "dataset": spec.dataset, "bos_policy": spec.bos_policy, "context_size": spec.context_length,
                     "runs": provenance},
    }
    out = Path(out_dir)
    existing = [n for n in (CONFIG_FILENAME, *files) if (out / n).exists()]
    if existing and not force:
        raise ExportError(f"{out} already holds {', '.join(existing[:3])}; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        write_atomic(out / name, save(tensors, metadata={"format": "pt"}))
    write_atomic(out / CONFIG_FILENAME, json.dumps(config, indent=1, default=str).encode())
    return out
