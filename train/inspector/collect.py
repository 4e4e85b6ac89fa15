"""Per-latent statistics of one streamed pass over SAE latents: pure torch, no I/O.

`LatentCollector.update(f, rows, window)` takes one batch:

    f       [B, m] float32  the SAE's latents of B rows (non-negative; a latent fires where f > 0)
    rows    [B] int64       each row's global cache row (shard * rows_per_shard + row in shard), < 2^32
    window  [B, W] int64    for each row, the rows of f that lie at offsets -before..+after of it in
                            its context (W = before + after + 1, the row itself at slot `before`);
                            -1 where that token was not encoded in this batch (outside the context,
                            or a row the pass skipped, e.g. position 0 under drop_bos)

and keeps, per latent j (m latents; K = top, Q = bands, S = per_band, NB = bins):

    count[j]      rows on which j fired;  total[j]: sum of its activations there (float64)
    top           the K firings of j with the largest activation, ties broken by the smaller row:
                  exact, whatever the batching (an int64 key (float bits << 32) | (2^32 - 1 - row)
                  orders them totally)
    histogram     NB bins of width 2^e[j] over [0, NB 2^e[j]), e[j] the smallest integer with
                  max activation < NB 2^e[j]. While streaming, e[j] only grows; each increase merges
                  bins in aligned groups of 2^delta, so the counts equal a one-shot histogram with the
                  final edges. Bin of a value v: floor(v / 2^e) (exact: a power-of-two division)
    samples       Q value bands of NB / Q consecutive bins each (so band q = [q, q + 1) * NB 2^e / Q);
                  in each, the S firings with the smallest `sample_priority(row, j)` (a fixed
                  pseudo-random bijection of the row): a uniform sample without replacement of the
                  band's firings ("bottom-S sampling"), exact and mergeable when bands merge
    windows       for every kept example, j's activation on the W tokens of its window (NaN where
                  not encoded), taken from the batch when the example is admitted

Memory, independent of the number of rows streamed (float32 = 4 bytes):

    m * (K * (8 + 4 W) + Q * S * (8 + 8 + 4 + 4 W) + NB * 8 + 24) bytes
    (m = 24,576, K = 20, Q = 8, S = 3, W = 21, NB = 64: about 120 MB)

plus per-batch temporaries of O(B m) (the batch's latents) and O(nnz + m K) for the selection.
Each batch costs one pass over f (nonzero) and sorts of the batch's candidate firings; no Python
loop runs over latents or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MASK32 = (1 << 32) - 1
_NO_EXP = -(1 << 20)  # histogram exponent of a latent that has not fired yet
_EMPTY_PRIO = 1 << 32  # priority of an empty sample slot (every real priority is smaller)


def sample_priority(rows: Tensor, latents: Tensor) -> Tensor:
    """Pseudo-random priority in [0, 2^32) of the firing (row, latent); int64 in, int64 out.

    For a fixed latent it is a bijection of the row (xor with a latent constant, then odd
    multiplications mod 2^32 and xor-shifts), so two rows never tie. Constants < 2^31 keep every
    product below 2^63."""
    x = (rows ^ ((latents * 0x2545F491) & MASK32)) & MASK32
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x119DE1F3) & MASK32
    return x ^ (x >> 16)


def rank_in_group(groups: Tensor, keys: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """Order entries by (group ascending, key descending or ascending).

    groups, keys: [n] int64. Returns (order [n], rank [n]): entry order[i] is the rank[i]-th of its
    group. Keys are assumed distinct within a group."""
    by_key = torch.sort(keys, descending=descending, stable=True).indices
    order = by_key[torch.sort(groups[by_key], stable=True).indices]
    g = groups[order]
    idx = torch.arange(len(g), device=g.device)
    starts = torch.ones(len(g), dtype=torch.bool, device=g.device)
    starts[1:] = g[1:] != g[:-1]
    first = torch.cummax(torch.where(starts, idx, 0), 0).values
    return order, idx - first


@dataclass
class LatentStats:
    """What a pass kept (numpy, on the host). m latents; -1 rows mark empty slots.

    rows_seen: rows encoded. count [m] int64, total [m] float64.
    top_rows [m, K] int64, top_values [m, K] float32, top_windows [m, K, W] float32, sorted by
    activation descending (then row ascending). hist [m, NB] int64, hist_exp [m] int64 (bin width
    2^hist_exp; meaningless where count == 0). sample_rows [m, Q, S], sample_values [m, Q, S],
    sample_windows [m, Q, S, W]: per band, by ascending sample priority. before: window slot of
    the example itself.
    """

    rows_seen: int
    before: int
    count: np.ndarray
    total: np.ndarray
    top_rows: np.ndarray
    top_values: np.ndarray
    top_windows: np.ndarray
    hist: np.ndarray
    hist_exp: np.ndarray
    sample_rows: np.ndarray
    sample_values: np.ndarray
    sample_windows: np.ndarray

    @property
    def d_sae(self) -> int:
        return len(self.count)

    @property
    def frequency(self) -> np.ndarray:
        """[m] float64: fraction of the rows seen on which each latent fired."""
        return self.count / max(self.rows_seen, 1)

    @property
    def mean_when_firing(self) -> np.ndarray:
        """[m] float64: mean activation over the rows where it fired (0 where it never did)."""
        return np.divide(self.total, self.count, out=np.zeros(len(self.count)), where=self.count > 0)

    @property
    def max_value(self) -> np.ndarray:
        """[m] float32: largest activation (0 where it never fired)."""
        return np.where(self.top_rows[:, 0] >= 0, self.top_values[:, 0], 0).astype(np.float32)

    @property
    def n_bins(self) -> int:
        return self.hist.shape[1]

    def band_edges(self, j: int) -> np.ndarray:
        """[Q + 1] float64 activation edges of latent j's sample bands."""
        q = self.sample_rows.shape[1]
        return np.arange(q + 1) * (self.n_bins // q) * 2.0 ** int(self.hist_exp[j])


class LatentCollector:
    """Streams batches of latents and keeps LatentStats' figures (see the module docstring)."""

    def __init__(self, d_sae: int, window: int, before: int, *, top: int = 20, bands: int = 8,
                 per_band: int = 3, bins: int = 64, device: torch.device | str = "cpu"):
        if bins < 1 or bins & (bins - 1) or bands < 1 or bands & (bands - 1) or bands > bins:
            raise ValueError(f"bins ({bins}) and bands ({bands}) must be powers of two with bands <= bins")
        if top < 1 or per_band < 0 or not 0 <= before < window:
            raise ValueError(f"need top >= 1, per_band >= 0, 0 <= before < window (got {top}, {per_band}, {before}, {window})")
        dev = torch.device(device)
        self.m, self.W, self.before = d_sae, window, before
        self.K, self.Q, self.S, self.NB = top, bands, per_band, bins
        self._band_shift = (bins // bands).bit_length() - 1  # bin -> band: bin >> shift
        self.rows_seen = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, device=dev)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.top_keys = torch.full((d_sae, top), -1, dtype=torch.long, device=dev)
        self.top_win = torch.full((d_sae, top, window), float("nan"), device=dev)
        self.hist = torch.zeros(d_sae, bins, dtype=torch.long, device=dev)
        self.hist_exp = torch.full((d_sae,), _NO_EXP, dtype=torch.long, device=dev)
        self.s_prio = torch.full((d_sae, bands, per_band), _EMPTY_PRIO, dtype=torch.long, device=dev)
        self.s_rows = torch.full((d_sae, bands, per_band), -1, dtype=torch.long, device=dev)
        self.s_vals = torch.zeros((d_sae, bands, per_band), device=dev)
        self.s_win = torch.full((d_sae, bands, per_band, window), float("nan"), device=dev)

    # ------------------------------------------------------------------ streaming

    @torch.no_grad()
    def update(self, f: Tensor, rows: Tensor, window: Tensor) -> None:
        """Add one batch: f [B, m] float32, rows [B] int64 global rows, window [B, W] int64 (see module)."""
        if f.shape[1] != self.m or window.shape != (f.shape[0], self.W) or rows.shape != (f.shape[0],):
            raise ValueError(f"batch shapes f {tuple(f.shape)}, rows {tuple(rows.shape)}, window "
                             f"{tuple(window.shape)} do not fit m={self.m}, W={self.W}")
        self.rows_seen += f.shape[0]
        r, c = torch.nonzero(f, as_tuple=True)
        if len(r) == 0:
            return
        v = f[r, c]
        g = rows.to(f.device)[r]
        window = window.to(f.device)
        self.count.index_add_(0, c, torch.ones_like(c))
        self.total.index_add_(0, c, v.double())
        delta = self._update_hist(c, v)
        self._update_top(f, window, r, c, g, v)
        if self.S:
            self._update_samples(f, window, r, c, g, v, delta)

    def _windows_of(self, f: Tensor, window: Tensor, r: Tensor, c: Tensor) -> Tensor:
        """[n, W] activations of latent c[i] on the window of batch row r[i] (NaN where not encoded)."""
        idx = window[r]
        vals = f[idx.clamp_min(0), c[:, None]]
        return vals.masked_fill_(idx < 0, float("nan"))

    def _update_hist(self, c: Tensor, v: Tensor) -> Tensor:
        """Grow exponents, merge bins, count the batch. Returns each latent's exponent increase [m]
        (0 for latents that had not fired before)."""
        vmax = torch.zeros(self.m, device=v.device).scatter_reduce_(0, c, v, "amax")
        hit = vmax > 0
        need = torch.frexp(vmax / self.NB).exponent.long()  # smallest e with vmax < NB 2^e
        old = self.hist_exp
        new = torch.where(hit, torch.maximum(old, need), old)
        delta = torch.where(old == _NO_EXP, 0, new - old)
        grown = (delta > 0).nonzero().squeeze(1)
        if len(grown):
            shift = delta[grown].clamp_max(62)[:, None]
            target = torch.arange(self.NB, device=v.device)[None, :] >> shift
            merged = torch.zeros(len(grown), self.NB, dtype=torch.long, device=v.device)
            self.hist[grown] = merged.scatter_add_(1, target, self.hist[grown])
        self.hist_exp = new
        bins = torch.ldexp(v, -new[c]).floor_().long().clamp_(0, self.NB - 1)
        self.hist.view(-1).index_add_(0, c * self.NB + bins, torch.ones_like(bins))
        return delta

    def _update_top(self, f, window, r, c, g, v) -> None:
        key = (v.view(torch.int32).long() << 32) | (MASK32 - g)
        cand = key > self.top_keys[c, -1]
        if not bool(cand.any()):
            return
        r, c, key = r[cand], c[cand], key[cand]
        aff = torch.unique(c)
        K = self.K
        old = self.top_keys[aff]
        valid = old >= 0
        slots = aff[:, None] * K + torch.arange(K, device=f.device)
        n_old = int(valid.sum())
        groups = torch.cat([aff[:, None].expand(-1, K)[valid], c])
        keys = torch.cat([old[valid], key])
        order, rank = rank_in_group(groups, keys, descending=True)
        keep, rank = order[rank < K], rank[rank < K]
        wins = self._gather_windows(self.top_win.view(-1, self.W), slots[valid], keep, n_old, f, window, r, c)
        lat = groups[keep]
        self.top_keys[aff] = -1
        self.top_win[aff] = float("nan")
        self.top_keys[lat, rank] = keys[keep]
        self.top_win[lat, rank] = wins

    def _gather_windows(self, old_windows, old_slots, keep, n_old, f, window, r, c) -> Tensor:
        """Windows [len(keep), W] of the kept entries: old ones from their slots, new ones from f."""
        out = torch.empty(len(keep), self.W, device=f.device)
        from_old = keep < n_old
        out[from_old] = old_windows[old_slots[keep[from_old]]]
        new = keep[~from_old] - n_old
        out[~from_old] = self._windows_of(f, window, r[new], c[new])
        return out

    def _update_samples(self, f, window, r, c, g, v, delta) -> None:
        Q, S = self.Q, self.S
        band = torch.ldexp(v, -self.hist_exp[c]).floor_().long().clamp_(0, self.NB - 1) >> self._band_shift
        prio = sample_priority(g, c)
        regrouped = delta > 0
        cand = (prio < self.s_prio[c, band, -1]) | regrouped[c]
        regrouped_ids = regrouped.nonzero().squeeze(1)
        if not bool(cand.any()) and len(regrouped_ids) == 0:
            return
        r, c, g, v, band, prio = r[cand], c[cand], g[cand], v[cand], band[cand], prio[cand]
        aff = torch.unique(torch.cat([c, regrouped_ids]))
        old_rows = self.s_rows[aff]  # [A, Q, S]
        valid = old_rows >= 0
        A = len(aff)
        q_new = torch.arange(Q, device=f.device)[None, :] >> delta[aff][:, None].clamp_max(62)  # [A, Q]
        old_cell = (aff[:, None] * Q + q_new)[:, :, None].expand(A, Q, S)[valid]
        slots = ((aff[:, None, None] * Q + torch.arange(Q, device=f.device)[None, :, None]) * S
                 + torch.arange(S, device=f.device))[valid]
        n_old = int(valid.sum())
        cells = torch.cat([old_cell, c * Q + band])
        keys = torch.cat([self.s_prio[aff][valid], prio])
        order, rank = rank_in_group(cells, keys, descending=False)
        keep, rank = order[rank < S], rank[rank < S]
        wins = self._gather_windows(self.s_win.view(-1, self.W), slots, keep, n_old, f, window, r, c)
        all_rows = torch.cat([old_rows[valid], g])
        all_vals = torch.cat([self.s_vals[aff][valid], v])
        cell = cells[keep]
        lat, q = cell // Q, cell % Q
        self.s_prio[aff] = _EMPTY_PRIO
        self.s_rows[aff] = -1
        self.s_vals[aff] = 0
        self.s_win[aff] = float("nan")
        self.s_prio[lat, q, rank] = keys[keep]
        self.s_rows[lat, q, rank] = all_rows[keep]
        self.s_vals[lat, q, rank] = all_vals[keep]
        self.s_win[lat, q, rank] = wins

    # ------------------------------------------------------------------ result

    def result(self) -> LatentStats:
        """The figures so far, as numpy arrays on the host."""
        keys = self.top_keys.cpu()
        empty = keys < 0
        top_rows = torch.where(empty, -1, MASK32 - (keys & MASK32))
        top_vals = torch.where(empty, 0, keys >> 32).int().view(torch.float32)
        return LatentStats(
            rows_seen=self.rows_seen, before=self.before,
            count=self.count.cpu().numpy(), total=self.total.cpu().numpy(),
            top_rows=top_rows.numpy(), top_values=top_vals.numpy().copy(), top_windows=self.top_win.cpu().numpy(),
            hist=self.hist.cpu().numpy(), hist_exp=self.hist_exp.cpu().numpy(),
            sample_rows=self.s_rows.cpu().numpy(), sample_values=self.s_vals.cpu().numpy(),
            sample_windows=self.s_win.cpu().numpy(),
        )
