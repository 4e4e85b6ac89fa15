"""Synthetic activation caches for tests and benchmarks: real sealed caches, made through the public
API of shared.cache (CacheSpec, SiteRecord, CacheWriter.create_or_open / write_shard / seal,
to_storage), so that everything that reads a harvested cache reads these the same way.

    spec = synthetic_spec(d_model=16, rows_per_shard=512, planned_rows=512 * 6, context_length=8)
    build_synthetic_cache(root, spec, sparse_codes(16, n_atoms=48, seed=0))

Shapes and dtypes. Shard k holds the global rows `rows = arange(k * rows_per_shard, min((k + 1) *
rows_per_shard, planned_rows))` (int64; the last shard may be short). Per shard the builder calls

* `acts(k, rows)` -> [len(rows), d_model] activations for the one site, or a dict site -> such an
  array for several; numpy (any float dtype) or torch. An array already in the storage dtype
  (`spec.dtype`: float32, float16 or bfloat16 as ml_dtypes.bfloat16) is written as it is; any
  other goes through `to_storage` (round to nearest, NaN/inf and float16 overflow refused);
* `tokens(k, rows)` -> [len(rows)] int32, default the row index itself;
* `positions(k, rows)` -> [len(rows)] int32, default `rows % context_length`.

Determinism. A cache is a pure function of its spec and callbacks: the same arguments give the
same bytes (CacheWriter's own guarantee). The generators below are seeded; `indexed_normal` draws
each shard from its own seed, so any subset of shards in any order gives the same rows; the others
draw from one generator for the whole cache and so must be called for shards 0, 1, 2, ... in order
(they raise otherwise), once per cache: build a fresh generator for each cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.cache import CacheSpec, CacheWriter, SiteRecord, to_storage

SITE = "blocks.0.hook_resid_pre"
Rows = np.ndarray  # int64 global row indices of one shard
ActsFn = Callable[[int, Rows], Any]
VectorFn = Callable[[int, Rows], np.ndarray]


def site_record(name: str) -> SiteRecord:
    """The SiteRecord of a TransformerLens-style name 'blocks.<layer>.hook_<kind>', or
    'blocks.<layer>.ln2.hook_normalized' (kind mlp_in, what the MLP reads) (HF module
    model.layers.<layer>, as a Llama-style harvest records it)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:hook_(\w+)|(ln2\.hook_normalized))", name)
    if m is None:
        raise ValueError(f"site {name!r} is not of the form blocks.<layer>.hook_<kind> or blocks.<layer>.ln2.hook_normalized")
    return SiteRecord(name, int(m[1]), m[2] or "mlp_in", f"model.layers.{m[1]}")


def synthetic_spec(*, d_model: int, rows_per_shard: int, planned_rows: int, sites: Sequence[str | SiteRecord] = (SITE,),
                   dtype: str = "float32", context_length: int = 128, model: dict | None = None,
                   dataset: dict | None = None, bos_policy: dict | None = None, compression: str = "none") -> CacheSpec:
    """A CacheSpec of a synthetic cache: sites given by name (see site_record) or as SiteRecords;
    model {"id": "synthetic"}, dataset {"id": "synthetic"} and bos_policy {"policy": "none"} unless given."""
    return CacheSpec(
        model=model if model is not None else {"id": "synthetic"},
        dataset=dataset if dataset is not None else {"id": "synthetic"},
        context_length=context_length,
        bos_policy=bos_policy if bos_policy is not None else {"policy": "none"},
        sites=[s if isinstance(s, SiteRecord) else site_record(s) for s in sites],
        d_model=d_model, dtype=dtype, rows_per_shard=rows_per_shard, planned_rows=planned_rows, compression=compression,
    )


def shard_rows(spec: CacheSpec, k: int) -> Rows:
    """The global row indices [start, stop) of shard k (int64)."""
    return np.arange(k * spec.rows_per_shard, min((k + 1) * spec.rows_per_shard, spec.planned_rows), dtype=np.int64)


def zero_tokens(k: int, rows: Rows) -> np.ndarray:
    """A tokens (or positions) callback: all zeros."""
    return np.zeros(len(rows), np.int32)


def shard_arrays(spec: CacheSpec, k: int, acts: ActsFn, tokens: VectorFn | None = None,
                 positions: VectorFn | None = None, rows: Rows | None = None):
    """(acts dict in storage dtype, tokens, positions) of shard k: the arguments of write_shard.
    rows: the shard's global rows (default shard_rows(spec, k); fewer for a short last shard)."""
    rows = shard_rows(spec, k) if rows is None else rows
    got = acts(k, rows)
    if not isinstance(got, Mapping):
        if len(spec.sites) != 1:
            raise ValueError(f"shard {k}: acts returned one array for the {len(spec.sites)} sites {spec.site_names}")
        got = {spec.site_names[0]: got}
    out = {}
    for site, x in got.items():
        keep = isinstance(x, np.ndarray) and x.dtype.name == spec.dtype
        out[site] = x if keep else to_storage(x, spec.dtype, f"synthetic shard {k} site {site}")
    tok = tokens(k, rows) if tokens is not None else rows.astype(np.int32)
    pos = positions(k, rows) if positions is not None else (rows % spec.context_length).astype(np.int32)
    return out, tok, pos


