"""The cache's JSON records, typed: ledger records, the seal, and the statistics inside them.

    ledger/shard-NNNNNN.json   ShardRecord  shard, rows, checksums {file: xxh3-128 hex},
                                            sizes {file: bytes}, stats {site: ShardStatistics}
    seal.json                  Seal         n_rows, n_shards, stats {site: SiteStatistics},
                                            software_version

Files are keyed 'acts/<site>', 'tokens', 'positions'. `to_json()` gives the bytes this software
writes (`json.dumps` of the fields in declaration order: format version 1, docs/CACHE_FORMAT.md);
`from_json()` reads them back and raises ValueError, KeyError or TypeError for bytes that are not
such a record, which `read_ledger` / `read_seal` turn into a CacheError naming the file.

Records are frozen. Indexing by field name (`seal["n_rows"]`) and comparing with a plain dict (the
JSON object) are kept for code written against the dict form; code here uses the attributes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.cache_errors import CacheError
from shared.cache_layout import Layout


class JsonRecord:
    """Base of the typed records: `to_dict()` is the JSON object, field for field, in order."""

    __hash__ = None  # records hold dicts and lists

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> bytes:
        """The record's file bytes, exactly as this software writes them."""
        return json.dumps(self.to_dict()).encode()

    def __getitem__(self, key: str) -> Any:
        """`record[name]` is `record.name` (for code written against the JSON object)."""
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == other
        return NotImplemented


def _plain(v: Any) -> Any:
    if isinstance(v, JsonRecord):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _object(d: Any, what: str) -> dict[str, Any]:
    """`d` if it is a JSON object; TypeError naming `what` otherwise."""
    if not isinstance(d, dict):
        raise TypeError(f"{what} is a JSON {type(d).__name__}, not an object")
    return d


def _numbers(v: Any, what: str) -> list[float]:
    if not isinstance(v, list):
        raise TypeError(f"{what} is a JSON {type(v).__name__}, not a list")
    return [float(x) for x in v]


@dataclass(frozen=True, eq=False)
class ShardStatistics(JsonRecord):
    """One site's sums over one shard (float64 totals, mergeable across shards).

    count: rows; sum_sq_norm: sum of ||x||^2; sum: the d_model column sums; max_abs: max |x|.
    """

    count: int
    sum_sq_norm: float
    sum: list[float]
    max_abs: float

    @classmethod
    def from_dict(cls, d: Any) -> "ShardStatistics":
        d = _object(d, "statistics")
        return cls(int(d["count"]), float(d["sum_sq_norm"]), _numbers(d["sum"], "sum"), float(d["max_abs"]))


@dataclass(frozen=True, eq=False)
class SiteStatistics(JsonRecord):
    """One site's statistics over several shards (the seal's, or merged from the ledger).

    mean_sq_norm: E||x||^2; mean: the mean vector (d_model); max_abs: max |x|;
    norm_scaling_factor: sqrt(d_model / mean_sq_norm), the factor that makes E||x||^2 = d_model.
    """

    count: int
    mean_sq_norm: float
    mean: list[float]
    max_abs: float
    norm_scaling_factor: float

    @classmethod
    def from_dict(cls, d: Any) -> "SiteStatistics":
        d = _object(d, "statistics")
        return cls(int(d["count"]), float(d["mean_sq_norm"]), _numbers(d["mean"], "mean"), float(d["max_abs"]),
                   float(d["norm_scaling_factor"]))


@dataclass(frozen=True, eq=False)
class ShardRecord(JsonRecord):
    """The ledger record that commits one shard (write-once: the shard is done when it exists).

    rows: real rows (the last shard of a short corpus may be short; its chunk files are padded).
    checksums, sizes: xxh3-128 hex and bytes of each chunk file, keyed by array name.
    stats: per-site ShardStatistics, in the order the sites were written.
    """

    shard: int
    rows: int
    checksums: dict[str, str]
    sizes: dict[str, int]
    stats: dict[str, ShardStatistics]

    @classmethod
    def from_json(cls, data: bytes | str) -> "ShardRecord":
        d = _object(json.loads(data), "the record")
        shard = int(d["shard"])
        return cls(
            shard=shard,
            rows=int(d["rows"]),
            checksums={str(k): str(v) for k, v in _object(d["checksums"], "checksums").items()},
            sizes={str(k): int(v) for k, v in _object(d["sizes"], "sizes").items()},
            stats={str(s): ShardStatistics.from_dict(v) for s, v in _object(d["stats"], "stats").items()},
        )


@dataclass(frozen=True, eq=False)
class Seal(JsonRecord):
    """seal.json, written last: the cache is complete.

    n_rows: real rows in all; n_shards: shards 0..n_shards-1, all committed; stats: per-site
    SiteStatistics merged over them; software_version: of the software that sealed it.
    """

    n_rows: int
    n_shards: int
    stats: dict[str, SiteStatistics]
    software_version: str | None = None

    @classmethod
    def from_json(cls, data: bytes | str) -> "Seal":
        d = _object(json.loads(data), "the seal")
        return cls(
            n_rows=int(d["n_rows"]),
            n_shards=int(d["n_shards"]),
            stats={str(s): SiteStatistics.from_dict(v) for s, v in _object(d["stats"], "stats").items()},
            software_version=d.get("software_version"),
        )


def read_ledger(root: str | os.PathLike) -> dict[int, ShardRecord]:
    """All committed shard records, by shard index. A corrupt record raises CacheError naming it."""
    layout = Layout(root)
    out = {}
    if not layout.ledger.is_dir():
        return out
    for p in sorted(layout.ledger.glob("shard-*.json")):
        rec = read_record(p)
        out[rec.shard] = rec
    return out


def read_record(path: Path) -> ShardRecord:
    """The ledger record in file `path`; CacheError naming the file if it is corrupt."""
    try:
        return ShardRecord.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(
            f"ledger record {path} is corrupt ({e}); `harvest verify --repair {path.parent.parent}` moves it aside and "
            "prints the harvest command that redoes that shard"
        ) from None


def read_seal(layout: Layout) -> Seal | None:
    """The seal of the cache at `layout`, or None when it is not sealed. CacheError if corrupt."""
    if not layout.seal.exists():
        return None
    try:
        return Seal.from_json(layout.seal.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{layout.where}: seal.json is corrupt ({e}); `harvest verify --repair {layout.where}` "
                         "moves it aside, then rerun the harvest command to seal again") from None
