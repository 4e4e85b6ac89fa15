"""What identifies a cache (its provenance): `CacheSpec`, `SiteRecord`, and the checks on them.

The spec is stored in the root zarr.json's attributes (`attributes["saeforge"]`: `format_version`,
`software_version`, `spec`; docs/CACHE_FORMAT.md). Two runs may share a cache only if their specs
agree field for field; `check_same_spec` names every field that differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from shared.cache_errors import CacheError
from shared.cache_layout import Layout
from shared.cache_storage import COMPRESSIONS, STORAGE_DTYPES

FORMAT_VERSION = 1


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("saeforge")
    except Exception:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


@dataclass(frozen=True)
class SiteRecord:
    """One hooked site: TransformerLens name, layer, kind and the HF module it hooks.

    hf_io: "input" or "output": which of `hf_module`'s tensors the site is. Recorded for the kinds
    read inside a block (mlp_in: the pre-MLP norm's output; resid_mid: that norm's input); None,
    and left out of the JSON, for the four original kinds, whose records stay byte-identical to
    those of caches written before it existed (resid_pre is the block's input, the others a
    module's output: see `io`).
    """

    name: str
    layer: int
    kind: str
    hf_module: str
    hf_io: str | None = None

    @property
    def io(self) -> str:
        """"input" or "output" of `hf_module`, for every kind."""
        return self.hf_io or ("input" if self.kind == "resid_pre" else "output")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record (hf_io only when set)."""
        d = dataclasses.asdict(self)
        if d["hf_io"] is None:
            del d["hf_io"]
        return d


@dataclass
class CacheSpec:
    """Everything that identifies a cache. Two runs may share a cache only if these agree.

    rows_per_shard: rows (tokens) in one shard, a multiple of context_length.
    planned_rows: rows the run intends to write (the token budget rounded up to whole contexts).
    """

    model: dict[str, Any]
    dataset: dict[str, Any]
    context_length: int
    bos_policy: dict[str, Any]
    sites: list[SiteRecord]
    d_model: int
    dtype: str
    rows_per_shard: int
    planned_rows: int
    compression: str = "none"

    def __post_init__(self) -> None:
        self.sites = [s if isinstance(s, SiteRecord) else SiteRecord(**s) for s in self.sites]
        if self.dtype not in STORAGE_DTYPES:
            raise CacheError(f"storage dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise CacheError(f"compression {self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if self.rows_per_shard <= 0 or self.rows_per_shard % self.context_length:
            raise CacheError(
                f"rows_per_shard={self.rows_per_shard} must be a positive multiple of "
                f"context_length={self.context_length}"
            )
        if self.planned_rows <= 0:
            raise CacheError(f"planned_rows={self.planned_rows} must be positive")
        if len({s.name for s in self.sites}) != len(self.sites) or not self.sites:
            raise CacheError("sites must be a non-empty list of distinct hook sites")

    @property
    def n_shards(self) -> int:
        """Shards planned: ceil(planned_rows / rows_per_shard)."""
        return -(-self.planned_rows // self.rows_per_shard)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sites"] = [s.to_dict() for s in self.sites]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheSpec":
        return cls(**d)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def spec_differences(existing: CacheSpec, requested: CacheSpec) -> list[str]:
    """Names of the fields (dotted) where two specs disagree, e.g. ['sites', 'context_length']."""
    a, b = existing.to_dict(), requested.to_dict()
    diffs = []
    for key in a:
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            fa, fb = _flatten(a[key], key), _flatten(b[key], key)
            diffs += sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        elif a[key] != b[key]:
            diffs.append(key)
    return diffs


def read_group_spec(root: str | os.PathLike, where: str | None = None) -> tuple[CacheSpec, dict[str, Any]]:
    """(spec, attributes) read from a cache's group metadata; CacheError if not a cache."""
    layout = Layout(root, where)
    if not layout.group_meta.exists():
        raise CacheError(f"{layout.where} is not an activation cache (no zarr.json); harvest one first")
    return parse_group_meta(layout.group_meta.read_bytes(), layout.where)


def parse_group_meta(data: bytes, where: str) -> tuple[CacheSpec, dict[str, Any]]:
    """(spec, attributes) from the bytes of a cache's root zarr.json; `where` names it in errors."""
    try:
        attrs = json.loads(data)["attributes"]["saeforge"]
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{where}/zarr.json has no readable saeforge attributes ({e})") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{where}: cache format version {attrs.get('format_version')} is not supported "
            f"(this software reads version {FORMAT_VERSION})"
        )
    return CacheSpec.from_dict(attrs["spec"]), attrs


def check_same_spec(existing: CacheSpec, requested: CacheSpec, where: str) -> None:
    """CacheError naming every field (up to 4) where a run's spec differs from its cache's."""
    diffs = spec_differences(existing, requested)
    if diffs:
        detail = "; ".join(
            f"{k}: cache has {_flatten(existing.to_dict()).get(k)!r}, "
            f"this run asks {_flatten(requested.to_dict()).get(k)!r}"
            for k in diffs[:4]
        )
        raise CacheError(
            f"{where} was harvested with different settings ({detail}); "
            "use a new --out or rerun with the original settings"
        )
