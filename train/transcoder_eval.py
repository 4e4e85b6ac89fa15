"""`train eval` of a transcoder, skip transcoder or CLT: per-layer reconstruction of its targets
and the LM's loss with the covered MLPs replaced (train.evaluation dispatches here).

Reconstruction, per encoding (the variant's `encodings()`), on the run's held-out rows, of each
covered layer l's target site from its input site (a CLT: from the inputs of layers <= l):

    fvu                 sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (fraction of variance unexplained)
    mse, mse_raw        mean over rows of sum_d (y - y_hat)^2, normalised / in raw units (/ s_out^2)
    l0                  mean over rows of the layer's active latents
    dead                the layer's latents that never fired on the evaluated rows (and dead_fraction)

under "per_layer", beside the figures of all targets together (explained_variance = 1 - fvu over
every layer's rows, mse, l0 summed over layers, dead, density_hist: train.evaluation's names).

Model performance (train.replacement): on the held-out contexts, the LM's next-token CE clean,
with every covered MLP output replaced by the model's prediction from the same forward's inputs
(ce_replaced), and with those outputs zero-ablated (ce_zero_ablation); ce_loss_score =
(ce_zero - ce_replaced) / (ce_zero - ce_clean), ce_degradation = ce_replaced - ce_clean,
kl_replaced = KL(clean || replaced), kl_div_score = (kl_zero - kl_replaced) / kl_zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.durable import write_atomic
from train.errors import EvalError
from train.heldout import evaluate_heldout
from train.lm_figures import autocast_dtype, cache_site, ce_loss_score, heldout_contexts, lm_losses, load_lm
from train.logs import density_histogram
from train.row_mask import RowMask, SplicePositions, resolve_row_mask, spliced_positions
from train.replacement import Predictor, Replacement, ZeroAblation
from train.sae.base import device_of
from train.site_pairs import plan_of


class PerLayerSums:
    """Accumulator (train.heldout) of each covered layer's figures; rows arrive flattened [B, L*d], latents [B, L*m]."""

    def __init__(self, n_layers: int, latents: int, d: int, device: torch.device):
        self.L, self.m, self.d = n_layers, latents, d
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sq_err, self.y_sq, self.y_sum, self.l0 = z(n_layers), z(n_layers), z(n_layers, d), z(n_layers)
        self.fired = torch.zeros(n_layers, latents, dtype=torch.long, device=device)
        self.rows = 0

    def update(self, y: Tensor, f: Tensor, y_hat: Tensor) -> None:
        B = y.shape[0]
        y, y_hat, on = y.view(B, self.L, self.d).double(), y_hat.view(B, self.L, self.d).double(), f.view(B, self.L, self.m) > 0
        self.sq_err += (y - y_hat).pow(2).sum((0, 2))
        self.y_sq += y.pow(2).sum((0, 2))
        self.y_sum += y.sum(0)
        self.l0 += on.sum((0, 2)).double()
        self.fired += on.sum(0)
        self.rows += B

    def figures(self, scale_out: list[float], in_sites, out_sites, layers: list[int]) -> list[dict[str, Any]]:
        n = self.rows
        var = self.y_sq - self.y_sum.pow(2).sum(-1) / n
        out = []
        for l in range(self.L):
            dead = int((self.fired[l] == 0).sum())
            mse = float(self.sq_err[l]) / n
            out.append({"layer": layers[l], "in_site": in_sites[l], "out_site": out_sites[l],
                        "fvu": float(self.sq_err[l] / var[l]), "mse": mse, "mse_raw": mse / scale_out[l] ** 2,
                        "l0": float(self.l0[l]) / n, "dead": dead, "dead_fraction": dead / self.m})
        return out


class _Fired:
    def __init__(self, m: int, device: torch.device):
        self.fired = torch.zeros(m, dtype=torch.long, device=device)

    def update(self, y: Tensor, f: Tensor, y_hat: Tensor) -> None:
        self.fired += (f > 0).sum(0)


