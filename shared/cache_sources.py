"""Where a reader's bytes come from: a cache folder, or the read-through mirror of a URL.

`open_source(root)` is the one place that tells a local path from a URL. It hands `Cache` a
`CacheSource`, which knows the local folder the reader maps files from (`root`), how messages
name the cache (`where`: its folder, or its URL), and three things that differ between the two:

* `ensure_file`: make a committed chunk file present before it is read (a mirror downloads it,
  checked against the ledger's size and checksum; a folder has nothing to do);
* `check_file`: what is wrong with a committed file against its ledger entry (`verify`): the file
  on disk, or for a URL the object on the store (streamed, not copied into the mirror);
* `total_bytes`: of the folder, or of the objects on the store.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from shared.cache_layout import Layout
from shared.durable import file_problem
from shared.object_store import is_remote
from shared.remote_copy import RemoteCache


class CacheSource(ABC):
    """A cache's bytes as a reader sees them. root: the local cache folder; where: its name in messages."""

    root: Path
    where: str

    @abstractmethod
    def ensure_file(self, path: Path, size: int, checksum: str, what: str) -> None:
        """Make the committed file `path` (size bytes, xxh3-128 `checksum`) present locally, or raise
        CacheError naming `what` (e.g. 'shard 3 (tokens)'); a missing local file is the reader's to report."""

    @abstractmethod
    def check_file(self, path: Path, size: int, checksum: str) -> tuple[str, str | None]:
        """(how messages name the file, what is wrong with it or None) against its ledger entry."""

    @abstractmethod
    def total_bytes(self) -> int:
        """Bytes the cache takes where it lives."""


class LocalSource(CacheSource):
    """A cache folder read in place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = str(self.root)

    def ensure_file(self, path: Path, size: int, checksum: str, what: str) -> None:
        return None

    def check_file(self, path: Path, size: int, checksum: str) -> tuple[str, str | None]:
        return f"file {path}", file_problem(path, size, checksum)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


class MirrorSource(CacheSource):
    """The read-through mirror of a cache at a URL: chunk files are fetched when first read."""

    def __init__(self, remote: RemoteCache):
        self.remote = remote
        self.root = remote.layout.root
        self.where = remote.url

    def ensure_file(self, path: Path, size: int, checksum: str, what: str) -> None:
        if not path.exists():  # download, check size and checksum against the ledger, rename into place
            self.remote.fetch(path, size, checksum, what)

    def check_file(self, path: Path, size: int, checksum: str) -> tuple[str, str | None]:
        digest = self.remote.checksum(path)  # None when the object is missing
        problem = "is missing" if digest is None else "fails its checksum" if digest != checksum else None
        return f"object {self.remote.url}/{Layout(self.root).key(path)}", problem

    def total_bytes(self) -> int:
        return self.remote.total_bytes()


def open_source(root: str | os.PathLike, mirror: str | os.PathLike | None = None,
                storage_options: dict[str, Any] | None = None) -> CacheSource:
    """The source of the cache at `root`: a URL's mirror (its metadata, ledger and seal pulled now,
    into `mirror` or the default folder), a mirror folder opened by its path (reads through to its
    URL, connecting only when a file is missing), or a plain cache folder."""
    if is_remote(root):
        remote = RemoteCache.mirror(str(root), mirror, storage_options)
        remote.pull()
        return MirrorSource(remote)
    remote = RemoteCache.of_local_copy(Path(root), storage_options)
    return MirrorSource(remote) if remote is not None else LocalSource(Path(root))
