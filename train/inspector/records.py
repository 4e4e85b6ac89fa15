"""The browser's data: a pass's LatentStats, token windows, logit effects and neighbours shaped
into JSON-ready records (lists and numbers only; NaN becomes null).

Index (one entry per latent, columnar): freq, count, max, mean, top (token id at the max
activation, -1 if it never fired), toks (distinct token ids at its top examples, most active
first, at most 8), promotes (its 3 most promoted token ids, when logits were computed).

Latent record (the per-latent panel):

    {"id", "count", "freq", "max", "mean",
     "top":   [example, ...]                  most active first
     "bands": [{"lo", "hi", "n", "ex": [example, ...]}, ...]   sampled examples per activation band
     "hist":  {"width", "counts"}             bin i covers [i, i + 1) * width (trailing zeros cut)
     "pos", "neg": [[token id, logit effect], ...]  (absent without a model)
     "near":  [[latent id, decoder cosine], ...]}

    example = [row, position, activation, center, tokens, acts]: the global cache row, its
    position in its context, its activation, the index of its token in `tokens` (the window's
    token ids inside the context), and `acts` (this latent's activation on each of those tokens;
    null where the token was not encoded, e.g. position 0 under drop_bos).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from train.inspector.collect import LatentStats
from train.inspector.contexts import Windows

INDEX_TOKENS = 8  # distinct top-example tokens per latent in the index (for the search box)
INDEX_PROMOTES = 3


def _num(x: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for display (None for NaN / inf)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def example(row: int, value: float, window_acts: np.ndarray, windows: Windows, before: int) -> list[Any]:
    i = int(np.searchsorted(windows.rows, row))
    tokens = windows.tokens[i]
    inside = np.flatnonzero(tokens >= 0)
    acts = [_num(a) for a in window_acts[inside]]
    return [int(row), int(windows.positions[i]), _num(value), int(before - inside[0]), tokens[inside].tolist(), acts]


def example_rows(stats: LatentStats) -> np.ndarray:
    """Every global row some latent keeps as an example (unique)."""
    rows = np.concatenate([stats.top_rows.ravel(), stats.sample_rows.ravel()])
    return np.unique(rows[rows >= 0])


def latent_record(j: int, stats: LatentStats, windows: Windows, logits=None, near=None) -> dict[str, Any]:
    """The panel data of latent j. logits: TopTokens (or None); near: (ids [m, k], cos [m, k])."""
    before = stats.before
    count = int(stats.count[j])
    rec: dict[str, Any] = {"id": j, "count": count, "freq": float(stats.frequency[j]),
                           "max": _num(stats.max_value[j], 6), "mean": _num(stats.mean_when_firing[j], 6)}
    n_top = int((stats.top_rows[j] >= 0).sum())
    rec["top"] = [example(stats.top_rows[j, i], stats.top_values[j, i], stats.top_windows[j, i], windows, before)
                  for i in range(n_top)]
    rec["bands"] = []
    if count:
        width = 2.0 ** int(stats.hist_exp[j])
        counts = stats.hist[j]
        used = int(np.flatnonzero(counts)[-1]) + 1
        rec["hist"] = {"width": width, "counts": counts[:used].tolist()}
        edges = stats.band_edges(j)
        per = stats.n_bins // stats.sample_rows.shape[1]
        for q in range(stats.sample_rows.shape[1]):
            n_band = int(counts[q * per : (q + 1) * per].sum())
            rows = stats.sample_rows[j, q]
            ex = [example(rows[i], stats.sample_values[j, q, i], stats.sample_windows[j, q, i], windows, before)
                  for i in range(len(rows)) if rows[i] >= 0]
            if n_band:
                rec["bands"].append({"lo": float(edges[q]), "hi": float(edges[q + 1]), "n": n_band, "ex": ex})
    if logits is not None:
        rec["pos"] = [[int(t), _num(v)] for t, v in zip(logits.pos_ids[j].tolist(), logits.pos_values[j].tolist())]
        rec["neg"] = [[int(t), _num(v)] for t, v in zip(logits.neg_ids[j].tolist(), logits.neg_values[j].tolist())]
    if near is not None:
        rec["near"] = [[int(i), _num(c)] for i, c in zip(near[0][j].tolist(), near[1][j].tolist())]
    return rec


def index_columns(stats: LatentStats, windows: Windows, logits=None) -> dict[str, list]:
    """The index's columns (see the module docstring)."""
    m = stats.d_sae
    top_tok = np.full(m, -1, dtype=np.int64)
    fired = stats.top_rows[:, 0] >= 0
    centers = np.full(stats.top_rows.shape, -1, dtype=np.int64)
    valid = stats.top_rows >= 0
    idx = np.searchsorted(windows.rows, stats.top_rows[valid])
    centers[valid] = windows.tokens[idx, stats.before]
    top_tok[fired] = centers[fired, 0]
    toks = []
    for row in centers.tolist():
        seen: list[int] = []
        for t in row:
            if t >= 0 and t not in seen:
                seen.append(t)
                if len(seen) == INDEX_TOKENS:
                    break
        toks.append(seen)
    cols = {"freq": [_num(f) for f in stats.frequency.tolist()], "count": stats.count.tolist(),
            "max": [_num(v) for v in stats.max_value.tolist()],
            "mean": [_num(v) for v in stats.mean_when_firing.tolist()], "top": top_tok.tolist(), "toks": toks}
    if logits is not None:
        cols["promotes"] = logits.pos_ids[:, :INDEX_PROMOTES].tolist()
    return cols
