"""How an evaluation's figures are shown: the console table of `train eval` (what each figure
means and which direction is good) and the wandb log of the run (train.evaluation computes them)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from train.config import TrainConfig
from train.logs import resolve_wandb_mode

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens counts as dense


def scalar_figures(results: dict[str, Any]) -> dict[str, float]:
    """Flat {"eval/<encoding>/<figure>": value} of every numeric figure (for wandb)."""
    flat: dict[str, float] = {}
    for name, figs in results["encodings"].items():
        for k, v in figs.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"eval/{name}/{k}"] = v
    for k, v in results.get("lm", {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"eval/lm/{k}"] = v
    flat["eval/step"] = results.get("step")
    return flat


def log_to_wandb(run_dir: Path, cfg: TrainConfig, results: dict[str, Any], mode: str) -> bool:
    """Log the figures to the run's wandb run (same id as training); never raises."""
    mode = resolve_wandb_mode(os.environ.get("WANDB_MODE", mode) if mode != "disabled" else mode)
    if mode == "disabled":
        return False
    try:
        import wandb

        from train.logs import start_wandb

        run = start_wandb(run_dir, cfg.to_dict(), mode, cfg.wandb_project, cfg.wandb_group)
        payload: dict[str, Any] = scalar_figures(results)
        for name, figs in results["encodings"].items():
            hist = figs["density_hist"]
            payload[f"eval/{name}/density_hist"] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
        run.log(payload)
        run.summary.update({k: v for k, v in payload.items() if not k.endswith("density_hist")})
        run.finish()
        return True
    except Exception as e:  # noqa: BLE001 - reporting must not fail the evaluation
        warnings.warn(f"wandb logging of the evaluation failed ({e}); figures are in eval.json")
        return False


def format_table(results: dict[str, Any]) -> str:
    """A readable console table of an evaluation's figures, one column per encoding."""
    if results.get("kind") == "transcoder":
        from train.transcoder_eval import format_table as transcoder_table

        return transcoder_table(results)
    enc = results["encodings"]
    names = list(enc)
    k = f", k {results['k']}" if results.get("k") else ""
    lines = [f"checkpoint {results['checkpoint']}",
             f"  {results['arch']} at {results['site']}, d_sae {results['d_sae']}{k}, "
             f"scaling factor {results['scaling_factor']:.4g}"]
    first = enc[names[0]]
    lines.append(f"  held-out rows {first['rows']} (shards {results['settings']['heldout_shards']}"
                 f"{', position-0 rows dropped' if results['settings']['drop_bos'] else ''})")
    for n in names:
        lines.append(f"  [{n}] {enc[n]['label']}")
    lm = results["lm"]
    if "skipped" in lm:
        lines.append("  LM figures skipped (--skip-lm)")
    else:
        lines.append(f"  LM {lm['model']}: {lm['contexts']} contexts x {lm['context_length']} tokens, "
                     f"{lm['predictions']} predictions; spliced positions {results['settings']['spliced_positions']}")
        lines.append(f"  CE clean {lm['ce_clean']:.4f}   zero-ablation {lm['ce_zero_ablation']:.4f}   "
                     f"mean-ablation {lm['ce_mean_ablation']:.4f}")
    d = results["d_sae"]
    rows: list[tuple[str, str, Callable[[dict], str], str]] = [
        ("explained variance", "explained_variance", lambda r: f"{r['explained_variance']:.4f}",
         "share of the activations' variance reconstructed: higher is better, 1 = perfect"),
        ("mse (normalised)", "mse", lambda r: f"{r['mse']:.4g}", "squared error per row, scaled so E||x||^2 = d_in: lower is better"),
        ("mse (raw)", "mse_raw", lambda r: f"{r['mse_raw']:.4g}", "the same in the model's units: lower is better"),
        ("cosine similarity", "cosine_similarity", lambda r: f"{r['cosine_similarity']:.4f}",
         "of each row and its reconstruction: higher is better, 1 = same direction"),
        ("L0", "l0", lambda r: f"{r['l0']:.2f}", "active latents per token: the sparsity (lower = sparser)"),
        ("L1", "l1", lambda r: f"{r['l1']:.4g}", "sum of the latents' activations per token"),
        ("dead latents", "dead", lambda r: f"{r['dead']}/{d} ({r['dead_fraction']:.1%})",
         "never fired on these rows: lower is better"),
        (f"dense latents (>{DENSE_THRESHOLD:.0%})", "dense", lambda r: f"{r['dense']}/{d} ({r['dense_fraction']:.1%})",
         f"fire on more than {DENSE_THRESHOLD:.0%} of tokens: lower is better"),
        ("CE spliced", "ce_spliced", lambda r: f"{r['ce_spliced']:.4f}",
         "the LM's next-token loss with the SAE spliced in: lower is better"),
        ("CE degradation", "ce_degradation", lambda r: f"{r['ce_degradation']:+.4f}", "CE spliced - CE clean: lower is better, 0 = no loss"),
        ("CE-loss score", "ce_loss_score", lambda r: _fmt(r["ce_loss_score"], ".4f"),
         "1 = as good as the clean LM, 0 = as bad as zero-ablation: higher is better"),
        ("KL(clean||spliced)", "kl_spliced", lambda r: f"{r['kl_spliced']:.4g}",
         "how far the spliced LM's predictions move: lower is better"),
        ("KL-div score", "kl_div_score", lambda r: _fmt(r["kl_div_score"], ".4f"),
         "1 - KL spliced / KL zero-ablation: higher is better, 1 = perfect"),
    ]
    width = max(17, *(len(n) + 2 for n in names))
    lines.append("")
    lines.append(f"  {'':26s}" + "".join(f"{n:>{width}s}" for n in names) + "   meaning")
    for title, key, fmt, meaning in rows:
        if key not in enc[names[0]]:
            continue
        lines.append(f"  {title:26s}" + "".join(f"{fmt(enc[n]):>{width}s}" for n in names) + f"   {meaning}")
    if results.get("note"):
        lines.append(f"  note: {results['note']}")
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
