"""How much disk a harvest will write, and whether the target file system has it.

`plan_space(out, spec, check)` runs before anything is written. The size counts the shards not
yet committed (a resumed harvest counts only what is left): each is rows_per_shard rows (chunk
files are padded to full size) x (sites x d_model x storage bytes + 4-byte token id + 4-byte
position). Compression can only make it smaller. For a folder, the free space of the file system
of --out (its nearest existing parent) must hold that plus a margin (MARGIN of it, at least
MARGIN_MIN: ledger records, metadata, the file system's own overhead); otherwise CacheError,
one line, before anything is created. For a URL the check is skipped, and the line says so.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.cache_errors import CacheError
from shared.cache_records import read_ledger
from shared.cache_spec import CacheSpec, read_group_spec, spec_differences
from shared.cache_storage import numpy_storage_dtype
from shared.object_store import is_remote

MARGIN = 0.05
MARGIN_MIN = 64 * 2**20


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclass(frozen=True)
class CacheSize:
    """Bytes of `shards` shards of a cache: rows x (sites x d_model x itemsize + 8)."""

    shards: int
    of_shards: int  # planned shards in all
    rows_per_shard: int
    n_sites: int
    d_model: int
    itemsize: int
    compressed: bool

    @property
    def bytes(self) -> int:
        return self.shards * self.rows_per_shard * (self.n_sites * self.d_model * self.itemsize + 8)

    def describe(self) -> str:
        left = f"{self.shards} of {self.of_shards} shards" if self.shards != self.of_shards else f"{self.shards} shards"
        return (f"{'at most ' if self.compressed else ''}{human_bytes(self.bytes)} ({left} x "
                f"{self.rows_per_shard:,} rows x {self.n_sites} sites x {self.d_model} x {self.itemsize} bytes "
                "+ token ids and positions)")


def pending_shards(out: str, spec: CacheSpec) -> list[int] | None:
    """Shards of `spec` that a harvest into the folder `out` still has to write; None when the
    folder holds something the writer will refuse anyway (another cache's spec, not a cache)."""
    root = Path(out)
    if not (root / "zarr.json").exists():
        return None if root.exists() and any(root.iterdir()) else list(range(spec.n_shards))
    try:
        existing, _ = read_group_spec(root)
    except CacheError:
        return None
    if spec_differences(existing, spec):
        return None
    if (root / "seal.json").exists():
        return []
    done = read_ledger(root).keys()
    return [k for k in range(spec.n_shards) if k not in done]


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def plan_space(out: str, spec: CacheSpec, check: bool = True) -> str | None:
    """The line to print before writing (None: nothing will be written, or the writer refuses
    the folder anyway). Raises CacheError when the file system of `out` lacks the room (check)."""
    itemsize = numpy_storage_dtype(spec.dtype).itemsize
    if is_remote(out):
        size = CacheSize(spec.n_shards, spec.n_shards, spec.rows_per_shard, len(spec.sites), spec.d_model, itemsize,
                         spec.compression != "none")
        return f"harvest: the cache takes {size.describe()} on {out}; free space not checked (a URL)"
    pending = pending_shards(out, spec)
    if not pending:
        return None
    size = CacheSize(len(pending), spec.n_shards, spec.rows_per_shard, len(spec.sites), spec.d_model, itemsize,
                     spec.compression != "none")
    where = _existing_parent(Path(out))
    free = shutil.disk_usage(where).free
    margin = max(int(size.bytes * MARGIN), MARGIN_MIN)
    if check and free < size.bytes + margin:
        raise CacheError(
            f"--out {out}: the cache needs {size.describe()} plus a {human_bytes(margin)} margin, but the file system "
            f"of {where} has {human_bytes(free)} free; free some space, choose another --out, or pass --no-space-check"
        )
    checked = "" if check else " (not checked: --no-space-check)"
    return f"harvest: writing {size.describe()} to {out}; {human_bytes(free)} free on {where}{checked}"