def evaluate_transcoder(run, cache, store, scaling, *, batches: int, max_contexts: int, lm_batch_size: int,
                        model: str | None, skip_lm: bool, device: torch.device, autocast: str) -> dict[str, Any]:
    """The figures of the module docstring for a loaded checkpoint (train.runs.LoadedCheckpoint)
    whose held-out rows `store` serves; `scaling`: its train.scaling.Scaling."""
    cfg, sae = run.cfg, run.sae
    plan = plan_of(cfg)
    L = len(plan.inputs)
    s_in, s_out = [scaling.factor(s) for s in plan.inputs], [scaling.factor(s) for s in plan.outputs]
    records = {r.name: r for r in cache.spec.sites}
    layers = [records[s].layer for s in plan.outputs]
    m = sae.d_sae // L
    dev = device_of(sae)
    modes = sae.encodings()
    per_mode: dict[str, Any] = {}
    for enc in modes:
        layer_sums, fired = PerLayerSums(L, m, cache.spec.d_model, dev), _Fired(sae.d_sae, dev)
        base = evaluate_heldout(sae, store, max_batches=batches, encoding=enc, accumulators=[layer_sums, fired], plan=plan)
        dead = int((fired.fired == 0).sum())
        per_mode[enc.name] = {
            "label": enc.label, "rows": base["rows"], "fvu": 1 - base["explained_variance"],
            "explained_variance": base["explained_variance"], "mse": base["mse"], "l0": base["l0"], "dead": dead,
            "dead_fraction": dead / sae.d_sae, "density_hist": density_histogram(fired.fired, base["rows"]),
            "per_layer": layer_sums.figures(s_out, plan.inputs, plan.outputs, layers)}
    mask = RowMask.from_cfg(resolve_row_mask(cfg, cache))
    start = 1 if cfg.drop_bos else 0
    lm: dict[str, Any] = {"skipped": "--skip-lm"}
    if not skip_lm:
        lm_model, _, check = load_lm(cache, plan.inputs[0], model, device)
        in_sites = [cache_site(lm_model, cache, s) for s in plan.inputs]
        out_sites = [cache_site(lm_model, cache, s) for s in plan.outputs]
        contexts = heldout_contexts(cache, list(store.heldout_shards), max_contexts)
        if contexts.shape[1] - start < 1:
            raise EvalError("contexts are too short to replace anything after position 0")
        where = SplicePositions(mask, in_sites[0])  # the norm rule reads the run's site: the first input
        interventions: dict[str, Any] = {"zero": ZeroAblation(out_sites, where)}
        for enc in modes:
            interventions[f"replaced:{enc.name}"] = Replacement(Predictor(sae, enc, s_in, s_out), in_sites, out_sites,
                                                                where)
        res = lm_losses(lm_model, None, contexts, interventions, batch_size=lm_batch_size,
                        autocast_dtype=autocast_dtype(autocast, cache.spec.model.get("compute_dtype"), device),
                        positions=where)
        ce_clean, ce_zero, kl_zero = res["clean"]["ce"], res["zero"]["ce"], res["zero"]["kl"]
        lm = {**check, "contexts": int(contexts.shape[0]), "context_length": int(contexts.shape[1]),
              "predictions": res["predictions"], "lm_batch_size": lm_batch_size, "ce_clean": ce_clean,
              "ce_zero_ablation": ce_zero, "kl_zero_ablation": kl_zero,
              "replaced_sites": list(plan.outputs), "replaced_positions": spliced_positions(mask)}
        for enc in modes:
            r = res[f"replaced:{enc.name}"]
            per_mode[enc.name].update({
                "ce_replaced": r["ce"], "ce_degradation": r["ce"] - ce_clean,
                "ce_loss_score": ce_loss_score(ce_clean, r["ce"], ce_zero), "kl_replaced": r["kl"],
                "kl_div_score": (kl_zero - r["kl"]) / kl_zero if kl_zero > 0 else float("nan")})
        del lm_model
    described = sae.describe()
    return {
        "kind": "transcoder", "checkpoint": str(run.checkpoint), "run_dir": str(run.run_dir), "run_name": cfg.run_name,
        "step": run.state.get("step"), "tokens_trained": run.state.get("tokens"), "arch": cfg.arch,
        "sparsity": cfg.sparsity or "topk", "site": cfg.site, "in_sites": list(plan.inputs), "out_sites": list(plan.outputs),
        "layers": layers, "d_in": sae.d_in, "d_sae": sae.d_sae, "latents_per_layer": m, "k": described["k"],
        "threshold_kind": described["threshold_kind"],
        "scaling_factors": {s: scaling.factor(s) for s in plan.sites}, "cache": str(cache.root),
        "settings": {"batches": batches, "batch_size": cfg.batch_size, "max_contexts": max_contexts,
                     "heldout_shards": list(store.heldout_shards), "drop_bos": cfg.drop_bos, "row_mask": mask.record(),
                     "device": str(device),
                     "autocast": autocast},
        "primary": modes[0].name, "encodings": per_mode, "lm": lm,
    }


def write_results(results: dict[str, Any], dest: Path) -> Path:
    from train.evaluation import _jsonable

    write_atomic(dest, json.dumps(_jsonable(results), indent=1).encode())
    return dest


def format_table(results: dict[str, Any]) -> str:
    """A console table: one block per encoding, one row per covered layer."""
    lines = [f"checkpoint {results['checkpoint']}",
             f"  {results['arch']} ({results['sparsity']}), {len(results['layers'])} layer(s), "
             f"{results['latents_per_layer']} latents per layer" + (f", k {results['k']}" if results.get("k") else "")]
    lm = results["lm"]
    if "skipped" in lm:
        lines.append("  LM figures skipped (--skip-lm)")
    else:
        lines.append(f"  LM {lm['model']}: {lm['contexts']} contexts x {lm['context_length']} tokens; CE clean "
                     f"{lm['ce_clean']:.4f}, MLP outputs zero-ablated {lm['ce_zero_ablation']:.4f}")
    for name, figs in results["encodings"].items():
        lines.append(f"  [{name}] {figs['label']}: FVU {figs['fvu']:.4f}, L0 {figs['l0']:.2f}, dead {figs['dead']}/"
                     f"{results['d_sae']}")
        if "ce_replaced" in figs:
            lines.append(f"    CE replaced {figs['ce_replaced']:.4f} (degradation {figs['ce_degradation']:+.4f}, "
                         f"CE-loss score {figs['ce_loss_score']:.4f}), KL {figs['kl_replaced']:.4g}")
        lines.append(f"    {'layer':>5s} {'input site':>30s} -> {'target site':<24s} {'FVU':>8s} {'L0':>7s} {'dead':>6s}")
        for r in figs["per_layer"]:
            lines.append(f"    {r['layer']:>5d} {r['in_site']:>30s} -> {r['out_site']:<24s} {r['fvu']:8.4f} "
                         f"{r['l0']:7.2f} {r['dead']:6d}")
    return "\n".join(lines)
