"""Typed ledger records and seal (shared/cache_records.py): exact JSON bytes, clear errors naming the file."""

import json

import numpy as np
import pytest

from shared.cache import Cache, CacheError, CacheSpec, CacheWriter, SiteRecord, to_storage
from shared.cache_records import Seal, ShardRecord, ShardStatistics, SiteStatistics, read_ledger
from shared.cache_stats import merge_statistics, shard_statistics

SITES = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"]  # not sorted: records keep the written order
D = 6


def small_cache(root, dtype="float32", planned_rows=20):
    spec = CacheSpec(model={"id": "tiny"}, dataset={"kind": "file"}, context_length=4, bos_policy={"policy": "context"},
                     sites=[SiteRecord(s, i, "resid_pre", f"model.layers.{i}") for i, s in enumerate(SITES)],
                     d_model=D, dtype=dtype, rows_per_shard=8, planned_rows=planned_rows)
    w = CacheWriter.create_or_open(root, spec)
    records = []
    for k in range(spec.n_shards):
        start, stop = w.shard_bounds(k)
        rng = np.random.default_rng(k)
        acts = {s: to_storage(rng.normal(size=(stop - start, D)).astype(np.float32) * 3, dtype, s) for s in SITES}
        tokens = np.arange(start, stop, dtype=np.int32)
        records.append(w.write_shard(k, acts, tokens, tokens % 4))
    return w, records, w.seal()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_records_and_seal_reproduce_their_file_bytes(tmp_path, dtype):
    w, records, seal = small_cache(tmp_path / "c", dtype)
    for rec in records:
        data = w.layout.record(rec.shard).read_bytes()
        assert rec.to_json() == data
        assert ShardRecord.from_json(data) == rec and ShardRecord.from_json(data).to_json() == data
        # the bytes of format version 1: json.dumps of the object in this field order
        assert data == json.dumps({"shard": rec.shard, "rows": rec.rows, "checksums": rec.checksums,
                                   "sizes": rec.sizes, "stats": {s: st.to_dict() for s, st in rec.stats.items()}}).encode()
        assert list(rec.stats) == SITES and list(rec.stats[SITES[0]].to_dict()) == ["count", "sum_sq_norm", "sum", "max_abs"]
    data = w.layout.seal.read_bytes()
    assert seal.to_json() == data and Seal.from_json(data) == seal and Seal.from_json(data).to_json() == data
    assert list(json.loads(data)) == ["n_rows", "n_shards", "stats", "software_version"]
    assert list(json.loads(data)["stats"][SITES[0]]) == ["count", "mean_sq_norm", "mean", "max_abs", "norm_scaling_factor"]
    cache = Cache.open(tmp_path / "c")
    assert cache.seal == seal and cache.ledger == {r.shard: r for r in records}
    assert read_ledger(tmp_path / "c") == cache.ledger


def test_statistics_are_typed_and_merge_like_the_seal(tmp_path):
    _, records, seal = small_cache(tmp_path / "c")
    for site in SITES:
        merged = merge_statistics((r.stats[site] for r in records), D)
        assert isinstance(merged, SiteStatistics) and merged == seal.stats[site]
        assert merged.count == 20 and len(merged.mean) == D
    st = shard_statistics(np.ones((3, D), np.float32))
    assert isinstance(st, ShardStatistics) and (st.count, st.sum, st.max_abs) == (3, [3.0] * D, 1.0)
    assert st.sum_sq_norm == pytest.approx(3.0 * D, rel=1e-6)  # float32 norms, squared in float64


def test_dict_form_still_reads(tmp_path):
    _, records, seal = small_cache(tmp_path / "c")
    assert seal["n_rows"] == seal.n_rows == 20 and seal["stats"][SITES[0]]["mean"] == seal.stats[SITES[0]].mean
    assert records[0] == json.loads(records[0].to_json()) and records[0] != records[1]
    with pytest.raises(KeyError):
        records[0]["nope"]
    with pytest.raises(AttributeError):  # frozen
        records[0].rows = 3


@pytest.mark.parametrize("text", ['{"shard": 1, "rows": 8, "check', '[1, 2]', '{"rows": 8}',
                                  '{"shard": 1, "rows": 8, "checksums": [], "sizes": {}, "stats": {}}',
                                  '{"shard": 1, "rows": 8, "checksums": {}, "sizes": {}}',
                                  '{"shard": "x", "rows": 8, "checksums": {}, "sizes": {}, "stats": {}}'])
def test_bad_record_names_the_file(tmp_path, text):
    small_cache(tmp_path / "c")
    (tmp_path / "c/ledger/shard-000001.json").write_text(text)
    with pytest.raises(CacheError, match=r"ledger record .*shard-000001\.json is corrupt .*harvest verify --repair"):
        Cache.open(tmp_path / "c")


@pytest.mark.parametrize("text", ['{"n_rows": 20, "n_sha', '{"n_rows": 20}', '{"n_rows": 20, "n_shards": 3, "stats": 5}'])
def test_bad_seal_names_the_file(tmp_path, text):
    small_cache(tmp_path / "c")
    (tmp_path / "c/seal.json").write_text(text)
    with pytest.raises(CacheError, match=r"seal\.json is corrupt .*harvest verify --repair"):
        Cache.open(tmp_path / "c")