def write_shards(writer, spec: CacheSpec, acts: ActsFn, *, tokens: VectorFn | None = None,
                 positions: VectorFn | None = None, shards: Iterable[int] | None = None):
    """Write (and commit) `shards` (default all, in order) of spec through writer.write_shard;
    returns the writer. Works for any writer with CacheWriter's write_shard."""
    for k in range(spec.n_shards) if shards is None else shards:
        writer.write_shard(k, *shard_arrays(spec, k, acts, tokens, positions))
    return writer


def build_synthetic_cache(root: str | Path, spec: CacheSpec, acts: ActsFn, *, tokens: VectorFn | None = None,
                          positions: VectorFn | None = None, shards: Iterable[int] | None = None,
                          seal: bool = True) -> Path:
    """Create the cache at root (CacheWriter.create_or_open), write `shards` (default all) and seal
    it unless seal=False (then an unfinished harvest: Cache.open needs allow_unsealed). Returns root."""
    writer = write_shards(CacheWriter.create_or_open(root, spec), spec, acts, tokens=tokens, positions=positions,
                          shards=shards)
    if seal:
        writer.seal()
    return Path(root)


# --------------------------------------------------------------------------- row generators


def _in_order(make: Callable[[int, Rows], Any]) -> ActsFn:
    """Wrap a generator that draws from one random stream: shards must come as 0, 1, 2, ..."""
    expected = [0]

    def acts(k: int, rows: Rows):
        if k != expected[0]:
            raise ValueError(f"this generator draws shards in order from one seed: got shard {k}, expected "
                             f"{expected[0]}; build a fresh generator for each cache")
        expected[0] += 1
        return make(k, rows)

    return acts


def indexed_normal(d: int, sites: Sequence[str] = (SITE,)) -> ActsFn:
    """Rows that say who they are: row i of site j has x[0] = i, x[1] = j, the rest N(0, 1) drawn
    (float64, then float32) from default_rng(10 * shard + j). Any shards, any order."""

    def acts(k: int, rows: Rows) -> dict[str, np.ndarray]:
        out = {}
        for j, s in enumerate(sites):
            x = np.random.default_rng(10 * k + j).normal(size=(len(rows), d)).astype(np.float32)
            x[:, 0], x[:, 1] = rows, j
            out[s] = x
        return out

    return acts


def sparse_codes(d: int, n_atoms: int, seed: int = 0, active: float = 4, noise: float = 0.01) -> ActsFn:
    """x = codes @ dictionary + noise * N(0, 1), float32 [rows, d]: what an SAE can learn. The
    dictionary (n_atoms unit rows) is drawn first from default_rng(seed); each code is
    Exponential(1) with probability active / n_atoms (about `active` atoms a row). Shards in order."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(n_atoms, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)

    def make(k: int, rows: Rows) -> np.ndarray:
        n = len(rows)
        codes = rng.exponential(size=(n, n_atoms)) * (rng.random((n, n_atoms)) < active / n_atoms)
        return (codes @ dictionary + noise * rng.normal(size=(n, d))).astype(np.float32)

    return _in_order(make)


def standard_normal(d: int, dtype: str, seed: int = 0) -> ActsFn:
    """N(0, 1) activations drawn as float32 from default_rng(seed), rounded to `dtype` (the cache's
    storage dtype) with numpy's astype. Shards in order."""
    import ml_dtypes

    storage = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    return _in_order(lambda k, rows: rng.standard_normal((len(rows), d), dtype=np.float32).astype(storage))


def lognormal_norms(d: int, seed: int = 0) -> ActsFn:
    """float16 activations with heavy-tailed norms around a shared mean: mean = 2 N(0, 1) drawn first
    from default_rng(seed), then per row a uniform direction times a norm ~ LogNormal(log sqrt(d),
    0.5), plus the mean (float64, then float16). Shards in order."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=d) * 2

    def make(k: int, rows: Rows) -> np.ndarray:
        directions = rng.normal(size=(len(rows), d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        norms = rng.lognormal(mean=np.log(np.sqrt(d)), sigma=0.5, size=(len(rows), 1))
        return (directions * norms + mean).astype(np.float16)

    return _in_order(make)


def shared_codes(d: int, n_atoms: int, sites: Sequence[str], seed: int = 0, active: float = 4,
                 noise: float = 0.01) -> ActsFn:
    """Several sites driven by the same sparse codes, each through its own dictionary: site j's
    rows are codes @ dictionary_j + noise * N(0, 1) (float32 [rows, d]), so any site predicts any
    other through the codes (what a transcoder learns). The dictionaries (n_atoms unit rows each,
    in the order of `sites`) are drawn first from default_rng(seed); codes as in sparse_codes.
    Shards in order."""
    rng = np.random.default_rng(seed)
    dictionaries = []
    for _ in sites:
        D = rng.normal(size=(n_atoms, d)).astype(np.float32)
        dictionaries.append(D / np.linalg.norm(D, axis=1, keepdims=True))

    def make(k: int, rows: Rows) -> dict[str, np.ndarray]:
        n = len(rows)
        codes = rng.exponential(size=(n, n_atoms)) * (rng.random((n, n_atoms)) < active / n_atoms)
        return {s: (codes @ D + noise * rng.normal(size=(n, d))).astype(np.float32) for s, D in zip(sites, dictionaries)}

    return _in_order(make)
