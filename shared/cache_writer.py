"""Writing a cache: `CacheWriter` (a local folder) and `ShardWriter`, the interface harvest writes
through (`shared.remote.RemoteCacheWriter` implements it for a URL).

Safe under kill -9. A shard is written in this order: its chunk files (temporary name, rename),
an fsync of each file and folder, an xxh3-128 checksum of each file, then its ledger record
(write-once). A shard is committed when its record exists; `seal` writes seal.json last, once
shards 0..n-1 are all committed. docs/CACHE_FORMAT.md describes the files.

Writing is split in two so the disk and the CPU overlap across shards: `stage_shard` writes the
chunk files, starts their fsyncs and computes statistics and checksums; `StagedShard.commit`
waits for those fsyncs and writes the record. Harvest's writer thread stages shard k+1 before
it commits shard k (records still in shard order, each after its own files are durable);
`write_shard` is the two back to back.
"""

from __future__ import annotations

import errno
import os
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import xxhash
import zarr

from shared.cache_errors import CacheError
from shared.cache_layout import Layout, set_array_rows
from shared.cache_records import Seal, ShardRecord, ShardStatistics, read_ledger
from shared.cache_spec import FORMAT_VERSION, CacheSpec, check_same_spec, read_group_spec, software_version
from shared.cache_stats import merge_statistics, shard_statistics
from shared.cache_storage import compressors, numpy_storage_dtype, zarr_dtype
from shared.durable import file_checksum, fsync_path, write_atomic
from shared.faults import fault_point


class ShardWriter(ABC):
    """What harvest writes a cache through, one shard at a time, in any order.

    spec: the cache's spec (the one on disk when an existing cache was reopened).
    layout: the local cache folder (for a URL: its staging copy); `layout.where` names the cache.
    Implementations: CacheWriter (a folder), shared.remote.RemoteCacheWriter (a URL).
    """

    spec: CacheSpec
    layout: Layout

    @abstractmethod
    def done_shards(self) -> set[int]:
        """Planned shards that are committed (a resumed harvest skips them)."""

    @abstractmethod
    def write_shard(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray,
                    positions: np.ndarray, stats: dict[str, ShardStatistics] | None = None) -> ShardRecord:
        """Write and commit one shard. acts[site]: [rows, d_model] in storage dtype; tokens,
        positions: int32 [rows]; stats: {site: shard_statistics(acts[site])} when the caller has
        already computed them (default: computed here). Returns the shard's ledger record."""

    def stage_shard(self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray,
                    positions: np.ndarray, stats: dict[str, ShardStatistics] | None = None) -> "StagedShard":
        """First half of `write_shard` (same arguments): the part that may run while the previous
        shard's files are still being made durable. This default writes and commits the whole
        shard here; its `commit()` only returns the record."""
        record = self.write_shard(shard, acts, tokens, positions, stats)
        return StagedShard(shard, lambda: record)

    @abstractmethod
    def seal(self, n_shards: int | None = None) -> Seal:
        """Seal the cache once shards 0..n_shards-1 (default: all planned) are committed."""

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """[start, stop) rows of a shard in the planned array."""
        start = shard * self.spec.rows_per_shard
        return start, min(start + self.spec.rows_per_shard, self.spec.planned_rows)


class StagedShard:
    """A shard whose chunk files are written, checksummed and being fsynced, but not committed.

    `commit()` (once) waits for its files to be durable, writes its ledger record and returns it.
    Never committed (a kill, an error), the files are what a resumed harvest overwrites.
    """

    def __init__(self, shard: int, commit: Callable[[], ShardRecord]):
        self.shard = shard
        self._commit = commit

    def commit(self) -> ShardRecord:
        return self._commit()


def _chunk_checksum(path: Path, chunk: np.ndarray, size: int, compression: str) -> str:
    """Checksum of a chunk file just written from `chunk`. Uncompressed, the file is the array's
    little-endian bytes, so they are hashed from memory (no re-read); otherwise, or if the size
    says the file is not exactly those bytes, the file is read."""
    if compression == "none" and np.little_endian and chunk.flags.c_contiguous and size == chunk.nbytes:
        return xxhash.xxh3_128_hexdigest(memoryview(chunk).cast("B"))
    return file_checksum(path)


