"""`harvest verify --repair`: the documented recovery for bad or missing shards.

A shard is done only when its ledger record exists, and `harvest run` on an unsealed cache redoes
exactly the shards without a record (see shared/cache_writer.py). So the repair is:

1. check every ledger record (readable JSON naming its own shard) and every committed shard's
   chunk files (present, size and checksum as recorded);
2. move each bad shard's record, and the files that failed, into
   ``PATH/ledger/quarantine/<UTC time>/`` (nothing is deleted);
3. move the seal there too (unseal) and give the arrays back their planned length (a seal shrinks
   them to the rows of a short corpus), so that the cache is open for writing again;
4. print the `harvest run` command, rebuilt from the cache's provenance, that re-harvests exactly
   those shards and seals the cache again.

The rerun makes the same bytes as the original harvest when it runs on the same kind of device
with the same --batch-size (the cache records neither; the command uses the defaults).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from harvest.runner import writer_lock
from harvest.selection import format_layers, site_kinds
from shared.cache import CacheError, CacheSpec, Layout
from shared.cache_records import Seal, ShardRecord
from shared.cache_layout import set_array_rows
from shared.cache_spec import read_group_spec
from shared.durable import file_problem
from shared.hook_sites import SITE_KINDS

QUARANTINE = "quarantine"


@dataclass
class RepairReport:
    """What `repair_cache` found and did.

    problems: one line per bad or missing shard (the same wording as `harvest verify`).
    bad_shards: shards whose ledger record was moved aside (they will be re-harvested).
    missing_shards: planned shards without a record (re-harvested too; nothing to move).
    moved: (from, to) of every file moved into the quarantine folder.
    needs_rerun: whether the cache needs a harvest rerun before it can be used.
    command: the `harvest run` command that finishes the repair (None when not needed, or when the
    provenance does not name a model and dataset).
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    bad_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    moved: list[tuple[Path, Path]] = field(default_factory=list)
    quarantine: Path | None = None
    needs_rerun: bool = False
    command: str | None = None

    @property
    def repaired(self) -> bool:
        """True when the cache needs a harvest rerun (`command`) before it can be used."""
        return self.needs_rerun

    @property
    def exit_code(self) -> int:
        """0: nothing was wrong; 1: repaired, rerun `command` to finish."""
        return 1 if self.repaired else 0

    def lines(self) -> list[str]:
        """Human-readable report, one line each, the command last."""
        if not self.repaired:
            return [f"ok: nothing to repair in {self.path}"]
        out = list(self.problems)
        redo = sorted(set(self.bad_shards) | set(self.missing_shards))
        if self.moved:
            out.append(f"moved {len(self.moved)} file(s) aside into {self.quarantine} (nothing was deleted)")
        unsealed = any(src.name == "seal.json" for src, _ in self.moved)
        state = f"unsealed {self.path}" if unsealed else f"{self.path} is not sealed (harvest unfinished)"
        out.append(f"{state}; shards {_ranges(redo)} will be re-harvested")
        if self.command is None:
            out.append("to finish the repair, rerun the harvest command that made this cache (its provenance "
                       "does not name the model and dataset, so it cannot be rebuilt here)")
            return out
        out.append("to finish the repair, rerun (on the same kind of device and with the original --batch-size):")
        out.append(f"  {self.command}")
        return out


def repair_cache(path: str | os.PathLike) -> RepairReport:
    """Verify the cache at `path`; quarantine bad shards' records and the seal; say what to rerun.

    Raises CacheError if `path` is not a cache or a harvest is writing it right now. Running it
    again before the rerun finds the same missing shards and moves nothing more.
    """
    if "://" in str(path):
        raise CacheError(f"{path}: repair works on a local cache folder; repair a local copy, or rerun the "
                         "harvest command on the URL after deleting the bad shards' objects")
    root = Path(path)
    spec, _ = read_group_spec(root)
    layout = Layout(root)
    report = RepairReport(root)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    quarantine = layout.ledger / QUARANTINE / stamp
    for i in range(2, 1000):  # a second repair within the same second gets its own folder
        if not quarantine.exists():
            break
        quarantine = layout.ledger / QUARANTINE / f"{stamp}-{i}"
    with _no_writer(root):
        seal, seal_problem = _read_seal(layout)
        records, bad_files = _check_records(layout, spec, report)
        n = seal.n_shards if seal is not None else spec.n_shards
        for k in range(n):
            if k not in records and k not in report.bad_shards:
                report.missing_shards.append(k)
                report.problems.append(f"shard {k}: missing (no ledger record)")
        if seal_problem:
            report.problems.append(seal_problem)
        if not report.problems:
            return report
        report.needs_rerun = True
        report.command = harvest_command(root, spec)
        if seal is None and not report.bad_shards:
            return report  # unsealed with only missing shards: an unfinished harvest, nothing to move
        # Moved files are renamed 'ledger__shard-000003.json', 'acts__<site>__c__3__0', ...: nothing
        # that looks for records ('shard-*.json', even recursively) can take them for committed ones.
        for k in sorted(report.bad_shards):
            for src in bad_files.get(k, []):
                rel = src.relative_to(root)
                dest = quarantine / f"shard-{k:06d}" / rel.as_posix().replace("/", "__")
                _move(src, dest, report)
        if layout.seal.exists():
            _move(layout.seal, quarantine / layout.seal.name, report)
        _restore_planned_rows(root, spec)
        if report.moved:
            report.quarantine = quarantine
    return report


