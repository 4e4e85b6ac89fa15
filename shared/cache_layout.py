"""Where each file of a cache folder lives (the only code that knows file names) and the one edit
of array metadata the cache makes (`set_array_rows`).

    PATH/zarr.json                      group; attributes["saeforge"] = the CacheSpec + versions
    PATH/acts/<site>/zarr.json          [n_rows, d_model] activations, one chunk per shard
    PATH/acts/<site>/c/<k>/0            shard k of that site
    PATH/tokens/, PATH/positions/       [n_rows] int32 token ids / positions in context (chunk c/<k>)
    PATH/ledger/shard-000123.json       write-once record of shard 123 (shared.cache_records)
    PATH/seal.json                      written last
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.durable import write_atomic


class Layout:
    """Paths inside one cache folder; the only place that knows file names.

    where: how messages name the cache (its URL when the folder is a local copy of one).
    """

    def __init__(self, root: str | os.PathLike, where: str | None = None):
        self.root = Path(root)
        self.where = where or str(self.root)

    def key(self, path: Path) -> str:
        """A file's key relative to the cache root ('ledger/shard-000001.json'): its object name on a store."""
        return Path(path).relative_to(self.root).as_posix()

    def acts(self, site: str) -> Path:
        return self.root / "acts" / site

    def acts_chunk(self, site: str, shard: int) -> Path:
        return self.acts(site) / "c" / str(shard) / "0"

    def vector_chunk(self, name: str, shard: int) -> Path:
        return self.root / name / "c" / str(shard)

    @property
    def ledger(self) -> Path:
        return self.root / "ledger"

    def record(self, shard: int) -> Path:
        return self.ledger / f"shard-{shard:06d}.json"

    @property
    def seal(self) -> Path:
        return self.root / "seal.json"

    @property
    def group_meta(self) -> Path:
        return self.root / "zarr.json"

    def array_meta_files(self, site_names: list[str]) -> list[Path]:
        """The zarr.json of every array and inner group (all metadata but the root group's)."""
        return [self.root / "acts" / "zarr.json", *(self.acts(s) / "zarr.json" for s in site_names),
                self.root / "tokens" / "zarr.json", self.root / "positions" / "zarr.json"]

    def chunk_files(self, site_names: list[str], shard: int) -> dict[str, Path]:
        """Every chunk file of one shard, keyed by array name ('acts/<site>', 'tokens', 'positions')."""
        files = {f"acts/{s}": self.acts_chunk(s, shard) for s in site_names}
        files["tokens"] = self.vector_chunk("tokens", shard)
        files["positions"] = self.vector_chunk("positions", shard)
        return files


def set_array_rows(array_dir: Path, n_rows: int) -> None:
    """Shrink an array's first dimension in its zarr.json. Unlike zarr's resize this does not
    visit the (never written) chunks past the end, which for a large budget on a short corpus
    would be hundreds of thousands of deletions."""
    meta_path = array_dir / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = n_rows
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())
