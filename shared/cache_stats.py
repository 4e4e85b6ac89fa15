"""Per-site activation statistics: per shard (in each ledger record) and merged (in the seal).

`shard_statistics` sums one shard's rows (count, sum of squared norms, sum vector, max |x|) as
float64 totals of float32 sums over blocks of rows; `merge_statistics` adds shards up into the
mean squared norm, mean vector and norm scaling factor sqrt(d_model / E||x||^2) that training
uses to normalise.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from shared.cache_records import ShardStatistics, SiteStatistics
from shared.cache_storage import numpy_storage_dtype

# Elements per statistics block (about 1M: a few MB of float32, and few enough ops per shard that
# torch's per-call overhead stays small).
_STATS_BLOCK_ELEMENTS = 1 << 20


def shard_statistics(acts: np.ndarray) -> ShardStatistics:
    """Per-site sums over one shard (float64 totals), mergeable across shards.

    acts: [rows, d] in storage dtype. Returns count, sum_sq_norm, sum (list of d), max_abs.
    Works over blocks of rows in float32 (16-bit floats convert exactly): per-block column sums
    and per-row norms in float32, added up in float64. Relative error about 1e-7 (float32 sums
    of at most a block's rows or one row's d squares), at a quarter of the cost of float64
    arithmetic throughout.
    """
    import torch

    rows, d = acts.shape
    if rows == 0 or d == 0:
        return ShardStatistics(count=int(rows), sum_sq_norm=0.0, sum=[0.0] * d, max_abs=0.0)
    if acts.dtype == numpy_storage_dtype("bfloat16"):
        x = torch.from_numpy(acts.view(np.int16)).view(torch.bfloat16)
    else:
        x = torch.from_numpy(acts)
    blocks = x.split(max(1, _STATS_BLOCK_ELEMENTS // d))
    n_blocks = len(blocks)
    sums = torch.empty((n_blocks, d), dtype=torch.float32)  # per block, added up in float64 at the end
    sq_norms = torch.empty(n_blocks, dtype=torch.float64)
    lows = torch.empty(n_blocks, dtype=torch.float32)
    highs = torch.empty(n_blocks, dtype=torch.float32)
    y32 = torch.empty((len(blocks[0]), d), dtype=torch.float32)
    row_norms = torch.empty(len(blocks[0]), dtype=torch.float32)
    for i, block in enumerate(blocks):
        n = len(block)
        if block.dtype == torch.float32:
            y = block
        else:
            y = y32[:n]
            y.copy_(block)  # exact: float16 and bfloat16 fit in float32
        torch.aminmax(y, out=(lows[i], highs[i]))
        torch.sum(y, 0, out=sums[i])
        norms = torch.linalg.vector_norm(y, dim=1, out=row_norms[:n])
        sq_norms[i] = norms.double().square().sum()
    return ShardStatistics(
        count=int(rows),
        sum_sq_norm=float(sq_norms.sum()),
        sum=sums.double().sum(0).tolist(),
        max_abs=float(max(-lows.min(), highs.max())),  # NaN propagates
    )


def merge_statistics(parts: Iterable[ShardStatistics], d_model: int) -> SiteStatistics:
    """Aggregate shard statistics: mean_sq_norm, mean vector, norm scaling factor sqrt(d / E||x||^2)."""
    count, sum_sq, max_abs = 0, 0.0, 0.0
    total = np.zeros(d_model, dtype=np.float64)
    for p in parts:
        count += p.count
        sum_sq += p.sum_sq_norm
        total += np.asarray(p.sum, dtype=np.float64)
        max_abs = max(max_abs, p.max_abs)
    mean_sq = sum_sq / max(count, 1)
    return SiteStatistics(
        count=count,
        mean_sq_norm=mean_sq,
        mean=(total / max(count, 1)).tolist(),
        max_abs=max_abs,
        norm_scaling_factor=float(np.sqrt(d_model / mean_sq)) if mean_sq > 0 else 1.0,
    )