def harvest_command(root: str | os.PathLike, spec: CacheSpec) -> str | None:
    """The `harvest run` command whose cache identity equals `spec` (so it resumes `root`); None if
    the provenance does not name a model and dataset, or its sites are not every kind at every
    layer in the order the command makes them (sorted layers, block order of kinds)."""
    model = spec.model.get("id")
    dataset = spec.dataset.get("path") if spec.dataset.get("kind") == "file" else spec.dataset.get("id")
    kinds = list(dict.fromkeys(s.kind for s in spec.sites))
    if not model or not dataset or not set(kinds) <= set(SITE_KINDS):
        return None
    kinds, layers = site_kinds(kinds), sorted({s.layer for s in spec.sites})
    if [(s.layer, s.kind) for s in spec.sites] != [(L, k) for L in layers for k in kinds]:
        return None
    args = ["harvest", "run", "--model", model, "--dataset", dataset, "--out", str(root), "--layer", format_layers(layers)]
    for kind in kinds:
        args += ["--site", kind]
    args += ["--tokens", str(spec.planned_rows), "--context-length", str(spec.context_length),
             "--dtype", spec.dtype, "--shard-tokens", str(spec.rows_per_shard), "--compression", spec.compression]
    bos = spec.bos_policy.get("bos_policy")
    if bos:
        args += ["--bos", bos]
    if spec.dataset.get("text_column"):
        args += ["--text-column", spec.dataset["text_column"]]
    if spec.dataset.get("split"):
        args += ["--split", spec.dataset["split"]]
    compute = spec.model.get("compute_dtype")
    if compute:
        args += ["--autocast", "bfloat16" if compute == "bfloat16" else "none"]
    return " ".join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------- helpers


@contextmanager
def _no_writer(root: Path) -> Iterator[None]:
    """Hold every harvest writer lock of `root` (rank 0's at least): refuse while a harvest runs."""
    ranks = {0, *(int(p.name.removeprefix(".writer-rank").removesuffix(".lock"))
                  for p in root.glob(".writer-rank*.lock"))}
    with ExitStack() as stack:
        try:
            for rank in sorted(ranks):
                stack.enter_context(writer_lock(root, rank))
        except CacheError:
            raise CacheError(f"a harvest process is writing {root} right now; let it finish (or stop it) "
                             "before repairing") from None
        yield


def _read_seal(layout: Layout) -> tuple[Seal | None, str | None]:
    if not layout.seal.exists():
        return None, None
    try:
        return Seal.from_json(layout.seal.read_text()), None
    except (ValueError, KeyError, TypeError) as e:
        return None, f"seal {layout.seal} is corrupt ({type(e).__name__}: {e})"


def _check_records(layout: Layout, spec: CacheSpec, report: RepairReport):
    """Good records by shard; bad ones go to report (problems, bad_shards). Also returns, per bad
    shard, the files to move aside: its record and its chunk files that failed."""
    good: dict[int, ShardRecord] = {}
    bad_files: dict[int, list[Path]] = {}
    if not layout.ledger.is_dir():
        return good, bad_files
    for p in sorted(layout.ledger.glob("shard-*.json")):
        try:
            k = int(p.stem.removeprefix("shard-"))
        except ValueError:
            continue  # not a record name this software writes
        if k >= spec.n_shards:
            continue
        rec, problem, failed = _check_shard(layout, spec, k, p)
        if problem is None:
            good[k] = rec
            continue
        report.problems += problem
        report.bad_shards.append(k)
        bad_files[k] = [p, *failed]
    return good, bad_files


def _check_shard(layout: Layout, spec: CacheSpec, k: int,
                 record_path: Path) -> tuple[ShardRecord | None, list[str] | None, list[Path]]:
    """(the record, its problems or None, the files that failed) of shard k's record file."""
    try:
        rec = ShardRecord.from_json(record_path.read_text())
        if rec.shard != k:
            raise ValueError(f"it names shard {rec.shard}")
        files = layout.chunk_files(spec.site_names, k)
        checksums = {name: rec.checksums[name] for name in files}
        sizes = {name: rec.sizes[name] for name in files}
    except (ValueError, KeyError, TypeError) as e:
        return None, [f"shard {k}: ledger record {record_path} is corrupt ({type(e).__name__}: {e})"], []
    problems, failed = [], []
    for name, path in files.items():
        problem = file_problem(path, sizes[name], checksums[name])
        if problem:
            problems.append(f"shard {k}: {name} file {path} {problem}")
            if path.exists():
                failed.append(path)
    return rec, (problems or None), failed


def _move(src: Path, dest: Path, report: RepairReport) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dest)
    report.moved.append((src, dest))


def _restore_planned_rows(root: Path, spec: CacheSpec) -> None:
    """Undo the seal's shrink of the arrays to the rows of a short corpus: the writer writes
    shards at their planned offsets."""
    layout = Layout(root)
    for name in [f"acts/{s}" for s in spec.site_names] + ["tokens", "positions"]:
        meta = json.loads((layout.root / name / "zarr.json").read_text())
        if meta["shape"][0] != spec.planned_rows:
            set_array_rows(layout.root / name, spec.planned_rows)


def _ranges(ks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, k in enumerate(ks):
        if start is None:
            start = k
        if i + 1 == len(ks) or ks[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out) or "none"
