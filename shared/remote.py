"""Caches on object storage: s3://, gs:// and any other fsspec URL.

A cache at a URL has the layout of a local one (docs/CACHE_FORMAT.md), one object per file, and
nothing on the store is ever renamed:

* chunk objects are plain puts (a shard's bytes are a pure function of the harvest settings);
* a ledger record is a create-only put (S3 `If-None-Match: *`, a hard link on a local disk), put
  only after every chunk object of its shard: the shard is committed when that put succeeds, and a
  second writer's put of the same record fails (FileExistsError) instead of replacing it;
* the root zarr.json is created with a create-only put too (it claims the URL), and the seal is
  put last.

Both stages work on a local folder that this module keeps in step with the store, so the code of
`shared.cache` (and memory maps) work unchanged:

* harvest (`RemoteCacheWriter`) stages each shard in a local folder exactly as for a local cache,
  uploads its chunk files, then puts its ledger record. On start it pulls the store's metadata,
  ledger and seal first, so the spec check and the resume (skip committed shards) work on any
  machine, with or without the staging folder of an earlier run;
* readers (`Cache.open(url)`) get a read-through mirror: metadata, ledger and seal are copied
  eagerly, each chunk file when first read, checked against its ledger size and checksum before it
  is renamed into place. A corrupt or missing object is an error naming the shard and the object.

Local folders (one per URL, named by a hash of it; each holds `remote.json` naming the URL and the
cache itself in `cache/`): staging under $SAEFORGE_STAGING (default ~/.cache/saeforge/staging),
mirrors under $SAEFORGE_MIRROR (default ~/.cache/saeforge/mirror); or an explicit folder
(`harvest run --staging`, `Cache.open(url, mirror=...)`).

Credentials and endpoint come from the backend's own configuration (for S3 the standard AWS
variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, or
~/.aws), plus $SAEFORGE_STORAGE_OPTIONS: a JSON object of fsspec storage options, e.g.
'{"endpoint_url": "http://127.0.0.1:9000"}' or '{"anon": true}'.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import xxhash

from shared.cache_errors import CacheError
from shared.cache_layout import Layout
from shared.cache_records import Seal, ShardRecord, read_ledger, read_record
from shared.cache_spec import CacheSpec, check_same_spec, parse_group_meta
from shared.cache_writer import CacheWriter, ShardWriter
from shared.durable import file_checksum, fsync_path, write_atomic
from shared.faults import fault_point

ENV_STORAGE_OPTIONS = "SAEFORGE_STORAGE_OPTIONS"
ENV_STAGING = "SAEFORGE_STAGING"
ENV_MIRROR = "SAEFORGE_MIRROR"
MARKER = "remote.json"
_RECORD = re.compile(r"shard-(\d{6})\.json")


class RemoteError(CacheError):
    """An object-store operation failed; the message names the URL and the object."""


def is_remote(path: Any) -> bool:
    """True for a URL ('s3://bucket/acts', 'gs://...', 'memory://...'): a str with '://'."""
    return isinstance(path, str) and "://" in path


def storage_options_from_env() -> dict[str, Any]:
    """fsspec storage options from $SAEFORGE_STORAGE_OPTIONS (a JSON object), or {}."""
    text = os.environ.get(ENV_STORAGE_OPTIONS, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        raise CacheError(f"${ENV_STORAGE_OPTIONS} is not valid JSON ({e})") from None
    if not isinstance(options, dict):
        raise CacheError(f"${ENV_STORAGE_OPTIONS} must be a JSON object of fsspec storage options")
    return options


def local_folder(url: str, kind: str, explicit: str | os.PathLike | None = None) -> Path:
    """The local folder of a URL: `explicit`, else <$SAEFORGE_STAGING|MIRROR or ~/.cache/saeforge/kind>/<hash>."""
    if explicit:
        return Path(explicit)
    env = ENV_STAGING if kind == "staging" else ENV_MIRROR
    base = Path(os.environ.get(env) or Path.home() / ".cache" / "saeforge" / kind)
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the store


class RemoteStore:
    """Bytes under one URL prefix, by key ('ledger/shard-000001.json'); a thin layer over fsspec.

    Errors: a missing object is FileNotFoundError, a create-only put on an existing key is
    FileExistsError; anything else (network, credentials) is RemoteError naming the object.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/")
        options = {**storage_options_from_env(), **(storage_options or {})}
        try:
            # a fresh instance: fsspec's cache would keep one endpoint / listing cache per process
            self.fs, root = url_to_fs(self.url, skip_instance_cache=True, **options)
        except (ImportError, ValueError, TypeError) as e:
            raise RemoteError(
                f"{self.url}: cannot open this URL ({e}); s3:// needs s3fs, gs:// needs gcsfs"
            ) from None
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def name(self, key: str) -> str:
        """The object's URL, for messages."""
        return f"{self.url}/{key}" if key else self.url

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        # fsspec caches listings, and some reads consult them (s3fs cat_file): another writer may
        # have changed the store since, so every operation starts from a clean slate.
        self.fs.invalidate_cache()
        try:
            yield
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.name(key)) from None
        except (FileExistsError, RemoteError):
            raise
        except Exception as e:  # network, credentials, permissions: name the object
            raise RemoteError(f"{self.name(key)}: {type(e).__name__}: {e}") from None

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.fs.cat_file(self.path(key))

    def get_optional(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        try:
            return self.get_bytes(key)
        except FileNotFoundError:
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Several small objects at once (concurrent requests where the backend can); None if missing."""
        if not keys:
            return {}
        paths = [self.path(k) for k in keys]
        with self._errors(keys[0].rsplit("/", 1)[0]):
            got = self.fs.cat(paths, on_error="return")
        out = {}
        for key, p in zip(keys, paths):
            value = got.get(p)
            if isinstance(value, FileNotFoundError):
                value = None
            elif isinstance(value, Exception):
                raise RemoteError(f"{self.name(key)}: {type(value).__name__}: {value}")
            out[key] = value
        return out

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            if self.local:
                write_atomic(self._local_path(key), data)
            else:
                self.fs.pipe_file(self.path(key), data)

    def put_create(self, key: str, data: bytes) -> None:
        """Write-once put: FileExistsError if the object exists.

        Atomic on S3 (If-None-Match: *) and local disks (hard link); other backends get their own
        pipe_file(mode="create"), atomic only where the backend makes it so.
        """
        with self._errors(key):
            if self.local:
                write_atomic(self._local_path(key), data, exclusive=True)
            else:
                self.fs.pipe_file(self.path(key), data, mode="create")

    def upload(self, files: dict[str, Path]) -> None:
        """Put local files (key -> path), concurrently where the backend can."""
        if not files:
            return
        keys = list(files)
        with self._errors(keys[0]):
            if self.local:  # temp file, fsync, rename: as for a local cache
                for key, src in files.items():
                    dest = self._local_path(key)
                    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
                    shutil.copyfile(src, tmp)
                    fsync_path(tmp)
                    os.replace(tmp, dest)
            else:
                self.fs.put([str(files[k]) for k in keys], [self.path(k) for k in keys])

    def download(self, key: str, dest: Path) -> None:
        """Copy an object to a local file (no rename, no check: see RemoteCache.fetch)."""
        with self._errors(key):
            self.fs.get_file(self.path(key), str(dest))

    def checksum(self, key: str) -> str | None:
        """xxh3-128 hex of an object's bytes, streamed; None if there is no such object."""
        h = xxhash.xxh3_128()
        try:
            with self._errors(key), self.fs.open(self.path(key), "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
        except FileNotFoundError:
            return None
        return h.hexdigest()

    def exists(self, key: str) -> bool:
        with self._errors(key):
            return bool(self.fs.exists(self.path(key)))

    def list(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """Keys under a prefix (recursive): (size in bytes, version) of each.

        version changes when an object is replaced: its ETag / generation where the store has
        one, else its size and modification time.
        """
        with self._errors(prefix):
            try:
                found = self.fs.find(self.path(prefix), detail=True)
            except FileNotFoundError:
                return {}
        cut = len(self.root) + 1
        out = {}
        for p, info in found.items():
            if info.get("type") == "directory":
                continue
            size = int(info.get("size") or 0)
            version = next((str(info[k]) for k in ("ETag", "etag", "generation", "md5Hash") if info.get(k)), None)
            out[p[cut:]] = (size, version or f"{size}:{info.get('mtime') or info.get('LastModified') or info.get('created')}")
        return out

    def _local_path(self, key: str) -> Path:
        path = Path(self.path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------- store <-> local folder


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


# --------------------------------------------------------------------------- harvest


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

    def write_shard(self, shard: int, acts, tokens, positions) -> ShardRecord:
        """Write the shard into staging (CacheWriter.write_shard), upload it, put its record."""
        if self.remote.store.exists(self._record_key(shard)):  # committed by another writer meanwhile
            self.remote.pull_ledger(self.spec)
            return read_ledger(self.layout.root)[shard]
        record = self.local.write_shard(shard, acts, tokens, positions)
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
            theirs = self.remote.store.get_bytes(key)
            if _record_of(theirs, self.remote.store.name(key), self.remote.url).checksums != ShardRecord.from_json(ours).checksums:
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
