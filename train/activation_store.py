"""The training-side activation store: shuffled, seekable batches from a sealed cache, exact resume.

Usage::

    store = ActivationStore("/data/acts", batch_size=4096, window_shards=4, seed=0,
                            heldout_shards=1, normalize=True, device="cuda")
    store.load_state_dict(ckpt["store"])        # optional: O(1), no replay
    for x in store:                              # x: float32 [batch_size // world_size, d_model]
        ...
    ckpt["store"] = store.state_dict()           # {"position": int, + identity fields}

Data flow, top to bottom (one home each)
    train.row_order     RowOrder: position -> (epoch, window, offset); a window's shards and the
                        permutation of its rows. A pure function of the cache identity, seed,
                        window size and position (`train.permutation` holds the keyed permutation).
    train.window_reader WindowReader: a window's shards -> one [W * rows_per_shard, d] tensor per
                        site in storage dtype, memory-mapped ("map", the default where possible)
                        or copied ("copy"), checked against the ledger (`verify`); the two modes
                        serve identical bytes. `train.mapped_files` holds the mmap plumbing.
    this module         ActivationStore: which windows are resident, the gather of a batch's rows
                        (torch.index_select), the prefetch threads, position / seek / state_dict,
                        held-out batches.
    train.batch_output  OutputPool and convert: the output tensors, their dtype and scaling.

Position and resume
    Global batch k is the rows at positions [k*B, (k+1)*B) (B = batch_size); rank r of R gets the
    contiguous slice [k*B + r*B/R, k*B + (r+1)*B/R). `seek(p)` and `load_state_dict` cost O(S):
    locate (epoch, window, offset) arithmetically, load that window, continue (never replay).
    `row_ids(p, n)` names the (shard, row) of any served rows without reading activations.

Memory
    At most two windows are resident (the one being served and the one prefetched; one with
    prefetch=False): `window_bytes` each, plus int64 row indices (8 bytes a row) and a few
    batches: output tensors are recycled once the caller holds no reference to them
    (`train.batch_output`), never while it does. Nothing of size n_rows is ever built.

Threads (prefetch=True)
    One loader thread fills the next window while the current one is served; one batch thread
    gathers (torch.index_select) and converts the next batch. They run torch with `threads`
    intra-op threads (default 1), so they do not oversubscribe the cores the training step uses.
    For a CUDA device the batch thread gathers storage-dtype rows into pinned memory and the
    caller's thread converts (and scales) them on the GPU after a non-blocking copy: half the
    bytes over PCIe, no host conversion, results bit-identical to the CPU path. Errors raised in the
    threads (e.g. a truncated shard) are re-raised by the next_batch() that needs them.
    close() (or `with store:`) stops the threads.

Sites, held-out data and normalisation
    `sites=[a, b, ...]` serves a dict site -> tensor: the same rows in the same order for every
    site (the order does not depend on the sites); an input and a target site of one cache are
    served this way. heldout_shards=n (or heldout_fraction=f: n = ceil(f * n_shards)) reserves
    the last n shards by index: never served for training, `eval_batches()` serves them in cache
    order. With normalize=True each site is multiplied by its own dataset-level factor
    sqrt(d / E||x||^2) from the cache statistics (`scaling_factors`), so that E||x||^2 = d; fold
    it into exported weights (`train.scaling`). The cache is reached only through
    `shared.cache.Cache`, so an object-store backend can replace the local one.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from shared.cache import Cache, CacheError
from train.batch_output import OUT_DTYPES, OutputPool, convert
from train.permutation import ORDER_VERSION, permutation
from train.row_order import RowOrder, cache_identity, heldout_count
from train.row_mask import RowMask
from train.window_reader import WindowReader, kept_rows

__all__ = ["ActivationStore", "IDENTITY_FIELDS", "RowOrder", "cache_identity"]  # the last two: train.row_order

IDENTITY_FIELDS = ("order_version", "cache_id", "seed", "window_shards", "batch_size", "heldout_shards", "drop_bos",
                   "mask_token_ids", "mask_norm_threshold", "mask_norm_site")
# what a state saved before a field existed served: a resume of an older checkpoint compares these
LEGACY_IDENTITY = {"mask_token_ids": [], "mask_norm_threshold": None, "mask_norm_site": None}


@dataclass
class _Window:
    key: tuple[int, int]
    slot: int
    index: torch.Tensor  # int64 [L]: buffer row of the window's j-th served row
    shards: np.ndarray
    rows: dict[str, torch.Tensor]  # site -> [W * rows_per_shard, d] storage dtype (buffer or mapping)


class ActivationStore:
    """Shuffled, seekable, exactly resumable batches from an activation cache (module docstring).

    Batches are `[batch_size // world_size, d_model]` tensors of `dtype` on `device`, or a dict
    site -> tensor (same rows) when `sites` is a list. `sites=None` serves the cache's first site.

    cache: a Cache or a cache folder. batch_size: global rows per step (all ranks). window_shards:
    W, the shuffle buffer in shards. seed: keys the order. heldout_shards / heldout_fraction: the
    last shards kept for eval_batches(). drop_bos: skip rows at context position 0. row_mask: the
    rows left out (train.row_mask.RowMask; its drop_bos must agree with drop_bos). normalize:
    multiply by scaling_factors. dtype: torch.float32 or torch.bfloat16. rank / world_size: this
    process's slice of each global batch. allow_unsealed: serve the committed shards of an
    unfinished cache. prefetch: background loader and batch threads. max_tokens: iteration stops
    before position would exceed it. verify: checksum shards "once" per store, "always", "never".
    threads: torch intra-op threads of each background thread. window_io: "auto", "map" or "copy"
    (`train.window_reader`); the bytes served do not depend on it.
    """

    def __init__(
        self,
        cache: Cache | str | os.PathLike,
        sites: Sequence[str] | str | None = None,
        batch_size: int = 4096,
        window_shards: int = 4,
        seed: int = 0,
        heldout_shards: int = 0,
        heldout_fraction: float | None = None,
        drop_bos: bool = False,
        row_mask: RowMask | None = None,
        normalize: bool = False,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        allow_unsealed: bool = False,
        prefetch: bool = True,
        max_tokens: int | None = None,
        verify: str = "once",
        threads: int = 1,
        window_io: str = "auto",
    ):
        self.cache = cache if isinstance(cache, Cache) else Cache.open(cache, allow_unsealed=allow_unsealed)
        spec = self.cache.spec
        if not self.cache.sealed and not allow_unsealed:
            raise CacheError(f"{self.cache.root} is not sealed; pass allow_unsealed=True to train on its completed shards only")
        self.multi_site = isinstance(sites, (list, tuple))
        self.sites = list(sites) if self.multi_site else [sites or spec.site_names[0]]
        for s in self.sites:
            self.cache.check_site(s)
        self.d_model = spec.d_model
        self.dtype = OUT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if self.dtype not in OUT_DTYPES.values():
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size or batch_size < 1:
            raise ValueError(f"need 0 <= rank < world_size dividing batch_size; got rank={rank}, world_size={world_size}, batch_size={batch_size}")
        if window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if verify not in ("once", "always", "never"):
            raise ValueError(f"verify must be 'once', 'always' or 'never', got {verify!r}")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        if row_mask is not None and row_mask.drop_bos != bool(drop_bos):
            raise ValueError(f"row_mask.drop_bos={row_mask.drop_bos} but drop_bos={drop_bos}")
        self.seed, self.drop_bos, self.normalize = int(seed), bool(drop_bos), bool(normalize)
        self.mask = row_mask if row_mask is not None else RowMask(drop_bos=self.drop_bos)
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self.verify = verify
        self._pin = self.device.type == "cuda"
        # CUDA: ship storage-dtype rows (pinned) and convert / scale on the GPU, bit-identical to
        # the CPU conversion: half the bytes over PCIe and no conversion work on the host.
        self._late = self.device.type == "cuda"
        self._threads = int(threads)

        shards = self.cache.shards
        n_held = heldout_count(len(shards), heldout_shards, heldout_fraction, self.cache.root)
        self.heldout_shards = shards[len(shards) - n_held :]
        self.train_shards = shards[: len(shards) - n_held]
        if self.mask.norm_site is not None:
            self.cache.check_site(self.mask.norm_site)
        kept = [kept_rows(self.cache, k, self.mask) for k in self.train_shards]
        self.order = RowOrder(self.train_shards, kept, window_shards, self.seed)
        if self.order.rows_per_epoch == 0:
            raise CacheError(f"{self.cache.root}: no training rows left (the row mask removed every row: {self.mask.record()})")
        self.cache_id = cache_identity(self.cache)
        self.scaling_factors = {s: float(self.cache.stats(s).norm_scaling_factor) for s in self.sites}

        self.reader = WindowReader(self.cache, self.sites, self.order.window_shards, verify, window_io, self.mask)
        self.window_bytes = self.reader.window_bytes
        self._rps, self._storage = self.reader.rows_per_shard, self.reader.storage
        self._windows: dict[tuple[int, int], tuple[int, Future]] = {}
        self._tmp: dict[str, torch.Tensor] = {}
        self._pools: dict[tuple[str, torch.dtype], OutputPool] = {}
        self._position = 0
        self._pending: tuple[int, Future] | None = None
        self._prefetch = bool(prefetch)
        # torch's thread count is a per-thread setting: the background threads use `threads` each
        # (default 1), never an extra full OpenMP team competing with the training step.
        pool = dict(max_workers=1, initializer=torch.set_num_threads, initargs=(self._threads,))
        self._loader = ThreadPoolExecutor(thread_name_prefix="store-load", **pool) if prefetch else None
        self._batcher = ThreadPoolExecutor(thread_name_prefix="store-batch", **pool) if prefetch else None
        self._finalizer = weakref.finalize(self, _shutdown, self._loader, self._batcher)

    @property
    def window_io(self) -> str:
        """"map" or "copy": how windows are read now (`train.window_reader`)."""
        return self.reader.window_io

    # ------------------------------------------------------------------ position and state

    @property
    def position(self) -> int:
        """Rows served globally (all ranks) since the start of training."""
        return self._position

    @property
    def epoch(self) -> int:
        return self._position // self.order.rows_per_epoch

    @property
    def rows_per_epoch(self) -> int:
        return self.order.rows_per_epoch

    def seek(self, position: int) -> None:
        """Continue from `position` (rows); O(S), the batches then equal an uninterrupted run's."""
        if int(position) != position or position < 0:
            raise ValueError(f"position must be a non-negative integer, got {position!r}")
        self._position = int(position)

    def _identity(self) -> dict[str, Any]:
        return {
            "order_version": ORDER_VERSION,
            "cache_id": self.cache_id,
            "seed": self.seed,
            "window_shards": self.order.window_shards,
            "batch_size": self.batch_size,
            "heldout_shards": list(self.heldout_shards),
            "drop_bos": self.drop_bos,
            "mask_token_ids": list(self.mask.token_ids),
            "mask_norm_threshold": self.mask.norm_threshold,
            "mask_norm_site": self.mask.norm_site,
        }

    def state_dict(self) -> dict[str, Any]:
        """{"position": int} plus the identity fields a resume must match (IDENTITY_FIELDS)."""
        return {"position": self._position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Seek to state["position"]; refuses a state saved for a different order, naming the field."""
        mine = self._identity()
        for name in IDENTITY_FIELDS:
            if state.get(name, LEGACY_IDENTITY.get(name)) != mine[name]:
                raise CacheError(
                    f"store state was saved with {name}={state.get(name, LEGACY_IDENTITY.get(name))!r} but this store has "
                    f"{name}={mine[name]!r} (cache {self.cache.root}); resume with the original settings"
                )
        self.seek(state["position"])

    def describe(self) -> dict[str, Any]:
        """Everything needed to reproduce the data order and scale, JSON-serialisable."""
        return {
            **self._identity(),
            "cache": str(self.cache.root),
            "sites": self.sites,
            "d_model": self.d_model,
            "train_shards": len(self.train_shards),
            "rows_per_epoch": self.rows_per_epoch,
            "window_bytes": self.window_bytes,
            "normalize": self.normalize,
            "scaling_factors": self.scaling_factors,
            "world_size": self.world_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def check_compatible(self, site: str, d_in: int) -> None:
        """Raise CacheError naming both values if an SAE for (site, d_in) cannot train on this store."""
        if site not in self.sites:
            raise CacheError(f"SAE config hook site {site!r} is not served by this store (it serves {self.sites}, cache {self.cache.root})")
        if int(d_in) != self.d_model:
            raise CacheError(f"SAE config d_in={d_in} does not match the store's d_model={self.d_model} (site {site}, cache {self.cache.root})")

    # ------------------------------------------------------------------ serving

    def next_batch(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """This rank's slice of the global batch at `position`, then advance by batch_size."""
        p = self._position
        if self._pending is not None and self._pending[0] == p:
            fut = self._pending[1]
        else:
            fut = self._submit_batch(p)
        self._pending = None
        batch = fut.result()
        self._position = p + self.batch_size
        if self._prefetch:
            self._pending = (self._position, self._submit_batch(self._position))
        return self._emit(batch)

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Batches until position + batch_size would exceed max_tokens (forever if None)."""
        while self.max_tokens is None or self._position + self.batch_size <= self.max_tokens:
            yield self.next_batch()

    def row_ids(self, position: int, count: int) -> np.ndarray:
        """(shard, row within shard) of the rows at global positions [position, position + count): int64 [count, 2]."""
        out, p = [], int(position)
        while len(out) < count:
            e, w, off = self.order.locate(p)
            shards, local = self._plan(e, w)
            take = min(count - len(out), len(local) - off)
            rows = local[off : off + take]
            out.extend(zip(shards[rows // self._rps].tolist(), (rows % self._rps).tolist()))
            p += take
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

    def eval_batches(self, batch_size: int | None = None) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """The held-out rows in cache order (kept rows only), in batches of batch_size (last may be
        short), converted like training batches. Not split across ranks."""
        if not self.heldout_shards:
            raise CacheError("this store has no held-out shards; construct it with heldout_shards or heldout_fraction")
        bs = int(batch_size or self.batch_size)
        bufs = {s: torch.empty((self._rps, self.d_model), dtype=self._storage) for s in self.sites}
        parts: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        have = 0
        for k in self.heldout_shards:
            for s in self.sites:
                self.reader.read_shard(s, k, bufs[s])
            idx = torch.from_numpy(self.reader.kept_index(k))
            i = 0
            while i < len(idx):
                take = min(bs - have, len(idx) - i)
                for s in self.sites:
                    rows = bufs[s].index_select(0, idx[i : i + take])
                    parts[s].append(rows if self._late else self._convert(rows, s))
                have, i = have + take, i + take
                if have == bs:
                    yield self._emit({s: torch.cat(parts[s]) for s in self.sites})
                    parts, have = {s: [] for s in self.sites}, 0
        if have:
            yield self._emit({s: torch.cat(parts[s]) for s in self.sites})

    def close(self) -> None:
        """Stop the prefetch threads (waits for a window being read). The store can't serve after."""
        self._pending = None
        self._finalizer()  # shutdown without waiting (also what garbage collection does)
        for ex in (self._batcher, self._loader):
            if ex is not None:
                ex.shutdown(wait=True)
        self._windows.clear()  # unmaps mapped windows, frees copied ones
        self.reader.release()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ batches (batch thread)

    def _submit_batch(self, position: int) -> Future:
        if not self._finalizer.alive:
            raise RuntimeError("this ActivationStore is closed")
        start = position + self.rank * self.local_batch_size
        if self._batcher is not None:
            return self._batcher.submit(self._make_batch, start, self.local_batch_size)
        fut: Future = Future()
        try:
            fut.set_result(self._make_batch(start, self.local_batch_size))
        except BaseException as e:  # noqa: BLE001 - re-raised by fut.result()
            fut.set_exception(e)
        return fut

    def _make_batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """Rows at global positions [start, start + count): dict site -> CPU [count, d], in self.dtype
        (storage dtype on the CUDA path, converted by _emit)."""
        late = self._late  # read once: tests flip it to exercise the CUDA path on CPU
        out_dtype = self._storage if late else self.dtype
        out = {s: self._pool(s, out_dtype).get() for s in self.sites}
        direct = out_dtype == self._storage  # gather straight into the output
        target = out if direct else {s: self._tmp_buffer(s, count) for s in self.sites}
        filled, p = 0, start
        while filled < count:
            e, w, off = self.order.locate(p)
            win = self._window(e, w)
            take = min(count - filled, len(win.index) - off)
            idx = win.index[off : off + take]
            for s in self.sites:
                torch.index_select(win.rows[s], 0, idx, out=target[s][filled : filled + take])
            filled, p = filled + take, p + take
            del win, idx  # an evicted window is freed (unmapped) before the next one is looked up
        if late:
            return out  # converted after the copy to the device (_emit)
        if direct:
            if self.normalize:
                for s in self.sites:
                    out[s].mul_(self.scaling_factors[s])
            return out
        return {s: self._convert(target[s], s, out[s]) for s in self.sites}

    def _pool(self, site: str, dtype: torch.dtype) -> OutputPool:
        key = (site, dtype)
        if key not in self._pools:
            self._pools[key] = OutputPool((self.local_batch_size, self.d_model), dtype, pin=self._pin)
        return self._pools[key]

    def _tmp_buffer(self, site: str, rows: int) -> torch.Tensor:
        buf = self._tmp.get(site)
        if buf is None or buf.shape[0] < rows:
            buf = self._tmp[site] = torch.empty((rows, self.d_model), dtype=self._storage)
        return buf[:rows]

    def _convert(self, x: torch.Tensor, site: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, d] storage dtype -> [n, d] self.dtype, scaled if normalize (`batch_output.convert`)."""
        return convert(x, self.dtype, self.scaling_factors[site] if self.normalize else None, out)

    def _emit(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """Move a CPU batch to the device (and, for CUDA, convert it there); tensor or dict."""
        if self.device.type != "cpu":
            batch = {s: t.to(self.device, non_blocking=self._pin) for s, t in batch.items()}
        if self._late:
            batch = {s: self._convert(t, s) if t.dtype != self.dtype or self.normalize else t for s, t in batch.items()}
        return batch if self.multi_site else batch[self.sites[0]]

    # ------------------------------------------------------------------ windows

    def _window(self, epoch: int, w: int) -> _Window:
        """The loaded window (epoch, w); keeps it and (if prefetching) the next one, evicts the rest."""
        key = (epoch, w)
        nxt = self.order.next_window(epoch, w)
        keep = {key, nxt} if self._prefetch else {key}
        for k in [k for k in self._windows if k not in keep]:
            self._evict(k)
        if key not in self._windows:
            self._start_load(key)
        fut = self._windows[key][1]
        try:
            win = fut.result()
        except BaseException:
            self._windows.pop(key, None)  # a later call retries (e.g. after the shard is repaired)
            raise
        if self._prefetch and nxt not in self._windows:
            self._start_load(nxt)
        return win

    def _start_load(self, key: tuple[int, int]) -> None:
        slot = min({0, 1} - {s for s, _ in self._windows.values()})
        if self._loader is not None:
            fut = self._loader.submit(self._load, key, slot)
        else:
            fut = Future()
            try:
                fut.set_result(self._load(key, slot))
            except BaseException as e:  # noqa: BLE001 - re-raised by fut.result()
                fut.set_exception(e)
        self._windows[key] = (slot, fut)

    def _evict(self, key: tuple[int, int]) -> None:
        _, fut = self._windows.pop(key)
        if not fut.cancel():
            wait([fut])  # its slot may still be being written

    def _load(self, key: tuple[int, int], slot: int) -> _Window:
        """Map window `key`, or read it into buffer slot `slot` (loader thread)."""
        shards, local = self._plan(*key)
        return _Window(key, slot, torch.from_numpy(local), shards, self.reader.load(shards.tolist(), slot))

    def _plan(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shards of the window, buffer row of each served row in serving order: int64 [L])."""
        shards = self.order.window(epoch, w)
        local = np.concatenate([j * self._rps + self.reader.kept_index(k) for j, k in enumerate(shards.tolist())])
        _, cum = self.order.epoch_layout(epoch)
        if len(local) != cum[w + 1] - cum[w]:
            raise CacheError(f"{self.cache.root}: shards {shards.tolist()} changed since the store was opened; reopen it")
        return shards, local[permutation(len(local), self.order.row_key(epoch, w))]


def _shutdown(*executors: ThreadPoolExecutor | None) -> None:
    # wait=False: this may run from garbage collection inside one of the executors' own threads.
    for ex in executors:
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
