"""`train report PATH`: PNG figures and a Markdown summary for a run folder or a sweep folder.

What a run folder holds is gathered into a `RunData` (read_run): the training batches' curves
(metrics.jsonl), the held-out evaluations logged during training (eval/* every eval_every tokens),
the held-out figures at the end (done.json), `train eval`'s figures (eval.json, when it has been
run) and a feature-density histogram (eval.json's, on held-out rows, else the newest logged during
training). The figures are drawn by train.report_plots:

    RUN/report.png        loss, explained variance (training batches and held-out), L0 and dead
                          latents when they vary (TopK's L0 is k throughout: said, not drawn), density
    SWEEP/curves.png      the same curves, one line per SAE, labelled by what the grid varies (k=16)
    SWEEP/frontier.png    held-out L0 against explained variance, and against the CE-loss score once
                          `train eval` has scored the SAEs; points joined along the varied sparsity
    RUN/report.md, SWEEP/report.md   the figures and a table of the held-out results (a Matryoshka
                          SAE's also for each inner prefix alone)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.checkpoints import CheckpointError
from train.layout import RunLayout, SweepLayout, is_checkpoint_dir
from train.report_plots import plot_frontier, plot_run, plot_sweep_curves

# Config keys never shown as what a sweep varies: names, places, and keys derived from others.
_NOT_VARIED = {"run_name", "out", "wandb_group", "device", "d_in", "site"}
SPARSITY_KEYS = ("k", "l1_coeff", "l0_coeff")  # the knob a frontier's points are joined along


@dataclass
class RunData:
    """What `train report` draws of one run. Series are lists of (tokens, value)."""

    name: str
    cfg: dict[str, Any]
    train: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # loss, explained_variance, l0, dead_fraction
    heldout: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # eval_every points and the final one
    final: dict[str, Any] = field(default_factory=dict)  # done.json's held-out figures (+ tokens)
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json's primary encoding (+ lm, tokens)
    density: tuple[dict[str, Any], str] | None = None  # (histogram, where it was measured)
    label: str = ""  # what distinguishes it within a sweep (k=16), else its name


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(run_dir).metrics
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_run(run_dir: str | Path) -> RunData:
    """Everything the report draws of `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    metrics = read_metrics(run_dir)
    cfg = _read_json(layout.config)
    batch = int(cfg.get("batch_size") or 1)
    data = RunData(run_dir.name, cfg, label=run_dir.name)
    for key in ("loss", "explained_variance", "l0", "dead_fraction"):
        data.train[key] = [(m["tokens"], m[key]) for m in metrics if key in m and "tokens" in m]
    for key in ("explained_variance", "l0", "mse"):  # logged every eval_every tokens, at step * batch_size
        data.heldout[key] = [(m.get("tokens", m["step"] * batch), m[f"eval/{key}"]) for m in metrics
                             if f"eval/{key}" in m]
    done = _read_json(layout.done)
    held = done.get("results", {}).get("heldout", {})
    if held:
        data.final = {**held, "tokens": done.get("tokens")}
        for width, prefix in done["results"].get("heldout_prefix", {}).items():  # Matryoshka: each inner prefix alone
            data.final[f"explained_variance_prefix_{width}"] = prefix.get("explained_variance")
        for key in ("explained_variance", "l0", "mse"):
            if key in held and done.get("tokens") is not None:
                data.heldout[key].append((done["tokens"], held[key]))
    ev = _read_json(layout.eval)
    if ev.get("encodings"):
        primary = ev["encodings"][ev.get("primary") or next(iter(ev["encodings"]))]
        data.evaluation = {**{k: v for k, v in primary.items() if k != "density_hist"},
                           "lm": ev.get("lm", {}), "tokens": ev.get("tokens_trained")}
        if primary.get("density_hist"):
            data.density = (primary["density_hist"], f"held-out, `train eval`, {primary.get('rows', 0):,} rows")
    if data.density is None:
        logged = [m for m in metrics if "density_hist" in m]
        if logged:
            data.density = (logged[-1]["density_hist"], f"training batches, up to step {logged[-1]['step']:,}")
    return data


def figures(data: RunData) -> dict[str, Any]:
    """The held-out results of a run for the tables: `train eval`'s when it has run, else done.json's."""
    out = {k: v for k, v in data.final.items()
           if k in ("explained_variance", "l0", "never_fired_fraction") or k.startswith("explained_variance_prefix_")}
    ev = data.evaluation
    if ev:
        out.update({k: ev[k] for k in ("explained_variance", "l0", "dead_fraction", "ce_loss_score", "kl_div_score")
                    if isinstance(ev.get(k), (int, float))})
    return {k: v for k, v in out.items() if v is not None}


def varied_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between the SAEs of a sweep (dict_size only when it is
    not just expansion's consequence)."""
    keys = [k for k in configs[0] if k not in _NOT_VARIED and len({json.dumps(c.get(k)) for c in configs}) > 1]
    if "expansion" in keys and "dict_size" in keys:
        keys.remove("dict_size")
    return keys


def describe(cfg: dict[str, Any], keys: list[str]) -> str:
    """A short label from `keys` of a config: 'topk k=16' (the arch by its name alone)."""
    parts = [str(cfg[k]) if k == "arch" else f"{k}={cfg[k]:g}" if isinstance(cfg[k], float) else f"{k}={cfg[k]}"
             for k in keys]
    return " ".join(parts) or str(cfg.get("arch", ""))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


TABLE = [("explained_variance", "held-out explained variance (higher is better; 1 = perfect)"),
         ("l0", "held-out L0: active latents per token"),
         ("never_fired_fraction", "latents that never fired on the held-out rows (lower is better)"),
         ("dead_fraction", "dead latents in `train eval` (lower is better)"),
         ("ce_loss_score", "CE-loss score: 1 = the LM with the SAE spliced in is as good as without it, 0 = as bad "
                           "as zero-ablating the site (higher is better)"),
         ("kl_div_score", "KL-div score: the same scale for the KL divergence to the clean LM (higher is better)")]
EVAL_HINT = "CE-loss and KL figures need `train eval {}` (it writes eval.json); then run `train report` again."


def report_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not read_metrics(run_dir):
        raise CheckpointError(f"{run_dir} has no metrics.jsonl: pass a run folder or a sweep folder")
    data = read_run(run_dir)
    layout = RunLayout(run_dir)
    drawn = plot_run(data, layout.report_png)
    figs = figures(data)
    lines = [f"# {run_dir.name}", "", f"![{', '.join(drawn)}]({layout.report_png.name})", "",
             "| figure | value | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {_fmt(figs[k])} | {meaning} |" for k, meaning in TABLE if k in figs]
    lines += [f"| `{k}` | {_fmt(v)} | held-out explained variance of the first {k.rsplit('_', 1)[1]} latents alone "
              f"(a Matryoshka prefix; higher is better) |" for k, v in figs.items() if k.startswith("explained_variance_prefix_")]
    if not data.evaluation:
        lines += ["", EVAL_HINT.format(run_dir)]
    layout.report_md.write_text("\n".join(lines) + "\n")
    return layout.report_md


def report_sweep(sweep_dir: Path) -> Path:
    sweep_dir = Path(sweep_dir)
    layout = SweepLayout(sweep_dir)
    record = _read_json(layout.spec)
    if not record.get("runs"):
        raise CheckpointError(f"{layout.spec} is not a readable sweep record; start the sweep again with `train sweep`")
    runs = [read_run(layout.run(r["run_dir"]).root) for r in record["runs"]]
    keys = varied_keys([r.cfg or rec["config"] for r, rec in zip(runs, record["runs"])])
    for r, rec in zip(runs, record["runs"]):
        r.label = describe(r.cfg or rec["config"], keys)
    plot_sweep_curves(runs, layout.curves_png)
    groups, knobs = [k for k in keys if k not in SPARSITY_KEYS], [k for k in keys if k in SPARSITY_KEYS]
    missing_ce = [r.name for r in runs if "ce_loss_score" not in figures(r)]
    drew_frontier = plot_frontier(runs, [describe(r.cfg, groups) if groups else "" for r in runs],
                                  [describe(r.cfg, knobs) if knobs else r.label for r in runs], layout.frontier_png,
                                  note=EVAL_HINT.format("SWEEP/RUN") + f" Not evaluated yet: {len(missing_ce)} of "
                                  f"{len(runs)} SAEs." if missing_ce else None)
    for r in runs:
        if read_metrics(layout.run(r.name).root):
            report_run(layout.run(r.name).root)

    cols = ["explained_variance", "l0", "never_fired_fraction", "ce_loss_score", "kl_div_score"]
    lines = [f"# {record.get('name', sweep_dir.name)}", "", f"![training curves]({layout.curves_png.name})", ""]
    if drew_frontier:
        lines += [f"![L0 against {' and '.join(drew_frontier)}]({layout.frontier_png.name})", ""]
    lines += ["| SAE | " + " | ".join([*keys, *cols]) + " |", "| --- |" + " --- |" * (len(keys) + len(cols))]
    for r in runs:
        f = figures(r)
        varied = [str((r.cfg or {}).get(k, "")) for k in keys]
        lines.append(f"| [{r.name}]({r.name}/{layout.run(r.name).report_md.name}) | "
                     + " | ".join([*varied, *(_fmt(f.get(c)) for c in cols)]) + " |")
    lines += ["", *(f"* `{k}`: {meaning}" for k, meaning in TABLE if k in cols)]
    if missing_ce:
        lines += ["", EVAL_HINT.format(f"{sweep_dir}/RUN") + f" Not evaluated yet: {len(missing_ce)} of {len(runs)} SAEs."]
    layout.report_md.write_text("\n".join(lines) + "\n")
    return layout.report_md


def write_report(path: str | Path) -> Path:
    """Report for a run folder or a sweep folder; returns the Markdown summary's path."""
    path = Path(path)
    if SweepLayout.is_sweep(path):
        return report_sweep(path)
    if is_checkpoint_dir(path):
        path = RunLayout.of_checkpoint(path).root
    return report_run(path)
