"""The local copy of a cache at a URL: harvest's staging folder, or a reader's read-through mirror.

Both are a local folder (one per URL, named by a hash of it) holding `remote.json` (naming the
URL), the harvest locks, and the cache itself in `cache/`, so that the cache code and memory maps
work on it unchanged. `RemoteCache` keeps it in step with the store:

* `pull` copies the store's metadata, ledger and seal into it (readers; harvest pulls the same
  on start, so the spec check and the resume work on any machine, with or without the staging
  folder of an earlier run). Records that changed on the store replace the local ones and drop
  their shard's local files;
* `fetch` downloads one chunk file when first read, checked against its ledger size and checksum
  before it is renamed into place: a corrupt or missing object is an error naming the shard and
  the object, and never reaches the mirror.

Folders: staging under $SAEFORGE_STAGING (default ~/.cache/saeforge/staging), mirrors under
$SAEFORGE_MIRROR (default ~/.cache/saeforge/mirror); or an explicit folder (`harvest run
--staging`, `Cache.open(url, mirror=...)`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from shared.cache_errors import CacheError
from shared.cache_layout import Layout
from shared.cache_spec import CacheSpec, parse_group_meta
from shared.durable import file_checksum, fsync_path, write_atomic
from shared.object_store import RemoteError, RemoteStore

ENV_STAGING = "SAEFORGE_STAGING"
ENV_MIRROR = "SAEFORGE_MIRROR"
MARKER = "remote.json"
_RECORD = re.compile(r"shard-(\d{6})\.json")


def local_folder(url: str, kind: str, explicit: str | os.PathLike | None = None) -> Path:
    """The local folder of a URL: `explicit`, else <$SAEFORGE_STAGING|MIRROR or ~/.cache/saeforge/kind>/<hash>."""
    if explicit:
        return Path(explicit)
    env = ENV_STAGING if kind == "staging" else ENV_MIRROR
    base = Path(os.environ.get(env) or Path.home() / ".cache" / "saeforge" / kind)
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class RemoteCache:
    """A cache at a URL and the local folder that mirrors it (readers) or stages it (harvest).

    The local folder holds `remote.json` ({"url": ...}), the harvest locks, and the cache in
    `cache/`; `layout` is that cache's Layout (messages name the URL).
    """

    def __init__(self, url: str, folder: Path, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.folder = Path(folder)
        self.layout = Layout(self.folder / "cache", where=self.url)
        self._storage_options = storage_options
        self._store: RemoteStore | None = None
        self._fetch_lock = threading.Lock()

    @classmethod
    def mirror(cls, url: str, folder: str | os.PathLike | None = None,
               storage_options: dict[str, Any] | None = None) -> "RemoteCache":
        """The read-through mirror of a URL, its folder claimed (created or checked)."""
        remote = cls(url, local_folder(url.rstrip("/"), "mirror", folder), storage_options)
        remote.claim()
        return remote

    @classmethod
    def of_local_copy(cls, root: Path, storage_options: dict[str, Any] | None = None) -> "RemoteCache | None":
        """The RemoteCache of a mirror (or staging) cache folder opened by its path; None for a plain cache."""
        marker = root.parent / MARKER
        if root.name != "cache" or not marker.is_file():
            return None
        try:
            url = json.loads(marker.read_text())["url"]
        except (ValueError, KeyError, TypeError):
            return None
        return cls(url, root.parent, storage_options)

    @property
    def store(self) -> RemoteStore:
        if self._store is None:  # connect lazily: opening a mirror by its path needs no network
            self._store = RemoteStore(self.url, self._storage_options)
        return self._store

    # ------------------------------------------------------------------ the local folder

    def claim(self) -> Path:
        """Create the local folder, or check that it is this URL's; returns it."""
        marker = self.folder / MARKER
        if marker.is_file():
            try:
                url = json.loads(marker.read_text()).get("url")
            except ValueError:
                url = None
            if url != self.url:
                raise CacheError(f"{self.folder} is the local copy of {url!r}, not {self.url}; choose another folder")
            return self.folder
        if self.folder.exists() and any(self.folder.iterdir()):
            raise CacheError(f"{self.folder} is not empty and is not a local copy of {self.url}; choose an empty folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"url": self.url}).encode())
        return self.folder

    def clear(self) -> None:
        """Forget the local copy of the cache (the URL holds another cache, or none)."""
        if self.layout.root.exists():
            trash = self.folder / f".trash.{uuid.uuid4().hex}"
            os.rename(self.layout.root, trash)  # one atomic step, then delete at leisure
            shutil.rmtree(trash)

    def _write_local(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def _drop_shard_files(self, spec: CacheSpec, shard: int) -> None:
        for path in self.layout.chunk_files(spec.site_names, shard).values():
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ pulling

    def pull(self) -> CacheSpec:
        """Bring the local copy in step with the store: metadata, seal, ledger (readers).

        Chunk files of shards whose record changed or vanished are deleted, so every chunk file
        in the mirror belongs to the record beside it.
        """
        group = self.store.get_optional("zarr.json")
        if group is None:
            raise CacheError(f"{self.url} is not an activation cache (no zarr.json); harvest one first")
        spec, _ = parse_group_meta(group, self.url)
        self._pull_metadata(group, spec, repair=False)
        for shard in self.pull_ledger(spec):
            self._drop_shard_files(spec, shard)
            self.layout.record(shard).unlink(missing_ok=True)
        self.pull_seal()
        return spec

    def _pull_metadata(self, group: bytes, spec: CacheSpec, repair: bool) -> list[Path]:
        """Copy the root and array metadata into the local cache; a different root clears it first.

        Returns the local metadata files the store lacks (a creator killed before putting them);
        without `repair` that is an error.
        """
        local_group = self.layout.group_meta
        if local_group.exists() and local_group.read_bytes() != group:
            self.clear()  # another cache now lives at this URL
        files = self.layout.array_meta_files(spec.site_names)
        got = self.store.get_many([self.layout.key(p) for p in files])
        missing = [p for p in files if got[self.layout.key(p)] is None]
        if missing and not repair:
            raise CacheError(
                f"{self.url}: metadata object {self.layout.key(missing[0])} is missing (creation was "
                "interrupted); rerun the harvest command to finish the cache"
            )
        for p in files:
            if got[self.layout.key(p)] is not None:
                self._write_local(p, got[self.layout.key(p)])
        self._write_local(local_group, group)
        self.layout.ledger.mkdir(exist_ok=True)
        return missing

    def pull_ledger(self, spec: CacheSpec) -> list[int]:
        """Copy the store's ledger records into the local ledger; returns the local-only shards.

        A local record that differs from the store's is replaced (the store wins) and its shard's
        local chunk files are deleted.
        """
        on_store = {k: v for k, (_, v) in self.store.list("ledger").items() if _RECORD.fullmatch(k.rsplit("/", 1)[-1])}
        local = {p.name for p in self.layout.ledger.glob("shard-*.json")} if self.layout.ledger.is_dir() else set()
        # Which record versions the local copies are (records are write-once, but an operator may
        # delete one to redo its shard): fetch only new or replaced records.
        index_path = self.folder / "ledger-index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        wanted = [k for k, v in on_store.items() if k.rsplit("/", 1)[-1] not in local or index.get(k) != v]
        for key, data in self.store.get_many(wanted).items():
            if data is None:
                continue  # deleted meanwhile
            shard = int(_RECORD.fullmatch(key.rsplit("/", 1)[-1]).group(1))
            record = self.layout.record(shard)
            if record.exists() and record.read_bytes() != data:
                self._drop_shard_files(spec, shard)  # the store's record wins; its files differ
            self._write_local(record, data)
            index[key] = on_store[key]
        if wanted:
            write_atomic(index_path, json.dumps(index).encode())
        names = {k.rsplit("/", 1)[-1] for k in on_store}
        return sorted(int(_RECORD.fullmatch(n).group(1)) for n in local if n not in names)

    def pull_seal(self) -> None:
        seal = self.store.get_optional("seal.json")
        if seal is None:
            self.layout.seal.unlink(missing_ok=True)
        else:
            self._write_local(self.layout.seal, seal)

    # ------------------------------------------------------------------ reading

    def fetch(self, path: Path, size: int, checksum: str, what: str) -> None:
        """Download one chunk file into the mirror: temp file, size and checksum checked against
        the ledger, fsync, rename into place. RemoteError naming the shard and object otherwise."""
        key = self.layout.key(path)
        name = self.store.name(key)
        with self._fetch_lock:
            if path.exists():
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part.{os.getpid()}")
            try:
                try:
                    self.store.download(key, tmp)
                except FileNotFoundError:
                    raise RemoteError(f"{self.url}: {what} object {name} is missing; re-harvest that shard") from None
                got = tmp.stat().st_size
                if got != size:
                    raise RemoteError(
                        f"{self.url}: {what} object {name} is {got} bytes, the ledger says {size} "
                        "(truncated or replaced); re-harvest that shard"
                    )
                if file_checksum(tmp) != checksum:
                    raise RemoteError(
                        f"{self.url}: {what} object {name} fails its ledger checksum (corrupt or replaced); "
                        "re-harvest that shard"
                    )
                fsync_path(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def checksum(self, path: Path) -> str | None:
        """xxh3-128 of the object behind a local cache path, streamed from the store; None if missing."""
        return self.store.checksum(self.layout.key(path))

    def total_bytes(self) -> int:
        return sum(size for size, _ in self.store.list("").values())
