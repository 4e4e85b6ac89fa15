"""The one streamed pass of `train inspect`: cache rows -> the run's normalised space -> the SAE's
encoder -> LatentCollector.

Rows are read shard by shard in cache order, in batches of whole contexts (about `batch_rows`
rows; a context longer than that is a batch of its own), so every example's window lies inside
its batch and its neighbours' activations come from the same encoder call. Rows the run's
mask leaves out (train.row_mask: position 0 under drop_bos, masked token ids, norm outliers) are
skipped (they count nowhere; their tokens still show in the windows, unshaded). `max_rows` stops
the pass after that many encoded rows.
Activations are converted as the training store converts them: storage dtype -> float32, times
the run's scaling factor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from shared.cache import Cache
from train.inspector.collect import MASK32, LatentCollector, LatentStats
from train.inspector.contexts import context_starts, window_rows
from train.row_mask import RowMask
from train.window_reader import as_mask, kept_rows


@dataclass
class Batch:
    """x [B, d] float32 (scaled, on the device), rows [B] int64 global rows, window [B, W] int64 (rows
    of x, -1 where not encoded)."""

    x: Tensor
    rows: Tensor
    window: Tensor


def batches(cache: Cache, site: str, shards: list[int], *, scale: float, mask: RowMask | bool, before: int, after: int,
            batch_rows: int = 1024, max_rows: int | None = None, device: torch.device | str = "cpu") -> Iterator[Batch]:
    """Batches of the given shards' rows (see the module docstring). mask: the run's RowMask (a
    bool: RowMask(drop_bos=that))."""
    mask = as_mask(mask)
    if cache.spec.planned_rows > MASK32:
        raise ValueError(f"{cache.where}: rows are numbered up to {cache.spec.planned_rows}; inspect supports < 2^32")
    rps = cache.spec.rows_per_shard
    left = max_rows
    for k in shards:
        if left is not None and left <= 0:
            return
        pos = cache.read_vector("positions", k).astype(np.int64)
        acts = cache.read_acts(site, k)
        n = len(pos)
        starts = np.append(np.flatnonzero(context_starts(pos)), n)  # context starts, and the end
        win = window_rows(pos, np.arange(n), before, after)
        keep = mask.shard_keep(cache, k, acts if mask.norm_site == site else None)
        a = 0
        while a < n and (left is None or left > 0):
            # end at the last context start within a + batch_rows, else (a longer context) at the next one
            j = int(np.searchsorted(starts, a + batch_rows, side="right"))
            b = int(starts[j - 1]) if starts[j - 1] > a else int(starts[j])
            local = np.flatnonzero(keep[a:b])
            if left is not None:
                local = local[:left]
                left -= len(local)
            if len(local):
                index = np.full(b - a, -1, dtype=np.int64)
                index[local] = np.arange(len(local))
                w = win[a + local] - a  # window rows relative to a (or negative where outside)
                w = np.where(w >= 0, index[np.clip(w, 0, b - a - 1)], -1)
                raw = _torch_rows(acts[a:b][local])
                x = raw.to(device=device, dtype=torch.float32)
                if scale != 1.0:
                    x.mul_(scale)
                yield Batch(x, torch.from_numpy(k * rps + a + local), torch.from_numpy(w))
            a = b
        del acts


def _torch_rows(a: np.ndarray) -> Tensor:
    """A CPU tensor of storage-dtype rows (bfloat16 arrays are ml_dtypes: viewed through int16)."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@dataclass
class PassReport:
    rows: int
    seconds: float
    encode_seconds: float


@torch.no_grad()
def collect_stats(encode: Callable[[Tensor], Tensor], d_sae: int, cache: Cache, site: str, shards: list[int], *,
                  scale: float, mask: RowMask | bool, before: int = 16, after: int = 4, top: int = 20, bands: int = 8,
                  per_band: int = 3, bins: int = 64, batch_rows: int = 1024, max_rows: int | None = None,
                  device: torch.device | str = "cpu", progress: bool = False) -> tuple[LatentStats, PassReport]:
    """Stream the shards through `encode` (x [B, d] -> f [B, d_sae]) into a LatentCollector."""
    from tqdm import tqdm

    collector = LatentCollector(d_sae, before + after + 1, before, top=top, bands=bands, per_band=per_band,
                                bins=bins, device=device)
    mask = as_mask(mask)
    total = sum(kept_rows(cache, k, mask) for k in shards)
    total = total if max_rows is None else min(total, max_rows)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="inspect", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    t_enc = 0.0
    try:
        for batch in batches(cache, site, shards, scale=scale, mask=mask, before=before, after=after,
                             batch_rows=batch_rows, max_rows=max_rows, device=device):
            t1 = time.perf_counter()
            f = encode(batch.x)
            if f.device.type == "cuda":
                torch.cuda.synchronize(f.device)
            t_enc += time.perf_counter() - t1
            collector.update(f, batch.rows, batch.window)
            bar.update(len(batch.rows))
    finally:
        bar.close()
    return collector.result(), PassReport(collector.rows_seen, time.perf_counter() - t0, t_enc)
