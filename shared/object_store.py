"""The object-store client: bytes under one URL prefix (s3://, gs://, any fsspec URL), by key.

`RemoteStore` is a thin layer over fsspec with the two writes the cache needs: a plain put and a
create-only put (S3 `If-None-Match: *`, a hard link on a local disk) that fails with
FileExistsError when the object exists. Errors: a missing object is FileNotFoundError; anything
else (network, credentials) is `RemoteError` naming the object.

Credentials and endpoint come from the backend's own configuration (for S3 the standard AWS
variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, or
~/.aws), plus $SAEFORGE_STORAGE_OPTIONS: a JSON object of fsspec storage options, e.g.
'{"endpoint_url": "http://127.0.0.1:9000"}' or '{"anon": true}'.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import xxhash

from shared.cache_errors import CacheError
from shared.durable import fsync_path, write_atomic

ENV_STORAGE_OPTIONS = "SAEFORGE_STORAGE_OPTIONS"


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
