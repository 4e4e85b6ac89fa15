"""The browser's data: a pass's LatentStats, token windows, logit effects and neighbours shaped
into JSON-ready records (lists and numbers only).

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

    example = [row, position, activation, center, tokens, shades]: the global cache row, its
    position in its context, its activation (4 significant digits), the index of its token in
    `tokens` (the window's token ids inside the context) and `shades`: this latent's activation on
    each of those tokens in thousandths of the latent's max activation (0..1000), -1 where the token
    was not encoded (e.g. position 0 under drop_bos).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from train.inspector.collect import LatentStats
from train.inspector.contexts import Windows

INDEX_TOKENS = 8  # distinct top-example tokens per latent in the index (for the search box)
INDEX_PROMOTES = 3
SHADE_SCALE = 1000  # shades are activation / max activation in these units


def _num(x: float, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits for display (None for NaN / inf)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


class Records:
    """Builds the index and the latent records of one pass (figures computed once, not per latent).

    logits: TopTokens or None; near: (ids [m, k], cosines [m, k]) or None."""

    def __init__(self, stats: LatentStats, windows: Windows, logits=None, near=None):
        self.stats, self.windows, self.logits, self.near = stats, windows, logits, near
        self.freq = stats.frequency
        self.mean = stats.mean_when_firing
        self.max = stats.max_value
        self.per_band = stats.n_bins // max(stats.sample_rows.shape[1], 1)

    def _examples(self, js: range, rows: np.ndarray, values: np.ndarray, acts: np.ndarray) -> list[list]:
        """Examples of latents js, vectorised over all their slots: rows [c, E] (-1 = empty), values
        [c, E], acts [c, E, W] (NaN = not encoded). Returns [c][E] examples (None for empty slots)."""
        w = self.windows
        valid = rows >= 0
        if not valid.any():
            return [[None] * rows.shape[1] for _ in js]
        i = np.searchsorted(w.rows, np.where(valid, rows, w.rows[0]))
        tokens = w.tokens[i]
        inside = tokens >= 0
        lead, length = inside.argmax(-1), inside.sum(-1)
        peak = self.max[js.start : js.stop].astype(np.float64)
        peak = np.where(peak > 0, peak, 1.0)[:, None, None]
        shades = np.rint(np.clip(np.nan_to_num(acts) / peak, 0, 1) * SHADE_SCALE).astype(np.int64)
        shades[np.isnan(acts)] = -1
        positions = w.positions[i]
        out = []
        for r_row, p_row, v_row, a_row, n_row, t_row, s_row, ok in zip(
                rows.tolist(), positions.tolist(), values.tolist(), lead.tolist(), length.tolist(),
                tokens.tolist(), shades.tolist(), valid.tolist()):
            out.append([[g, p, _num(v), self.stats.before - a, t[a : a + n], sh[a : a + n]] if k else None
                        for g, p, v, a, n, t, sh, k in zip(r_row, p_row, v_row, a_row, n_row, t_row, s_row, ok)])
        return out

    def latents(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The panel data of latents start .. stop - 1."""
        s, js = self.stats, range(start, stop)
        c, K = stop - start, s.top_rows.shape[1]
        Q, S = s.sample_rows.shape[1], s.sample_rows.shape[2]
        ex = self._examples(js, np.concatenate([s.top_rows[start:stop], s.sample_rows[start:stop].reshape(c, Q * S)], 1),
                            np.concatenate([s.top_values[start:stop], s.sample_values[start:stop].reshape(c, Q * S)], 1),
                            np.concatenate([s.top_windows[start:stop],
                                            s.sample_windows[start:stop].reshape(c, Q * S, -1)], 1))
        return [self._latent(j, ex[j - start][:K], ex[j - start][K:]) for j in js]

    def _latent(self, j: int, top: list, samples: list) -> dict[str, Any]:
        s = self.stats
        count = int(s.count[j])
        rec: dict[str, Any] = {"id": j, "count": count, "freq": float(self.freq[j]), "max": _num(self.max[j], 6),
                               "mean": _num(self.mean[j], 6), "top": [e for e in top if e is not None], "bands": []}
        if count:
            counts = s.hist[j]
            used = int(np.flatnonzero(counts)[-1]) + 1
            rec["hist"] = {"width": 2.0 ** int(s.hist_exp[j]), "counts": counts[:used].tolist()}
            edges = s.band_edges(j)
            S = s.sample_rows.shape[2]
            for q in range(s.sample_rows.shape[1]):
                n_band = int(counts[q * self.per_band : (q + 1) * self.per_band].sum())
                if n_band:
                    rec["bands"].append({"lo": float(edges[q]), "hi": float(edges[q + 1]), "n": n_band,
                                         "ex": [e for e in samples[q * S : (q + 1) * S] if e is not None]})
        if self.logits is not None:
            lg = self.logits
            rec["pos"] = [[t, _num(v)] for t, v in zip(lg.pos_ids[j].tolist(), lg.pos_values[j].tolist())]
            rec["neg"] = [[t, _num(v)] for t, v in zip(lg.neg_ids[j].tolist(), lg.neg_values[j].tolist())]
        if self.near is not None:
            rec["near"] = [[i, _num(c)] for i, c in zip(self.near[0][j].tolist(), self.near[1][j].tolist())]
        return rec

    def index(self) -> dict[str, list]:
        """The index's columns (see the module docstring)."""
        s, w = self.stats, self.windows
        centers = np.full(s.top_rows.shape, -1, dtype=np.int64)
        valid = s.top_rows >= 0
        centers[valid] = w.tokens[np.searchsorted(w.rows, s.top_rows[valid]), s.before]
        toks = []
        for row in centers.tolist():
            seen: list[int] = []
            for t in row:
                if t >= 0 and t not in seen:
                    seen.append(t)
                    if len(seen) == INDEX_TOKENS:
                        break
            toks.append(seen)
        cols = {"freq": [_num(f) for f in self.freq.tolist()], "count": s.count.tolist(),
                "max": [_num(v) for v in self.max.tolist()], "mean": [_num(v) for v in self.mean.tolist()],
                "top": centers[:, 0].tolist(), "toks": toks}
        if self.logits is not None:
            cols["promotes"] = self.logits.pos_ids[:, :INDEX_PROMOTES].tolist()
        return cols


def example_rows(stats: LatentStats) -> np.ndarray:
    """Every global row some latent keeps as an example (unique)."""
    rows = np.concatenate([stats.top_rows.ravel(), stats.sample_rows.ravel()])
    return np.unique(rows[rows >= 0])
