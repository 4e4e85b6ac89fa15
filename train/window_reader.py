"""Reading a store's windows of shards from the cache: memory-mapped or copied, checked against the ledger.

Shapes and units
    A window is W shards (the store's shuffle buffer). For each site it is one tensor
    [W * rows_per_shard, d_model] in the cache's storage dtype (float16, bfloat16 or float32):
    shard j of the window holds rows [j * rows_per_shard, (j + 1) * rows_per_shard); a short shard
    leaves the end of its slot unused (never indexed). `window_bytes` = W * rows_per_shard *
    d_model * itemsize * number of sites. `kept_index(shard)` lists the rows of a shard that are
    served (those the store's train.row_mask.RowMask keeps: all, or e.g. those not at context
    position 0 when drop_bos).

window_io
    "map" (the default where possible: uncompressed cache, Linux, chunk files a whole number of
    pages): a window's chunk files are memory-mapped back to back into one read-only address
    range (`train.mapped_files.MappedFiles`), read into the page cache and mapped at load time
    (sequential reads of a cold file), and gathered from directly: no copy into private memory.
    The mapping lives as long as a tensor over it does (the store drops it when it evicts the
    window). If mapping fails at run time (a file system without mmap), "auto" warns and falls
    back to "copy" for good; an explicit "map" raises CacheError. "copy" (compressed caches, other
    systems, or asked for): a window is read shard by shard with large sequential copies
    (`train.mapped_files.copy_file`) into one of two preallocated buffers (slot 0 or 1: the window
    being served and the one prefetched) in storage dtype. Both modes serve identical bytes.

Integrity
    Cache.read_acts checks each chunk file's size against the ledger before it is mapped or read
    (missing or truncated shards raise CacheError naming the shard, never zeros). verify="once"
    checks each (site, shard)'s xxh3 checksum against the ledger the first time this reader reads
    it (hashing the bytes just mapped or copied: no second read); "always" / "never" as named.
    A file truncated by another process while mapped would still fault (SIGBUS): cache files are
    write-once and rewritten only by rename, which leaves a mapped file intact.

Threads
    `load` runs in the store's loader thread (in the caller's thread without prefetch);
    `read_shard` and `kept_index` also run in the caller's thread (eval_batches, row_ids). The
    cache is reached only through `shared.cache.Cache` (read_acts / read_vector / ledger), so an
    object-store backend can replace the local one without changing this module.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import xxhash

from shared.cache import Cache, CacheError, Layout
from shared.durable import file_checksum
from train.mapped_files import MappedFiles, copy_file, mappable
from train.row_mask import RowMask

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WINDOW_IO = ("auto", "map", "copy")


def kept_index(cache: Cache, shard: int, mask: RowMask | bool) -> np.ndarray:
    """Rows of a shard that are served, int64 [kept]: those `mask` keeps (train.row_mask; a bool is
    RowMask(drop_bos=that))."""
    return as_mask(mask).kept_index(cache, shard)


def kept_rows(cache: Cache, shard: int, mask: RowMask | bool) -> int:
    """len(kept_index(...)), reading nothing without a mask."""
    return as_mask(mask).kept_rows(cache, shard)


def as_mask(mask: RowMask | bool) -> RowMask:
    return mask if isinstance(mask, RowMask) else RowMask(drop_bos=bool(mask))


class WindowReader:
    """Windows of `window_shards` shards of `sites` read from `cache` (module docstring).

    verify: "once", "always" or "never". window_io: "auto", "map" or "copy" (ValueError naming
    the reason if "map" is impossible here); `window_io` then holds the mode in use.
    """

    def __init__(self, cache: Cache, sites: Sequence[str], window_shards: int, verify: str = "once",
                 window_io: str = "auto", mask: RowMask | bool = False):
        self.cache, self.sites, self.window_shards = cache, list(sites), int(window_shards)
        self.verify, self.mask = verify, as_mask(mask)
        self.d_model = cache.spec.d_model
        self.rows_per_shard = cache.spec.rows_per_shard
        self.storage = STORAGE_DTYPES[cache.spec.dtype]
        self.itemsize = torch.empty((), dtype=self.storage).element_size()
        self.row_bytes = self.d_model * self.itemsize
        self.window_bytes = self.window_shards * self.rows_per_shard * self.row_bytes * len(self.sites)
        self._asked = window_io
        self.window_io = self._choose(window_io)
        self._verified: set[tuple[str, int]] = set()
        self._bufs: dict[int, dict[str, torch.Tensor]] = {}  # copy mode: slot -> site -> [W * rps, d]

    def _choose(self, asked: str) -> str:
        if asked not in WINDOW_IO:
            raise ValueError(f"window_io must be 'auto', 'map' or 'copy', got {asked!r}")
        if asked == "copy":
            return asked
        why = (f"the cache is compressed ({self.cache.spec.compression})" if self.cache.spec.compression != "none"
               else mappable(self.rows_per_shard * self.row_bytes))
        if why and asked == "map":
            raise ValueError(f"window_io='map' is not possible for {self.cache.root}: {why}; use 'copy' or 'auto'")
        return "copy" if why else "map"

    def kept_index(self, shard: int) -> np.ndarray:
        return kept_index(self.cache, shard, self.mask)

    # ------------------------------------------------------------------ windows (loader thread)

    def load(self, shards: list[int], slot: int) -> dict[str, torch.Tensor]:
        """Window `shards` (at most window_shards of them, in window order): site -> [W * rps, d]
        storage dtype, mapped read-only or copied into buffer `slot` (0 or 1, overwritten)."""
        if self.window_io == "map":
            try:
                return {s: self._map_window(s, shards) for s in self.sites}
            except OSError as e:  # e.g. a file system without mmap; a damaged file fails the copy's checks too
                if self._asked == "map":
                    raise CacheError(f"{self.cache.root}: shards {shards} cannot be memory-mapped ({e}); "
                                     "use window_io='copy' (training: store_io=copy)") from e
                warnings.warn(f"{self.cache.root}: shards {shards} cannot be memory-mapped ({e}); "
                              "copying windows into memory instead", RuntimeWarning, stacklevel=2)
                self.window_io = "copy"
        if slot not in self._bufs:
            n = self.window_shards * self.rows_per_shard
            self._bufs[slot] = {s: torch.empty((n, self.d_model), dtype=self.storage) for s in self.sites}
        rows, rps = self._bufs[slot], self.rows_per_shard
        for j, k in enumerate(shards):
            for s in self.sites:
                self.read_shard(s, k, rows[s][j * rps : (j + 1) * rps])
        return rows

    def release(self) -> None:
        """Free the copy buffers (mapped windows go with the last tensor over them)."""
        self._bufs.clear()

    def _map_window(self, site: str, shards: list[int]) -> torch.Tensor:
        """The chunk files of `shards` mapped back to back, populated and (verify) checked:
        [len(shards) * rows_per_shard, d] storage dtype, read-only."""
        files = [self._chunk_file(site, k)[:2] for k in shards]
        mapped = MappedFiles(files, self.rows_per_shard * self.row_bytes)  # OSError: handled by load
        mapped.populate()
        name = f"acts/{site}"
        for j, k in enumerate(shards):
            if self._needs_check(site, k):
                self._check_digest(k, name, xxhash.xxh3_128(mapped.file_bytes(j)).hexdigest())
                self._verified.add((site, k))
        return mapped.tensor(self.storage, self.row_bytes)

    # ------------------------------------------------------------------ one shard

    def read_shard(self, site: str, shard: int, dst: torch.Tensor) -> None:
        """Copy one shard's activations into dst [rows_per_shard, d] (storage dtype), checking it.

        Uncompressed: one sequential copy of the whole chunk file (padding included) from its
        memory map, then (verify) the xxh3-128 of the copied bytes against the ledger.
        Compressed: (verify) the checksum of the file first, then zarr decodes it.
        """
        name = f"acts/{site}"
        dst_np = dst.view(torch.int16).numpy() if self.itemsize == 2 else dst.numpy()
        check = self._needs_check(site, shard)
        if self.cache.spec.compression != "none":
            path = Layout(self.cache.root).acts_chunk(site, shard)
            if check and shard in self.cache.ledger and path.exists():
                self._check_digest(shard, name, file_checksum(path))
            try:
                arr = self.cache.read_acts(site, shard)  # CacheError if missing / wrong size
            except CacheError:
                raise
            except Exception as e:  # a codec error: name the shard
                raise CacheError(f"{self.cache.root}: shard {shard} ({name}) cannot be decoded ({e}); re-harvest that shard") from e
            np.copyto(dst_np[: arr.shape[0]], arr.view(dst_np.dtype))
        else:
            path, size, file_rows = self._chunk_file(site, shard)
            try:
                copy_file(path, size, dst_np[:file_rows])
            except (OSError, ValueError) as e:  # changed since the size check
                raise CacheError(f"{self.cache.root}: shard {shard} file {path} cannot be read ({e}); re-harvest that shard") from e
            if check:
                self._check_digest(shard, name, xxhash.xxh3_128(memoryview(dst_np[:file_rows])).hexdigest())
        if check:
            self._verified.add((site, shard))

    def _chunk_file(self, site: str, shard: int) -> tuple[str, int, int]:
        """(path, bytes, rows incl. padding) of an uncompressed chunk file, checked against the
        ledger: CacheError naming the shard if it is missing, truncated or not whole rows."""
        arr = self.cache.read_acts(site, shard)  # CacheError if missing / wrong size
        path, rows = arr.filename, arr.shape[0]
        del arr
        size = self.cache.ledger[shard].sizes[f"acts/{site}"]
        file_rows = size // self.row_bytes
        if size % self.row_bytes or not rows <= file_rows <= self.rows_per_shard:
            raise CacheError(f"{self.cache.root}: shard {shard} file {path} has {size} bytes, not whole rows of a shard; re-harvest that shard")
        return path, size, file_rows

    def _needs_check(self, site: str, shard: int) -> bool:
        """Whether this read of the shard's activations is checksummed (the `verify` policy)."""
        return self.verify == "always" or (self.verify == "once" and (site, shard) not in self._verified)

    def _check_digest(self, shard: int, name: str, digest: str) -> None:
        if digest != self.cache.ledger[shard].checksums[name]:
            raise CacheError(f"{self.cache.root}: shard {shard} ({name}) fails its checksum (corrupt); re-harvest that shard")
