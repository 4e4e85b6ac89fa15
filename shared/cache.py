"""The activation cache: one module owns its on-disk layout (see docs/CACHE_FORMAT.md).

A cache is a Zarr v3 group::

    PATH/zarr.json                      group; attributes["saeforge"] = the CacheSpec + versions
    PATH/acts/<site>/                   [n_rows, d_model] activations, one chunk per shard
    PATH/tokens/                        [n_rows] int32 token ids
    PATH/positions/                     [n_rows] int32 position of each token in its context
    PATH/ledger/shard-000123.json       write-once record: rows, checksums, per-site statistics
    PATH/seal.json                      written last: rows in total, aggregated statistics

A shard is done only when its ledger record exists. Chunk files are written by zarr (temp file +
rename), then fsynced, checksummed and recorded. A chunk zarr never wrote reads as zeros, so every
reader here goes through the ledger and checks file sizes; nothing missing ever becomes zeros.

A cache may also live at a URL (s3://, gs://, any fsspec URL): `shared.remote` keeps a local
folder in step with it (a staging folder for harvest, a read-through mirror for readers), and
the code here works on that folder.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr

from shared.cache_errors import CacheError
from shared.cache_layout import Layout, set_array_rows
from shared.cache_records import Seal, ShardRecord, SiteStatistics, read_ledger, read_seal
from shared.cache_spec import FORMAT_VERSION, CacheSpec, SiteRecord, check_same_spec, read_group_spec, software_version
from shared.cache_stats import merge_statistics, shard_statistics
from shared.cache_storage import (
    COMPRESSIONS,
    STORAGE_DTYPES,
    compressors,
    numpy_storage_dtype,
    to_storage,
    zarr_dtype,
)
from shared.durable import file_checksum, file_problem, fsync_path, write_atomic
from shared.faults import fault_point

__all__ = ["COMPRESSIONS", "STORAGE_DTYPES", "Cache", "CacheError", "CacheSpec", "CacheWriter", "Layout", "Seal",
           "ShardRecord", "SiteRecord", "SiteStatistics", "read_ledger", "to_storage"]

# --------------------------------------------------------------------------- file helpers


def _chunk_checksum(path: Path, chunk: np.ndarray, size: int, compression: str) -> str:
    """Checksum of a chunk file just written from `chunk`. Uncompressed, the file is the array's
    little-endian bytes, so they are hashed from memory (no re-read); otherwise, or if the size
    says the file is not exactly those bytes, the file is read."""
    if compression == "none" and np.little_endian and chunk.flags.c_contiguous and size == chunk.nbytes:
        return xxhash.xxh3_128_hexdigest(memoryview(chunk).cast("B"))
    return file_checksum(path)


# --------------------------------------------------------------------------- writer


class CacheWriter:
    """Creates or reopens a cache and commits shards one at a time.

    Safe under kill -9: a shard is committed by its ledger record, written (write-once) only
    after every chunk file of the shard is fsynced and checksummed.
    """

    def __init__(self, root: str | os.PathLike, spec: CacheSpec, where: str | None = None):
        self.layout = Layout(root, where)
        self.spec = spec
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create_or_open(cls, root: str | os.PathLike, spec: CacheSpec, where: str | None = None) -> "CacheWriter":
        """Create the cache, or reopen an existing one whose spec matches exactly.

        Raises CacheError naming every differing field otherwise; nothing on disk is touched.
        where: how messages name the cache (default: the folder).
        """
        layout = Layout(root, where)
        if layout.group_meta.exists():
            existing, _ = read_group_spec(root, layout.where)
            check_same_spec(existing, spec, layout.where)
            writer = cls(root, existing, where)
            writer._open_arrays()
            return writer
        if layout.root.exists() and any(layout.root.iterdir()):
            raise CacheError(f"{layout.where} exists and is not an activation cache; choose an empty --out")
        writer = cls(root, spec, where)
        writer._create()
        return writer

    def _create(self) -> None:
        spec = self.spec
        attrs = {
            "saeforge": {
                "format_version": FORMAT_VERSION,
                "software_version": software_version(),
                "spec": spec.to_dict(),
            }
        }
        # Build the group in a temporary folder, then rename it into place: either the whole
        # metadata exists or none does.
        self.layout.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.layout.root.with_name(f".{self.layout.root.name}.creating.{os.getpid()}")
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
        cfg = {"write_empty_chunks": True}
        for site in spec.sites:
            group.create_array(
                f"acts/{site.name}",
                shape=(spec.planned_rows, spec.d_model),
                chunks=(spec.rows_per_shard, spec.d_model),
                dtype=zarr_dtype(spec.dtype),
                compressors=compressors(spec.compression),
                fill_value=0,
                attributes={"storage_dtype": spec.dtype, "hook": dataclasses.asdict(site)},
                config=cfg,
            )
        for name in ("tokens", "positions"):
            group.create_array(
                name,
                shape=(spec.planned_rows,),
                chunks=(spec.rows_per_shard,),
                dtype="int32",
                compressors=compressors(spec.compression),
                fill_value=0,
                config=cfg,
            )
        (tmp / "ledger").mkdir()
        for dirpath, _, files in os.walk(tmp):
            for f in files:
                fsync_path(Path(dirpath) / f)
            fsync_path(Path(dirpath))
        if self.layout.root.exists():
            self.layout.root.rmdir()  # empty, checked by the caller
        os.rename(tmp, self.layout.root)
        fsync_path(self.layout.root.parent)
        self._open_arrays()

    def _open_arrays(self) -> None:
        group = zarr.open_group(str(self.layout.root), mode="r+", zarr_format=3)
        for site in self.spec.site_names:
            self._arrays[f"acts/{site}"] = group[f"acts/{site}"].with_config({"write_empty_chunks": True})
        for name in ("tokens", "positions"):
            self._arrays[name] = group[name].with_config({"write_empty_chunks": True})

    def done_shards(self) -> set[int]:
        return read_ledger(self.layout.root).keys() & set(range(self.spec.n_shards))

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """[start, stop) rows of a shard in the planned array."""
        start = shard * self.spec.rows_per_shard
        return start, min(start + self.spec.rows_per_shard, self.spec.planned_rows)

    def write_shard(
        self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray, positions: np.ndarray
    ) -> ShardRecord:
        """Write and commit one shard. acts[site]: [rows, d] in storage dtype; tokens, positions: [rows].

        rows may be fewer than the shard's planned rows only for the last shard of a short corpus;
        the rest of the chunk is zero padding, removed by `seal`.
        """
        spec = self.spec
        if self.layout.record(shard).exists():  # one stat, not a re-read of the whole ledger
            raise CacheError(f"shard {shard} of {self.layout.where} is already committed")
        start, stop = self.shard_bounds(shard)
        rows = len(tokens)
        if not 0 < rows <= stop - start or len(positions) != rows:
            raise CacheError(f"shard {shard}: got {rows} rows, expected 1..{stop - start}")
        if set(acts) != set(spec.site_names):
            raise CacheError(f"shard {shard}: sites {sorted(acts)} do not match the cache's {spec.site_names}")
        storage = numpy_storage_dtype(spec.dtype)
        for site, a in acts.items():
            if a.shape != (rows, spec.d_model) or a.dtype != storage:
                raise CacheError(
                    f"shard {shard} site {site}: got {a.shape} {a.dtype}, "
                    f"expected ({rows}, {spec.d_model}) {storage}"
                )
        for path in self.layout.chunk_files(spec.site_names, shard).values():
            # A chunk is written to `<name>.<uuid>.partial` and renamed (by _write_chunk, or by zarr):
            # a kill in between leaves that temporary behind. This writer alone writes this shard,
            # so any such file is debris.
            for stray in path.parent.glob(f"{path.name}.*.partial"):
                stray.unlink(missing_ok=True)
        try:
            fault_point("shard_write")
            # The fsyncs run together (one journal commit rather than one per file and directory)
            # while this thread computes the statistics and checksums: CPU work overlapping the
            # disk, not zarr's write (which also needs the GIL: on tmpfs it took 60-70 ms per
            # 75 MB shard next to the statistics, 42 ms alone).
            with ThreadPoolExecutor(max_workers=4, thread_name_prefix="shard-commit") as pool:
                files = self.layout.chunk_files(spec.site_names, shard)
                chunks: dict[str, np.ndarray] = {}  # what each chunk file holds, padded
                for site, a in acts.items():
                    data = a.view(np.uint16) if spec.dtype == "bfloat16" else a
                    chunks[f"acts/{site}"] = self._write_chunk(f"acts/{site}", files, start, stop, data)
                fault_point("shard_mid_write")
                chunks["tokens"] = self._write_chunk("tokens", files, start, stop, np.asarray(tokens, np.int32))
                chunks["positions"] = self._write_chunk("positions", files, start, stop,
                                                        np.asarray(positions, np.int32))
                synced = [pool.submit(fsync_path, p) for p in {*files.values(), *(f.parent for f in files.values())}]
                stats = {site: shard_statistics(a) for site, a in acts.items()}
                sizes = {name: path.stat().st_size for name, path in files.items()}
                checksums = {name: _chunk_checksum(path, chunks[name], sizes[name], spec.compression)
                             for name, path in files.items()}
                for done in synced:
                    done.result()
            fault_point("ledger_record")
            record = ShardRecord(shard=shard, rows=rows, checksums=checksums, sizes=sizes, stats=stats)
            write_atomic(self.layout.record(shard), record.to_json(), exclusive=True)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise CacheError(
                    f"disk full while writing shard {shard} of {self.layout.where}; free space and "
                    "rerun the same command: committed shards are kept, this one is redone"
                ) from None
            if isinstance(e, FileExistsError):
                raise CacheError(
                    f"shard {shard} of {self.layout.where} was committed by another process meanwhile"
                ) from None
            raise
        return record

    def _write_chunk(self, name: str, files: dict[str, Path], start: int, stop: int, data: np.ndarray) -> np.ndarray:
        """Write rows [start, stop) of array `name` (one chunk) from `data` (zero-padded); returns
        the padded array. Uncompressed, the chunk file is the array's
        little-endian bytes (zarr's bytes codec): written directly, temp file then rename, which
        costs about 10% less than zarr's own write of a 75 MB chunk; otherwise through zarr."""
        if self.spec.compression != "none" or not np.little_endian:
            padded = _pad(data, stop - start)
            self._arrays[name][start:stop] = padded
            return padded
        padded = np.ascontiguousarray(_pad(data, self.spec.rows_per_shard))  # an edge chunk is whole on disk too
        path = files[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # zarr's pattern: cleaned up alike
        try:
            with open(tmp, "wb", buffering=0) as f:
                view = memoryview(padded).cast("B")
                while view:
                    view = view[f.write(view):]
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. disk full: give the space back
            raise
        return padded

    def seal(self, n_shards: int | None = None) -> Seal:
        """Write seal.json once shards 0..n_shards-1 are committed (default: all planned).

        A corpus that ran out early has fewer shards, the last possibly short: the arrays are
        shrunk to the rows actually written.
        """
        n = self.spec.n_shards if n_shards is None else n_shards
        ledger = read_ledger(self.layout.root)
        missing = [k for k in range(n) if k not in ledger]
        if missing or n == 0:
            raise CacheError(
                f"{self.layout.where}: cannot seal, shards {missing[:5]} are not committed; "
                "rerun the harvest command to finish them"
            )
        short = [k for k in range(n - 1) if ledger[k].rows != self.spec.rows_per_shard]
        if short:
            raise CacheError(f"{self.layout.where}: cannot seal, shards {short[:5]} are short but not last")
        n_rows = sum(ledger[k].rows for k in range(n))
        if n_rows != self.spec.planned_rows:
            for name in self._arrays:
                set_array_rows(self.layout.root / name, n_rows)
        stats = {
            s: merge_statistics((ledger[k].stats[s] for k in range(n)), self.spec.d_model)
            for s in self.spec.site_names
        }
        fault_point("seal")
        seal = Seal(n_rows=n_rows, n_shards=n, stats=stats, software_version=software_version())
        write_atomic(self.layout.seal, seal.to_json())
        return seal


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    if len(a) == rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out


# --------------------------------------------------------------------------- reader


@dataclass
class Cache:
    """A cache opened for reading. Use `Cache.open(path or URL)`.

    For a URL, `root` is the local read-through mirror and `remote` (a shared.remote.RemoteCache)
    fetches each chunk file into it when first read.
    """

    root: Path
    spec: CacheSpec
    attrs: dict[str, Any]
    ledger: dict[int, ShardRecord]
    seal: Seal | None
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)
    remote: Any = field(default=None, repr=False)

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
        from shared.remote import RemoteCache, is_remote

        if is_remote(root):
            remote = RemoteCache.mirror(str(root), mirror, storage_options)
            remote.pull()
            root = remote.layout.root
        else:
            root = Path(root)
            remote = RemoteCache.of_local_copy(root, storage_options)  # a mirror folder opened by path
        where = remote.url if remote else None
        spec, attrs = read_group_spec(root, where)
        layout = Layout(root, where)
        seal = read_seal(layout)
        if seal is None and not allow_unsealed:
            raise CacheError(
                f"{layout.where} is not sealed (harvest unfinished); finish it with the same harvest command, "
                "or train on the completed shards only (train run --allow-unsealed; allow_unsealed=True in Python)"
            )
        return cls(root, spec, attrs, read_ledger(root), seal, remote=remote)

    @property
    def where(self) -> str:
        """How messages name this cache: its URL, or its folder."""
        return self.remote.url if self.remote else str(self.root)

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
        if self.remote is not None and not path.exists():
            # read-through: download, check size and checksum against the ledger, rename into place
            self.remote.fetch(path, rec.sizes[name], rec.checksums[name], f"shard {shard} ({name})")
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
                if self.remote is not None:
                    where = f"object {self.remote.url}/{layout.key(path)}"
                    digest = self.remote.checksum(path)  # None when the object is missing
                    problem = ("is missing" if digest is None else
                               "fails its checksum" if digest != rec.checksums[name] else None)
                else:
                    where = f"file {path}"
                    problem = file_problem(path, rec.sizes[name], rec.checksums[name])
                if problem:
                    problems.append(f"shard {k}: {name} {where} {problem}")
        return problems

    def disk_bytes(self) -> int:
        """Bytes of the cache: of its objects on the store for a URL, else of its folder."""
        if self.remote is not None:
            return self.remote.total_bytes()
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
