"""The figures of `train report` (train.report gathers what they draw into RunData).

Axes are for reading: token counts as 50k / 1.2M, log axes labelled 16 / 32 / 64 or 50 / 100 / 200
(never 2x10^1), sweeps labelled by what their grid varies (k=16), and a panel is drawn only when it
carries information (a value that never changes, like TopK's L0, is said in the title instead).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

if TYPE_CHECKING:
    from train.report import RunData

DPI = 110
PANEL = (5.2, 4.0)  # inches per panel


def tokens_label(v: float, _pos: Any = None) -> str:
    """A token count for an axis: 0, 500, 50k, 1.2M, 3G."""
    for unit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= unit:
            return f"{v / unit:.3g}{suffix}"
    return f"{v:.0f}"


def _token_axis(ax) -> None:
    hi = ax.dataLim.intervalx[1]  # from 0: a run with few logged points still shows where they are
    ax.set_xlim(0, hi * 1.05 if 0 < hi < float("inf") else None)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(tokens_label))
    ax.set_xlabel("training tokens")


def log_ticks(lo: float, hi: float, powers_of_two: bool = False) -> list[float]:
    """Ticks for a log axis over [lo, hi] with plain labels: powers of two (L0: 16, 32, 64), else
    1-2-5 steps (50, 100, 200), finer when the range holds fewer than two of them."""
    lo, hi = max(lo, 1e-12), max(hi, 1e-12)
    if powers_of_two:
        ticks = [2.0**i for i in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        return [t for t in ticks if lo / 1.5 <= t <= hi * 1.5] or [lo]
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in decades for m in steps if lo / 1.02 <= m * 10.0**e <= hi * 1.02]
        if len(ticks) >= 2:
            return ticks
    if hi <= lo:
        return [float(f"{lo:.2g}")]
    # a range narrower than 1 -> 2 (a loss from 8.64 to 9.59): round linear steps (8.8, 9.2, 9.6)
    ticks = [float(f"{t:.6g}") for t in MaxNLocator(nbins=4, steps=[1, 2, 5, 10]).tick_values(lo, hi)]
    return [t for t in ticks if lo / 1.02 <= t <= hi * 1.02]


def _log_axis(axis, values: list[float], powers_of_two: bool = False) -> None:
    """Log scale on `axis` (ax.xaxis / ax.yaxis) with log_ticks' plain labels and no minor labels."""
    ticks = log_ticks(min(values), max(values), powers_of_two)
    (axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale)("log")
    axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    axis.set_minor_locator(NullLocator())


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters that never break inside a `command` in backticks."""
    parts = text.split("`")
    kept = "`".join(p.replace(" ", "\u00a0") if i % 2 else p for i, p in enumerate(parts))  # NBSP: not split
    return [line.replace("\u00a0", " ") for line in textwrap.wrap(kept, width=width)]


def _constant(*series: list[tuple[int, float]]) -> float | None:
    """The one value every point of `series` has, or None when they vary (or are empty)."""
    values = {round(v, 6) for s in series for _, v in s}
    return values.pop() if len(values) == 1 else None


def _xy(series: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [t for t, _ in series], [v for _, v in series]


def _line(series: list[tuple[int, float]]) -> str:
    """A line, with its points marked when there are few (a short run logs one or two: no line to see)."""
    return ".-" if len(series) <= 5 else "-"


def _ev_limits(ax, values: list[float]) -> None:
    """Keep an explained-variance axis readable when early batches are far below 0: cut at -1."""
    if values and min(values) < -1:
        ax.set_ylim(-1, max(1.0, max(values)) + 0.02)
        ax.text(0.02, 0.02, "axis cut at -1", transform=ax.transAxes, fontsize=8, color="0.4")


def _density(ax, hist: dict[str, Any], source: str) -> None:
    edges, counts = hist["edges"], hist["counts"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="white")
    used = [i for i, c in enumerate(counts) if c]
    if used:  # the bins in use, and the 1e-5 line
        ax.set_xlim(min(edges[max(used[0] - 1, 0)], -5.5), edges[min(used[-1] + 2, len(edges) - 1)])
    ax.axvline(-5, color="tab:red", ls="--", lw=1, label=f"{hist.get('below_1e-5', '?')} latents below 1e-5")
    if counts and counts[0] and edges[0] <= -9.99:  # the lowest bin holds the latents that never fired
        tall = counts[0] > 0.5 * max(counts)  # the label goes down from a tall bar's top, up from a low one's
        ax.annotate(f"{counts[0]} never\nfired", (edges[0] + widths[0], counts[0]), xytext=(4, -2 if tall else 2),
                    textcoords="offset points", va="top" if tall else "bottom", fontsize=8)
    ax.set_title(f"Feature density\n{source}", fontsize=10)
    ax.set(xlabel="log10(fraction of tokens a latent fires on)", ylabel="latents")
    ax.legend(fontsize=8, loc="upper center")  # clear of the never-fired bar (left) and the bulk (right)


def _facts(data: RunData) -> str:
    cfg = data.cfg
    parts = [str(cfg.get("arch", ""))]
    if cfg.get("arch") in ("topk", "batchtopk") and cfg.get("k"):
        parts.append(f"k={cfg['k']}")
    if cfg.get("dict_size"):
        parts.append(f"{cfg['dict_size']:,} latents")
    if data.final.get("tokens"):
        parts.append(f"{tokens_label(data.final['tokens'])} tokens")
    return ", ".join(p for p in parts if p)


def plot_run(data: RunData, png: Path) -> list[str]:
    """report.png of one run; returns what its panels show (for the Markdown caption)."""
    panels: list[tuple[str, Any]] = []
    notes = []
    loss = data.train.get("loss", [])
    if len(loss) >= 2:
        panels.append(("training loss", lambda ax: _loss(ax, [data])))
    elif loss:  # one logged point (a run of under 2 x log_every steps): a panel would show a lone dot
        notes.append(f"training loss {loss[0][1]:.4g} at {tokens_label(loss[0][0])} tokens (logged once)")
    panels.append(("explained variance (training batches and held-out)", lambda ax: _ev(ax, [data], single=True)))
    threshold = data.cfg.get("dead_tokens_threshold")
    dead = f"dead latents (unfired for {tokens_label(threshold)} tokens)" if threshold else "dead latents"
    for key, title, fmt in (("l0", "L0 (active latents per token)", "{:.4g}"), ("dead_fraction", dead, "{:.1%}")):
        value = _constant(data.train.get(key, []))  # fixed in training (TopK's L0 = k): said, not drawn
        if value is not None:
            held = data.final.get(key)
            later = f" (held-out at the end: {fmt.format(held)})" if held is not None and round(held, 6) != value else ""
            name = title if key == "dead_fraction" else title.split(" (")[0]  # dead: by what measure
            notes.append(f"{name} = {fmt.format(value)} throughout training{later}")
        elif data.train.get(key) or data.heldout.get(key):
            panels.append((title, lambda ax, key=key, title=title: _series(ax, [data], key, title, single=True)))
    if data.density is not None:
        panels.append((f"feature density ({data.density[1]})", lambda ax: _density(ax, *data.density)))
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL[0] * len(panels), PANEL[1] + 0.4), squeeze=False)
    for ax, (_, draw) in zip(axes[0], panels):
        draw(ax)
        ax.grid(alpha=0.3)
    facts = _facts(data) + (f"; {'; '.join(notes)} (not drawn)" if notes else "")
    fig.suptitle("\n".join([data.name, *_wrap(facts, int(11 * PANEL[0] * len(panels)))]), fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    plt.close(fig)
    return [title for title, _ in panels]


def _colors(n: int) -> list[Any]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _loss(ax, runs: list[RunData]) -> None:
    values = []
    for run, color in zip(runs, _colors(len(runs))):
        t, v = _xy(run.train.get("loss", []))
        ax.plot(t, v, _line(run.train.get("loss", [])), color=color, ms=8, label=run.label)
        values += [x for x in v if x > 0]
    if values:
        _log_axis(ax.yaxis, values)
    ax.set(title="Training loss", ylabel="loss (MSE + sparsity + aux)")
    _token_axis(ax)


def _ev(ax, runs: list[RunData], single: bool = False) -> None:
    values = []
    for run, color in zip(runs, _colors(len(runs))):
        t, v = _xy(run.train.get("explained_variance", []))
        ax.plot(t, v, _line(run.train.get("explained_variance", [])), color=color, ms=8, alpha=0.45 if single else 0.8, lw=1.2, label="training batches" if single else run.label)
        th, vh = _xy(run.heldout.get("explained_variance", []))
        ax.plot(th, vh, "o-" if single else "o", color="black" if single else color, ms=5, lw=1.5,
                label="held-out rows" if single else None)
        values += v + vh
        ev = run.evaluation.get("explained_variance")
        if single and ev is not None and run.evaluation.get("tokens"):
            ax.plot([run.evaluation["tokens"]], [ev], "D", mfc="none", mec="tab:orange", mew=1.5, ms=10,
                    label="`train eval`")
    _ev_limits(ax, values)
    ax.set(title="Explained variance", ylabel="explained variance (1 = perfect)")
    _token_axis(ax)
    if single:
        ax.legend(fontsize=8, loc="lower right")


def _series(ax, runs: list[RunData], key: str, title: str, single: bool = False) -> None:
    for run, color in zip(runs, _colors(len(runs))):
        t, v = _xy(run.train.get(key, []))
        ax.plot(t, v, _line(run.train.get(key, [])), color=color, ms=8, alpha=0.6 if single else 0.8, label="training batches" if single else run.label)
        th, vh = _xy(run.heldout.get(key, []))
        if vh:
            ax.plot(th, vh, "o-" if single else "o", color="black" if single else color, ms=5,
                    label="held-out rows" if single else None)
    ax.set(title=title[0].upper() + title[1:], ylabel=title.split(" (")[0])
    if key == "dead_fraction":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
    _token_axis(ax)
    if single:
        ax.legend(fontsize=8)


def plot_sweep_curves(runs: list[RunData], png: Path) -> None:
    """curves.png: loss and explained variance of every SAE (and L0 / dead latents where some vary)."""
    panels = [lambda ax: _loss(ax, runs), lambda ax: _ev(ax, runs)]
    for key, title in (("l0", "L0 (active latents per token)"), ("dead_fraction", "dead latents")):
        if any(_constant(r.train.get(key, [])) is None and r.train.get(key) for r in runs):  # else: set by the grid
            panels.append(lambda ax, key=key, title=title: _series(ax, runs, key, title))
    fig, axes = plt.subplots(1, len(panels), figsize=(PANEL[0] * len(panels), PANEL[1] + 0.6), squeeze=False)
    for ax, draw in zip(axes[0], panels):
        draw(ax)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9, frameon=False)
    fig.suptitle("Training curves (lines: training batches; dots: held-out evaluations)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * (len(labels) // 7), 1, 1))
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def plot_frontier(runs: list[RunData], groups: list[str], point_labels: list[str], png: Path,
                  note: str | None = None) -> list[str]:
    """frontier.png: held-out L0 against explained variance (and CE-loss score when evaluated), one
    line per group (what varies besides the sparsity), its points labelled; returns what its panels
    show ([] when there is nothing to draw)."""
    from train.report import figures

    figs = [figures(r) for r in runs]
    keys = [("explained_variance", "explained variance (held-out)")]
    if any("ce_loss_score" in f for f in figs):
        keys.append(("ce_loss_score", "CE-loss score (`train eval`)"))
    if not any("l0" in f and keys[0][0] in f for f in figs):
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 5.0 + (0.4 if note else 0)), squeeze=False)
    names = list(dict.fromkeys(groups))
    colors = dict(zip(names, _colors(len(names))))
    for ax, (key, title) in zip(axes[0], keys):
        l0s = []
        for name in names:
            pts = sorted((f["l0"], f[key], lab) for f, g, lab in zip(figs, groups, point_labels)
                         if g == name and "l0" in f and key in f)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[name], ms=6, label=name or None)
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
            l0s += [p[0] for p in pts]
        if l0s and min(l0s) > 0:
            _log_axis(ax.xaxis, l0s, powers_of_two=True)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outer points
        ax.set(title=f"L0 against {title}", xlabel="L0 (held-out, active latents per token)", ylabel=title)
        ax.grid(alpha=0.3)
        if any(names):
            ax.legend(fontsize=8)
    lines = _wrap(note, width=int(95 * len(keys))) if note else []
    if lines:
        fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.35")
    fig.tight_layout(rect=(0, 0.03 + 0.03 * len(lines), 1, 1))
    fig.savefig(png, dpi=DPI)
    plt.close(fig)
    return [title for _, title in keys]
