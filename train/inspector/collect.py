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

Both selections are `SortedSlots`: per group (a latent; a (latent, band) cell) the L largest int64
keys, sorted, each position owning a payload slot. A batch's candidates (keys above the group's
L-th) are merged by rank arithmetic (each candidate's rank among the old keys + among the new ones),
without re-sorting what was kept; only admitted entries write their payload (row, value, window).

Memory, independent of the number of rows streamed (float32 = 4 bytes):

    m * (K * (16 + 4 W) + Q * S * (28 + 4 W) + NB * 8 + 32) bytes
    (m = 24,576, K = 20, Q = 8, S = 3, W = 21, NB = 64: about 123 MiB)

plus per-batch temporaries: O(B m) (the batch's latents) and O(nnz + A L) for the merge (nnz: the
batch's firings; A: groups that admit something). Each batch costs one pass over f (nonzero), sorts
of its candidate firings only, and no Python loop over latents or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MASK32 = (1 << 32) - 1
_NO_EXP = -(1 << 20)  # histogram exponent of a latent that has not fired yet


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


class SortedSlots:
    """For each of G groups, the L entries with the largest int64 keys (>= 0; -1 marks an empty
    position), sorted descending. Position p of group g owns payload slot g * L + ptr[g, p], so
    admitting an entry never moves the payloads of the entries kept."""

    def __init__(self, groups: int, length: int, device: torch.device):
        self.G, self.L = groups, length
        self.keys = torch.full((groups, length), -1, dtype=torch.long, device=device)
        self.ptr = torch.arange(length, device=device).repeat(groups, 1)

    def clear(self, groups: Tensor) -> None:
        self.keys[groups] = -1

    def merge(self, g: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Offer entries (group g [n], key [n]; keys distinct within a group). Returns (indices into
        the offered entries that were admitted, their payload slots [n_admitted] flat over G * L)."""
        L, dev = self.L, self.keys.device
        idx = (key > self.keys[g, -1]).nonzero().squeeze(1)
        if len(idx) == 0:
            return idx, idx
        order, rank = rank_in_group(g[idx], key[idx], descending=True)
        idx = idx[order]
        g, key = g[idx], key[idx]
        pos_old = (self.keys[g] > key[:, None]).sum(1)  # old keys above each candidate
        final = pos_old + rank  # its position in the merged order
        adm = final < L
        aff = torch.unique(g[adm])  # sorted groups that admit something
        a = torch.searchsorted(aff, g).clamp_max(len(aff) - 1)
        ours = aff[a] == g
        # old entry s moves down by the number of candidates above it (pos_old <= s)
        above = torch.zeros(len(aff), L + 1, dtype=torch.long, device=dev)
        above.index_put_((a[ours], pos_old[ours].clamp_max(L)), torch.ones_like(a[ours]), accumulate=True)
        new_pos = torch.arange(L, device=dev) + above.cumsum(1)[:, :L]
        old_keys, old_ptr = self.keys[aff], self.ptr[aff]
        kept = (old_keys >= 0) & (new_pos < L)
        rows = torch.arange(len(aff), device=dev)[:, None].expand(-1, L)
        keys = torch.full_like(old_keys, -1)
        ptr = torch.empty_like(old_ptr)
        taken = torch.zeros_like(kept)
        keys[rows[kept], new_pos[kept]] = old_keys[kept]
        ptr[rows[kept], new_pos[kept]] = old_ptr[kept]
        taken[rows[kept], new_pos[kept]] = True
        ptr[~taken] = old_ptr[~kept]  # freed slots, in position order, to the other positions
        keys[a[adm], final[adm]] = key[adm]
        self.keys[aff], self.ptr[aff] = keys, ptr
        return idx[adm], aff[a[adm]] * L + ptr[a[adm], final[adm]]

    def in_order(self, payload: Tensor) -> Tensor:
        """payload [G * L, ...] by slot -> [G, L, ...] by position."""
        flat = (torch.arange(self.G, device=self.ptr.device)[:, None] * self.L + self.ptr).reshape(-1)
        return payload[flat].reshape(self.G, self.L, *payload.shape[1:])


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
        self.hist = torch.zeros(d_sae, bins, dtype=torch.long, device=dev)
        self.hist_exp = torch.full((d_sae,), _NO_EXP, dtype=torch.long, device=dev)
        self.top = SortedSlots(d_sae, top, dev)
        self.top_win = torch.full((d_sae * top, window), float("nan"), device=dev)
        self.samples = SortedSlots(d_sae * bands, max(per_band, 1), dev)
        n = d_sae * bands * max(per_band, 1)
        self.s_rows = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.s_vals = torch.zeros(n, device=dev)
        self.s_win = torch.full((n, window), float("nan"), device=dev)

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
        key = (v.view(torch.int32).long() << 32) | (MASK32 - g)  # activation, then the earlier row
        adm, slot = self.top.merge(c, key)
        self.top_win[slot] = self._windows_of(f, window, r[adm], c[adm])
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

    def _update_samples(self, f, window, r, c, g, v, delta) -> None:
        Q, S, dev = self.Q, self.S, f.device
        # latents whose range grew: their bands merge (q -> q >> delta); re-offer what they kept
        grown = (delta > 0).nonzero().squeeze(1)
        cells = (grown[:, None] * Q + torch.arange(Q, device=dev)).reshape(-1)
        old_keys = self.samples.keys[cells]  # [n_cells, S]
        valid = old_keys >= 0
        old_slots = (cells[:, None] * S + self.samples.ptr[cells])[valid]
        q_new = (torch.arange(Q, device=dev)[None, :] >> delta[grown][:, None].clamp_max(62)).reshape(-1)
        old_cells = (cells - cells % Q + q_new)[:, None].expand(-1, S)[valid]
        old_rows, old_vals, old_win = self.s_rows[old_slots], self.s_vals[old_slots], self.s_win[old_slots]
        self.samples.clear(cells)
        band = torch.ldexp(v, -self.hist_exp[c]).floor_().long().clamp_(0, self.NB - 1) >> self._band_shift
        n_old = len(old_slots)
        adm, slot = self.samples.merge(torch.cat([old_cells, c * Q + band]),
                                       torch.cat([old_keys[valid], MASK32 - sample_priority(g, c)]))
        if len(adm) == 0:
            return
        from_old = adm < n_old
        o, n = adm[from_old], adm[~from_old] - n_old
        self.s_rows[slot[from_old]], self.s_vals[slot[from_old]] = old_rows[o], old_vals[o]
        self.s_win[slot[from_old]] = old_win[o]
        self.s_rows[slot[~from_old]], self.s_vals[slot[~from_old]] = g[n], v[n]
        self.s_win[slot[~from_old]] = self._windows_of(f, window, r[n], c[n])

    # ------------------------------------------------------------------ result

    def result(self) -> LatentStats:
        """The figures so far, as numpy arrays on the host (copies)."""
        keys = self.top.keys.cpu()
        empty = keys < 0
        top_rows = torch.where(empty, -1, MASK32 - (keys & MASK32))
        top_vals = torch.where(empty, 0, keys >> 32).int().view(torch.float32)
        top_win = self.top.in_order(self.top_win).cpu()
        S = max(self.S, 1)
        s_empty = (self.samples.keys < 0).reshape(self.m, self.Q, S).cpu()
        s_rows = self.samples.in_order(self.s_rows).reshape(self.m, self.Q, S).cpu().masked_fill_(s_empty, -1)
        s_vals = self.samples.in_order(self.s_vals).reshape(self.m, self.Q, S).cpu().masked_fill_(s_empty, 0)
        s_win = self.samples.in_order(self.s_win).reshape(self.m, self.Q, S, self.W).cpu()
        s_win[s_empty] = float("nan")
        if not self.S:
            s_rows, s_vals, s_win = s_rows[..., :0], s_vals[..., :0], s_win[..., :0, :]
        return LatentStats(
            rows_seen=self.rows_seen, before=self.before,
            count=self.count.cpu().numpy().copy(), total=self.total.cpu().numpy().copy(),
            top_rows=top_rows.numpy(), top_values=top_vals.numpy().copy(), top_windows=top_win.numpy(),
            hist=self.hist.cpu().numpy().copy(), hist_exp=self.hist_exp.cpu().numpy().copy(),
            sample_rows=s_rows.numpy(), sample_values=s_vals.numpy(), sample_windows=s_win.numpy(),
        )
