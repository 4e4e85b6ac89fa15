"""Caches on object storage (s3://, gs://, any fsspec URL): the writer, and the public names.

A cache at a URL has the layout of a local one (docs/CACHE_FORMAT.md), one object per file, and
nothing on the store is ever renamed:

* chunk objects are plain puts (a shard's bytes are a pure function of the harvest settings);
* a ledger record is a create-only put (S3 `If-None-Match: *`, a hard link on a local disk), put
  only after every chunk object of its shard: the shard is committed when that put succeeds, and a
  second writer's put of the same record fails (FileExistsError) instead of replacing it;
* the root zarr.json is created with a create-only put too (it claims the URL), and the seal is
  put last.

`RemoteCacheWriter` (here) stages each shard in a local folder exactly as for a local cache,
uploads its chunk files, then puts its ledger record. Readers open a URL with `Cache.open(url)`
(shared.cache_sources picks the read-through mirror).

The parts, each in its own module:
    shared.object_store   RemoteStore, RemoteError, is_remote: the object-store client
    shared.remote_copy    RemoteCache: the local staging folder / mirror kept in step with the store
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.cache_errors import CacheError
from shared.cache_records import Seal, ShardRecord, read_record
from shared.cache_spec import CacheSpec, check_same_spec, parse_group_meta
from shared.cache_writer import CacheWriter, ShardWriter
from shared.durable import file_checksum, write_atomic
from shared.faults import fault_point
from shared.object_store import RemoteError, RemoteStore, is_remote
from shared.remote_copy import RemoteCache, local_folder

__all__ = ["RemoteCacheWriter", "RemoteError", "RemoteStore", "is_remote"]


class RemoteCacheWriter(ShardWriter):
    """The ShardWriter for a URL: stage each shard locally, upload it, commit it by its ledger record.

    `layout` is the staging cache's; `local` the CacheWriter of that staging cache, `remote` the
    RemoteCache that keeps it in step with the store. Use `create_or_open`.
    """

    def __init__(self, remote: RemoteCache, writer: CacheWriter):
        self.remote = remote
        self.local = writer
        self.spec = writer.spec
        self.layout = writer.layout

    @classmethod
    def create_or_open(cls, url: str, spec: CacheSpec, staging: str | os.PathLike | None = None,
                       rank: int = 0, storage_options: dict[str, Any] | None = None) -> "RemoteCacheWriter":
        """Create the cache at `url`, or reopen it if its spec matches exactly (CacheError naming
        every differing field otherwise; nothing is written). The staging folder may be fresh:
        the store's metadata, ledger and seal are pulled into it first.

        Rank 0 also publishes shards that an earlier run committed in this staging folder but did
        not get to put on the store (checked against their records first).
        """
        remote = RemoteCache(url, local_folder(url.rstrip("/"), "staging", staging), storage_options)
        remote.claim()
        store, where = remote.store, remote.url
        for _ in range(3):
            group = store.get_optional("zarr.json")
            if group is None:
                if store.list(""):
                    raise CacheError(f"{where} holds objects but is not an activation cache; choose an empty --out")
                remote.clear()
                writer = CacheWriter.create_or_open(remote.layout.root, spec, where=where)
                try:
                    store.put_create("zarr.json", writer.layout.group_meta.read_bytes())  # claims the URL
                except FileExistsError:
                    continue  # another writer created it meanwhile: compare specs on the next turn
                self = cls(remote, writer)
                self._push_metadata()
                return self
            existing, _ = parse_group_meta(group, where)
            check_same_spec(existing, spec, where)
            if remote._pull_metadata(group, existing, repair=True):
                # The creator was killed between the root and the array metadata: the arrays are a
                # function of the spec, so build them here and put them.
                remote.clear()
                CacheWriter.create_or_open(remote.layout.root, existing, where=where)
                write_atomic(remote.layout.group_meta, group)
                cls(remote, CacheWriter(remote.layout.root, existing, where))._push_metadata()
            local_only = remote.pull_ledger(existing)
            remote.pull_seal()
            self = cls(remote, CacheWriter.create_or_open(remote.layout.root, existing, where=where))
            if rank == 0:
                for shard in local_only:
                    self._publish_staged(shard)
            return self
        raise RemoteError(f"{where}: the cache kept changing while it was opened; retry")

    @staticmethod
    def claim_staging(url: str, staging: str | os.PathLike | None = None) -> Path:
        """The staging folder of a URL, created or checked (harvest locks it before opening)."""
        return RemoteCache(url, local_folder(url.rstrip("/"), "staging", staging)).claim()

    def done_shards(self) -> set[int]:
        return self.local.done_shards()

    def _record_key(self, shard: int) -> str:
        return self.layout.key(self.layout.record(shard))

    def write_shard(self, shard: int, acts, tokens, positions, stats=None) -> ShardRecord:
        """Write the shard into staging (CacheWriter.write_shard), upload it, put its record."""
        if self.remote.store.exists(self._record_key(shard)):  # committed by another writer meanwhile
            self.remote.pull_ledger(self.spec)
            return read_record(self.layout.record(shard))
        record = self.local.write_shard(shard, acts, tokens, positions, stats)
        self._publish(shard)
        return record

    def _publish(self, shard: int) -> None:
        """Upload a staged shard's chunk files, then put its record create-only (the commit)."""
        files = self.layout.chunk_files(self.spec.site_names, shard)
        self.remote.store.upload({self.layout.key(p): p for p in files.values()})
        fault_point("remote_record")
        key = self._record_key(shard)
        ours = self.layout.record(shard).read_bytes()
        try:
            self.remote.store.put_create(key, ours)
        except FileExistsError:  # another writer committed this shard first: its record stands
            theirs = _record_of(self.remote.store.get_bytes(key), self.remote.store.name(key), self.remote.url)
            if theirs.checksums != ShardRecord.from_json(ours).checksums:
                self.remote.pull_ledger(self.spec)
                raise RemoteError(
                    f"{self.remote.url}: shard {shard} was committed meanwhile by another writer with "
                    f"different bytes, and this writer had uploaded its own; run `harvest verify {self.remote.url}`"
                ) from None

    def _publish_staged(self, shard: int) -> None:
        """Publish a shard committed in staging only, if its files still match its record."""
        record = read_record(self.layout.record(shard))
        files = self.layout.chunk_files(self.spec.site_names, shard)
        if all(p.exists() and file_checksum(p) == record.checksums[n] for n, p in files.items()):
            self._publish(shard)
        else:  # redo the shard
            self.layout.record(shard).unlink()

    def _push_metadata(self) -> None:
        """Put the array metadata (after the root at creation; again at sealing, when shrunk)."""
        files = self.layout.array_meta_files(self.spec.site_names)
        self.remote.store.upload({self.layout.key(p): p for p in files})

    def seal(self, n_shards: int | None = None) -> Seal:
        """Seal from the ledger records (the store's, pulled: no chunk data is read), then put the
        array metadata (shrunk to the rows written) and seal.json last."""
        for shard in self.remote.pull_ledger(self.spec):
            self._publish_staged(shard)
        seal = self.local.seal(n_shards)
        self._push_metadata()
        fault_point("remote_seal")
        self.remote.store.put_bytes("seal.json", self.layout.seal.read_bytes())
        return seal


def _record_of(data: bytes, name: str, url: str) -> ShardRecord:
    """The ledger record in an object's bytes; RemoteError naming the object if it is not one."""
    try:
        return ShardRecord.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteError(f"ledger record {name} is corrupt ({e}); run `harvest verify {url}`") from None
