"""Durable files: writes that survive kill -9 and power loss, and checks of files against a record.

* `write_atomic` writes bytes to a temporary name, fsyncs it, renames (or, write-once, hard-links)
  it into place and fsyncs the folder: a reader sees the old file or the whole new one, never part.
* `fsync_path` fsyncs a file or a folder (a folder: so that a rename in it is durable).
* `file_checksum` is the xxh3-128 hex digest of a file's bytes (the cache ledger's checksum).
* `file_problem` says what is wrong with a file against its recorded size and checksum.
* `make_folder` creates a folder (and its parents), or says in one line why it cannot.

Used by the cache (shared/), checkpoints and run folders (train/) alike; knows nothing of either.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from shared.errors import UserError


class FolderError(UserError):
    """An output folder cannot be created; the message names it and the option to change."""


def make_folder(path: str | os.PathLike, option: str) -> Path:
    """mkdir -p `path`; FolderError naming it and `option` (e.g. "--out") when a file is in the way,
    the permission is missing or the disk refuses."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise FolderError(f"{option} {path}: {blocker} is a file, not a folder; choose a folder for {option}") from None
    except OSError as e:
        raise FolderError(f"{option} {path}: cannot create the folder ({e.strerror or e}); choose a writable "
                          f"{option}") from None
    return path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that its entries, e.g. a rename, are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write bytes to `path` via temp file + fsync + rename (+ dir fsync).

    exclusive=True makes the record write-once: if `path` exists, FileExistsError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if exclusive:
        try:
            os.link(tmp, path)  # atomic create-if-absent
        finally:
            os.unlink(tmp)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


def file_checksum(path: Path) -> str:
    """xxh3-128 hex digest of a file's bytes."""
    h = xxhash.xxh3_128()
    buf = bytearray(1 << 22)  # reused: a fresh bytes object per read costs page faults, not just the copy
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_problem(path: Path, size: int, checksum: str) -> str | None:
    """What is wrong with a committed file against its ledger entry ("is missing", "is N bytes,
    ledger says M", "fails its checksum"), or None when it matches."""
    if not path.exists():
        return "is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"is {actual} bytes, ledger says {size}"
    return "fails its checksum" if file_checksum(path) != checksum else None
