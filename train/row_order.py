"""The training order of a store's rows: a pure function of the cache identity, seed, window size
and position (DESIGN.md section 3). Reads no activations.

Row order (ORDER_VERSION 1, `train.permutation`)
    Training rows are the rows of the training shards (the cache's readable shards minus the
    held-out ones), without the rows at position 0 of their context when drop_bos. N = their
    number = rows_per_epoch. Global position p (rows served by all ranks together since the start)
    lies in epoch e = p // N, at offset r = p % N of that epoch.
    * Shard order of epoch e: training shard i goes to place permute(i, S, derive_key(seed, e, 0))
      of the epoch (S training shards, listed by index).
    * Windows: consecutive groups of W = window_shards shards in that order (the last may be
      smaller). W >= S gives one window per epoch, an exact global shuffle.
    * Rows of window w: its shards' kept rows concatenated in window order (L of them), served in
      the order local[permute(j, L, derive_key(seed, e, 1, w))], j = 0..L-1 (`RowOrder.row_key`).
    Epochs follow each other seamlessly; a batch may straddle windows and epochs. Global batch k
    is the rows at positions [k*B, (k+1)*B) (B = batch_size); rank r of R gets the contiguous
    slice [k*B + r*B/R, k*B + (r+1)*B/R), so the union over ranks is the same for every R.
    Locating a position costs O(S) (`RowOrder.locate`); nothing of size N is ever built.

The order does not depend on which sites are served: every site of a multi-site store gets the
same rows in the same order.

`heldout_count` says how many of the last shards are held out (the rest are the training shards);
`cache_identity` names the cache an order belongs to; a store's state_dict records it. RowOrder is
called from the caller's thread and the store's loader and batch threads (epoch_layout is locked).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any, Sequence

import numpy as np
import xxhash

from shared.cache import Cache, CacheError
from train.permutation import derive_key, permute


def heldout_count(n_shards: int, shards: int, fraction: float | None, root: Any) -> int:
    """How many of the last shards are held out (heldout_shards, or ceil(fraction * n_shards)):
    CacheError / ValueError naming the setting if it leaves no training shard."""
    if n_shards == 0:
        raise CacheError(f"{root} has no readable shards")
    if fraction is not None:
        if shards:
            raise ValueError("give heldout_shards or heldout_fraction, not both")
        if not 0 <= fraction < 1:
            raise ValueError(f"heldout_fraction must lie in [0, 1), got {fraction}")
        shards = math.ceil(fraction * n_shards)
    if shards < 0 or shards >= n_shards:
        raise CacheError(f"{root}: holding out {shards} of {n_shards} shards leaves no training shard; hold out fewer")
    return int(shards)


def cache_identity(cache: Cache) -> str:
    """xxh3-128 hex of the cache spec and the (index, rows, checksums) of every readable shard."""
    payload = {
        "spec": cache.spec.to_dict(),
        "shards": [[k, cache.shard_rows(k), cache.ledger[k].checksums] for k in cache.shards],
    }
    return xxhash.xxh3_128(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class RowOrder:
    """The arithmetic of the training order (module docstring); reads no activations.

    shards: training shard indices, ascending [S]; kept: rows served from each of them [S].
    """

    def __init__(self, shards: Sequence[int], kept: Sequence[int], window_shards: int, seed: int):
        self.shards = np.asarray(shards, dtype=np.int64)
        self.kept = np.asarray(kept, dtype=np.int64)
        self.seed = int(seed)
        self.window_shards = min(int(window_shards), len(self.shards))
        self.n_windows = -(-len(self.shards) // self.window_shards)
        self.rows_per_epoch = int(self.kept.sum())
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids in serving order [S], cumulative kept rows at window starts [n_windows + 1])."""
        with self._lock:
            if epoch not in self._layouts:
                s = len(self.shards)
                place = permute(np.arange(s), s, derive_key(self.seed, epoch, 0))
                order = np.empty(s, dtype=np.int64)
                order[place] = np.arange(s)
                starts = np.arange(0, s, self.window_shards)
                per_window = np.add.reduceat(self.kept[order], starts)
                cum = np.concatenate([[0], np.cumsum(per_window)])
                if len(self._layouts) >= 4:
                    self._layouts.pop(next(iter(self._layouts)))
                self._layouts[epoch] = (self.shards[order], cum)
            return self._layouts[epoch]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, offset of the position inside that window's served rows)."""
        epoch, r = divmod(int(position), self.rows_per_epoch)
        _, cum = self.epoch_layout(epoch)
        w = int(np.searchsorted(cum, r, side="right")) - 1
        return epoch, w, r - int(cum[w])

    def window(self, epoch: int, w: int) -> np.ndarray:
        """Shard ids of window w of an epoch, in window order."""
        order, _ = self.epoch_layout(epoch)
        return order[w * self.window_shards : (w + 1) * self.window_shards]

    def next_window(self, epoch: int, w: int) -> tuple[int, int]:
        return (epoch, w + 1) if w + 1 < self.n_windows else (epoch + 1, 0)

    def row_key(self, epoch: int, w: int) -> int:
        """The key of the permutation of window w's rows (module docstring)."""
        return derive_key(self.seed, epoch, 1, w)
