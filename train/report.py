"""`train report PATH`: PNG figures and a Markdown summary for a run folder or a sweep folder.

Run: loss and L0 curves against tokens, the latest feature-density histogram, the held-out
figures (a Matryoshka SAE's also for each inner prefix alone).
Sweep: the same curves overlaid (one line per SAE), and the L0 / explained-variance frontier (and
L0 / CE-loss score when `train eval` has written eval.json), one point per SAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from train.checkpoints import CheckpointError
from train.layout import RunLayout, SweepLayout, is_checkpoint_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_dir).metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_figures(run_dir: Path) -> dict[str, Any]:
    """Held-out figures of a run: eval.json (from `train eval`) when present, else done.json."""
    out: dict[str, Any] = {}
    layout = RunLayout(run_dir)
    done = layout.done
    if done.exists():
        res = json.loads(done.read_text()).get("results", {})
        held = res.get("heldout", {})
        out.update({"explained_variance": held.get("explained_variance"), "l0": held.get("l0"),
                    "never_fired_fraction": held.get("never_fired_fraction")})
        for width, figures in res.get("heldout_prefix", {}).items():  # Matryoshka: each inner prefix alone
            out[f"explained_variance_prefix_{width}"] = figures.get("explained_variance")
    ev = layout.eval
    if ev.exists():
        data = json.loads(ev.read_text())
        flat = _find(data, ("ce_loss_score", "explained_variance", "l0"))
        out.update({k: v for k, v in flat.items() if v is not None})
    return out


def _find(data: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """First occurrence of each key in a nested dict (eval.json layouts may nest by mode)."""
    found: dict[str, Any] = {}

    def walk(d: Any) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if k in keys and k not in found and isinstance(v, (int, float)):
                    found[k] = v
            for v in d.values():
                walk(v)

    walk(data)
    return found


def _curves(ax_loss, ax_l0, ax_ev, runs: dict[str, list[dict[str, Any]]]) -> None:
    for label, metrics in runs.items():
        rows = [m for m in metrics if "loss" in m]
        tokens = [m["tokens"] for m in rows]
        ax_loss.plot(tokens, [m["loss"] for m in rows], label=label)
        ax_l0.plot(tokens, [m["l0"] for m in rows], label=label)
        ax_ev.plot(tokens, [m["explained_variance"] for m in rows], label=label)
    ax_loss.set(title="Training loss", xlabel="tokens", ylabel="loss (MSE + sparsity + aux)", yscale="log")
    ax_l0.set(title="L0 (active latents per token)", xlabel="tokens", ylabel="L0")
    ax_ev.set(title="Explained variance (training batches)", xlabel="tokens", ylabel="explained variance")
    for ax in (ax_loss, ax_l0, ax_ev):
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)


def _density(ax, metrics: list[dict[str, Any]], label: str) -> None:
    h = [m["density_hist"] for m in metrics if "density_hist" in m][-1]
    edges = h["edges"]
    ax.bar(edges[:-1], h["counts"], width=[b - a for a, b in zip(edges, edges[1:])], align="edge",
           color="tab:blue", edgecolor="white")
    ax.set(title=f"Feature density ({label})", xlabel="log10(fraction of tokens a latent fires on)",
           ylabel="latents")
    ax.axvline(-5, color="tab:red", ls="--", lw=1, label=f"1e-5: {h['below_1e-5']} latents below")
    ax.legend(fontsize=8)


def report_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise CheckpointError(f"{run_dir} has no metrics.jsonl: pass a run folder or a sweep folder")
    has_density = any("density_hist" in m for m in metrics)
    fig, axes = plt.subplots(1, 4 if has_density else 3, figsize=(21 if has_density else 16, 4.5))
    _curves(axes[0], axes[1], axes[2], {run_dir.name: metrics})
    if has_density:
        _density(axes[3], metrics, "latest")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    layout = RunLayout(run_dir)
    png = layout.report_png
    fig.savefig(png, dpi=110)
    plt.close(fig)
    figs = final_figures(run_dir)
    md = layout.report_md
    lines = [f"# {run_dir.name}", "", f"![training curves and feature density]({png.name})", "", "| figure | value |",
             "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in figs.items() if isinstance(v, (int, float))]
    md.write_text("\n".join(lines) + "\n")
    return md


def report_sweep(sweep_dir: Path) -> Path:
    sweep_dir = Path(sweep_dir)
    layout = SweepLayout(sweep_dir)
    record = json.loads(layout.spec.read_text())
    runs = {r["run_dir"]: layout.run(r["run_dir"]).root for r in record["runs"]}
    metrics = {name: read_metrics(d) for name, d in runs.items()}
    figs = {name: final_figures(d) for name, d in runs.items()}

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    _curves(axes[0], axes[1], axes[2], metrics)
    fig.tight_layout()
    fig.savefig(layout.curves_png, dpi=110)
    plt.close(fig)

    frontier_keys = [("explained_variance", "explained variance (held-out)"), ("ce_loss_score", "CE-loss score")]
    frontier_keys = [(k, t) for k, t in frontier_keys if any(f.get(k) is not None for f in figs.values())]
    if frontier_keys:
        fig, axes = plt.subplots(1, len(frontier_keys), figsize=(7 * len(frontier_keys), 5), squeeze=False)
        for ax, (key, title) in zip(axes[0], frontier_keys):
            for name, f in figs.items():
                if f.get(key) is None or f.get("l0") is None:
                    continue
                ax.scatter(f["l0"], f[key], s=40)
                ax.annotate(name.split("_blocks")[0] + "_" + name.rsplit("_", 2)[-2], (f["l0"], f[key]),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
            ax.set(title=f"L0 vs {title}", xlabel="L0 (held-out)", ylabel=title, xscale="log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(layout.frontier_png, dpi=110)
        plt.close(fig)
    for d in runs.values():
        if read_metrics(d):
            report_run(d)

    cols = ["explained_variance", "l0", "never_fired_fraction", "ce_loss_score"]
    lines = [f"# {record['name']}", "", f"![training curves]({layout.curves_png.name})", ""]
    if frontier_keys:
        lines += [f"![frontier]({layout.frontier_png.name})", ""]
    lines += ["| SAE | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, f in figs.items():
        vals = [f"{f[c]:.4g}" if isinstance(f.get(c), (int, float)) else "" for c in cols]
        lines.append(f"| [{name}]({name}/{layout.run(name).report_md.name}) | " + " | ".join(vals) + " |")
    md = layout.report_md
    md.write_text("\n".join(lines) + "\n")
    return md


def write_report(path: str | Path) -> Path:
    """Report for a run folder or a sweep folder; returns the Markdown summary's path."""
    path = Path(path)
    if SweepLayout.is_sweep(path):
        return report_sweep(path)
    if is_checkpoint_dir(path):
        path = RunLayout.of_checkpoint(path).root
    return report_run(path)