class CacheWriter(ShardWriter):
    """Creates or reopens a cache folder and commits shards one at a time.

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
                attributes={"storage_dtype": spec.dtype, "hook": site.to_dict()},
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

    def write_shard(
        self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray, positions: np.ndarray,
        stats: dict[str, ShardStatistics] | None = None,
    ) -> ShardRecord:
        """Write and commit one shard. acts[site]: [rows, d] in storage dtype; tokens, positions: [rows];
        stats: {site: shard_statistics(acts[site])} if already computed.

        rows may be fewer than the shard's planned rows only for the last shard of a short corpus;
        the rest of the chunk is zero padding, removed by `seal`.
        """
        return self.stage_shard(shard, acts, tokens, positions, stats).commit()

    def stage_shard(
        self, shard: int, acts: dict[str, np.ndarray], tokens: np.ndarray, positions: np.ndarray,
        stats: dict[str, ShardStatistics] | None = None,
    ) -> StagedShard:
        """Write one shard's chunk files, start their fsyncs (in the background) and compute its
        statistics and checksums; the returned StagedShard's `commit()` writes the record.
        Arguments as `write_shard`; the arrays are not used after this returns."""
        spec = self.spec
        if self.layout.record(shard).exists():  # one stat, not a re-read of the whole ledger
            raise CacheError(f"shard {shard} of {self.layout.where} is already committed")
        start, stop = self.shard_bounds(shard)
        rows = len(tokens)
        if not 0 < rows <= stop - start or len(positions) != rows:
            raise CacheError(f"shard {shard}: got {rows} rows, expected 1..{stop - start}")
        if set(acts) != set(spec.site_names) or (stats is not None and set(stats) != set(acts)):
            raise CacheError(f"shard {shard}: sites {sorted(acts)} (statistics of {sorted(stats or acts)}) "
                             f"do not match the cache's {spec.site_names}")
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
        with self._disk_errors(shard):
            fault_point("shard_write")
            # The fsyncs run together (one journal commit rather than one per file and directory)
            # while this thread computes the statistics and checksums, and, in harvest, while it
            # writes the next shard: CPU work overlapping the disk, not zarr's write (which also
            # needs the GIL: on tmpfs it took 60-70 ms per 75 MB shard next to the statistics, 42 ms alone).
            files = self.layout.chunk_files(spec.site_names, shard)
            chunks: dict[str, np.ndarray] = {}  # what each chunk file holds, padded
            for site, a in acts.items():
                data = a.view(np.uint16) if spec.dtype == "bfloat16" else a
                chunks[f"acts/{site}"] = self._write_chunk(f"acts/{site}", files, start, stop, data)
                fault_point("site_write")  # some of a multi-site shard's chunk files written
            fault_point("shard_mid_write")
            chunks["tokens"] = self._write_chunk("tokens", files, start, stop, np.asarray(tokens, np.int32))
            chunks["positions"] = self._write_chunk("positions", files, start, stop,
                                                    np.asarray(positions, np.int32))
            pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shard-commit")
            try:
                synced = [pool.submit(fsync_path, p) for p in {*files.values(), *(f.parent for f in files.values())}]
            finally:
                pool.shutdown(wait=False)  # the submitted fsyncs still run; commit waits for them
            try:
                if stats is None:
                    stats = {site: shard_statistics(a) for site, a in acts.items()}
                sizes = {name: path.stat().st_size for name, path in files.items()}
                checksums = {name: _chunk_checksum(path, chunks[name], sizes[name], spec.compression)
                             for name, path in files.items()}
            except BaseException:
                _wait_all(synced)  # no fsync outlives a failed stage
                raise
        record = ShardRecord(shard=shard, rows=rows, checksums=checksums, sizes=sizes, stats=stats)
        return StagedShard(shard, lambda: self._commit(record, synced))

    def _commit(self, record: ShardRecord, synced: list[Future]) -> ShardRecord:
        """Wait for a staged shard's fsyncs, then write its ledger record (write-once)."""
        with self._disk_errors(record.shard):
            fault_point("shard_commit")  # staged (the next shard may be too), not yet durable
            for done in synced:
                done.result()
            fault_point("ledger_record")
            write_atomic(self.layout.record(record.shard), record.to_json(), exclusive=True)
        return record

    @contextmanager
    def _disk_errors(self, shard: int) -> Iterator[None]:
        """Disk full and a record committed meanwhile -> CacheError naming the shard."""
        try:
            yield
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


def _wait_all(futures: list[Future]) -> None:
    """Wait for every future, ignoring their errors (the caller is already raising one)."""
    for f in futures:
        try:
            f.result()
        except BaseException:  # noqa: BLE001
            pass


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    if len(a) == rows:
        return a
    out = np.zeros((rows,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out
