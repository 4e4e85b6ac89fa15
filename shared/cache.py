"""The activation cache's public API, and its reader `Cache` (see docs/CACHE_FORMAT.md).

A cache is a Zarr v3 group::

    PATH/zarr.json                      group; attributes["saeforge"] = the CacheSpec + versions
    PATH/acts/<site>/                   [n_rows, d_model] activations, one chunk per shard
    PATH/tokens/                        [n_rows] int32 token ids
    PATH/positions/                     [n_rows] int32 position of each token in its context
    PATH/ledger/shard-000123.json       write-once record: rows, checksums, per-site statistics
    PATH/seal.json                      written last: rows in total, aggregated statistics

A shard is done only when its ledger record exists. A chunk zarr never wrote reads as zeros, so
`Cache` reads every shard through the ledger and checks file sizes; nothing missing ever becomes
zeros.

A cache may also live at a URL (s3://, gs://, any fsspec URL): `Cache.open(url)` reads it through
a local mirror folder kept in step with the store; `shared.cache_sources` makes that choice, and
`Cache` reads whichever folder its source hands it. Harvest writes a URL with
`shared.remote.RemoteCacheWriter`.

Where the rest lives (each name below is also importable from here):
    shared.cache_spec      CacheSpec, SiteRecord: what identifies a cache
    shared.cache_storage   STORAGE_DTYPES, COMPRESSIONS, to_storage: how activations are stored
    shared.cache_layout    Layout: where each file lives
    shared.cache_records   ShardRecord, Seal, SiteStatistics, read_ledger: the JSON records
    shared.cache_writer    CacheWriter, ShardWriter: writing
    shared.cache_sources   where a reader's bytes come from (a folder, or a URL's mirror)
    shared.cache_errors    CacheError
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from shared.cache_errors import CacheError
from shared.cache_layout import Layout
from shared.cache_records import Seal, ShardRecord, SiteStatistics, read_ledger, read_seal
from shared.cache_sources import CacheSource, LocalSource, open_source
from shared.cache_spec import CacheSpec, SiteRecord, read_group_spec
from shared.cache_stats import merge_statistics
from shared.cache_storage import COMPRESSIONS, STORAGE_DTYPES, numpy_storage_dtype, to_storage
from shared.cache_writer import CacheWriter, ShardWriter

__all__ = ["COMPRESSIONS", "STORAGE_DTYPES", "Cache", "CacheError", "CacheSpec", "CacheWriter", "Layout", "Seal",
           "ShardRecord", "ShardWriter", "SiteRecord", "SiteStatistics", "read_ledger", "to_storage"]


# --------------------------------------------------------------------------- reader


@dataclass
class Cache:
    """A cache opened for reading. Use `Cache.open(path or URL)`.

    root: the local cache folder files are read from (for a URL: its read-through mirror);
    source: where its bytes come from (shared.cache_sources: the folder itself, or the mirror,
    which fetches each chunk file when first read).
    """

    root: Path
    spec: CacheSpec
    attrs: dict[str, Any]
    ledger: dict[int, ShardRecord]
    seal: Seal | None
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)
    source: CacheSource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source is None:
            self.source = LocalSource(self.root)

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        allow_unsealed: bool = False,
        mirror: str | os.PathLike | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> "Cache":
        """Open a cache. Unsealed caches are refused unless allow_unsealed (completed shards only).

        root: a folder, or a URL (s3://bucket/path, gs://..., any fsspec URL). A URL's metadata,
        ledger and seal are copied into a local mirror folder (`mirror`, default
        $SAEFORGE_MIRROR or ~/.cache/saeforge/mirror, one subfolder per URL) and its chunk files
        are fetched there, checksum-checked, when first read. storage_options: fsspec options
        (merged over $SAEFORGE_STORAGE_OPTIONS).
        """
        source = open_source(root, mirror, storage_options)
        spec, attrs = read_group_spec(source.root, source.where)
        layout = Layout(source.root, source.where)
        seal = read_seal(layout)
        if seal is None and not allow_unsealed:
            raise CacheError(
                f"{layout.where} is not sealed (harvest unfinished); finish it with the same harvest command, "
                "or train on the completed shards only (train run --allow-unsealed; allow_unsealed=True in Python)"
            )
        return cls(source.root, spec, attrs, read_ledger(source.root), seal, source=source)

    @property
    def where(self) -> str:
        """How messages name this cache: its URL, or its folder."""
        return self.source.where

    @property
    def sealed(self) -> bool:
        return self.seal is not None

    @property
    def shards(self) -> list[int]:
        """Shards available for reading: all when sealed, else the contiguous-or-not committed ones."""
        if self.seal is not None:
            return list(range(self.seal.n_shards))
        return sorted(k for k in self.ledger if k < self.spec.n_shards)

    def shard_rows(self, shard: int) -> int:
        return self._record(shard).rows

    @property
    def n_rows(self) -> int:
        return sum(self.shard_rows(k) for k in self.shards)

    def _record(self, shard: int) -> ShardRecord:
        if shard not in self.ledger:
            raise CacheError(f"{self.where}: shard {shard} is not committed (no ledger record)")
        return self.ledger[shard]

    def stats(self, site: str) -> SiteStatistics:
        """Aggregated statistics of a site over the readable shards (mean_sq_norm, mean, ...)."""
        self.check_site(site)
        if self.seal is not None:
            return self.seal.stats[site]
        return merge_statistics((self.ledger[k].stats[site] for k in self.shards), self.spec.d_model)

    def check_site(self, site: str) -> None:
        if site not in self.spec.site_names:
            raise CacheError(f"{self.where} has no site {site!r}; it holds {', '.join(self.spec.site_names)}")

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(str(self.root / name), mode="r", zarr_format=3)
        return self._arrays[name]

    def _checked_file(self, name: str, shard: int) -> Path:
        path = Layout(self.root).chunk_files(self.spec.site_names, shard)[name]
        rec = self._record(shard)
        self.source.ensure_file(path, rec.sizes[name], rec.checksums[name], f"shard {shard} ({name})")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheError(f"{self.where}: shard {shard} file {path} is missing; re-harvest that shard") from None
        if size != rec.sizes[name]:
            raise CacheError(
                f"{self.where}: shard {shard} file {path} is {size} bytes, ledger says {rec.sizes[name]} "
                "(truncated or replaced); re-harvest that shard"
            )
        return path

    def read_acts(self, site: str, shard: int, mmap: bool = True) -> np.ndarray:
        """Activations of one shard, [rows, d_model] in storage dtype (bfloat16 via ml_dtypes).

        Uncompressed shards are memory-mapped read-only (no copy); compressed ones are decoded.
        """
        self.check_site(site)
        path = self._checked_file(f"acts/{site}", shard)
        rows, d = self.shard_rows(shard), self.spec.d_model
        dtype = numpy_storage_dtype(self.spec.dtype)
        if self.spec.compression == "none" and mmap:
            return np.memmap(path, dtype=dtype, mode="r", shape=(rows, d))
        start = shard * self.spec.rows_per_shard
        a = self._array(f"acts/{site}")[start : start + rows]
        return a.view(dtype) if self.spec.dtype == "bfloat16" else a

    def read_vector(self, name: str, shard: int) -> np.ndarray:
        """'tokens' or 'positions' of one shard: int32 [rows]."""
        path = self._checked_file(name, shard)
        rows = self.shard_rows(shard)
        if self.spec.compression == "none":
            return np.fromfile(path, dtype="<i4", count=rows)
        start = shard * self.spec.rows_per_shard
        return self._array(name)[start : start + rows]

    def verify(self) -> list[str]:
        """Re-check every planned shard's files against the ledger; returns one problem per line.

        For a URL the objects on the store are checked (streamed, not copied into the mirror).
        """
        problems = []
        n = self.seal.n_shards if self.seal is not None else self.spec.n_shards
        layout = Layout(self.root)
        for k in range(n):
            rec = self.ledger.get(k)
            if rec is None:
                problems.append(f"shard {k}: missing (no ledger record)")
                continue
            for name, path in layout.chunk_files(self.spec.site_names, k).items():
                where, problem = self.source.check_file(path, rec.sizes[name], rec.checksums[name])
                if problem:
                    problems.append(f"shard {k}: {name} {where} {problem}")
        return problems

    def disk_bytes(self) -> int:
        """Bytes of the cache: of its objects on the store for a URL, else of its folder."""
        return self.source.total_bytes()
