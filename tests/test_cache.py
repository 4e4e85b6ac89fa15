"""The cache layout: commit by ledger, resume, identity checks, verify, dtypes, sealing."""

import ml_dtypes
import numpy as np
import pytest
import torch

from shared.cache import Cache, CacheError, CacheWriter, SiteRecord, to_storage
from shared.synthetic import shard_arrays, synthetic_spec, write_shards, zero_tokens

D = 8


def make_spec(**over):
    base = dict(
        model={"id": "tiny", "config_hash": "abc"},
        dataset={"kind": "file", "sha256": "123"},
        context_length=4,
        bos_policy={"policy": "context", "bos_id": 1},
        sites=[SiteRecord("blocks.1.hook_resid_pre", 1, "resid_pre", "model.layers.1")],
        d_model=D,
        dtype="float32",
        rows_per_shard=8,
        planned_rows=20,
    )
    base.update(over)
    return synthetic_spec(**base)


def normal_acts(k, rows):
    """N(0, 1) float32 rows drawn from default_rng(shard)."""
    return np.random.default_rng(k).normal(size=(len(rows), D)).astype(np.float32)


def shard_data(spec, k, rows=None):
    """write_shard's arguments for shard k (`rows` rows, default the shard's planned rows): tokens =
    the row index, positions = row % context_length."""
    start = k * spec.rows_per_shard
    rows = rows or min(spec.rows_per_shard, spec.planned_rows - start)
    return shard_arrays(spec, k, normal_acts, rows=np.arange(start, start + rows))


def fill(path, spec, shards=None):
    return write_shards(CacheWriter.create_or_open(path, spec), spec, normal_acts, shards=shards)


def test_roundtrip_and_seal(tmp_path):
    spec = make_spec()
    w = fill(tmp_path / "c", spec)
    seal = w.seal()
    assert seal["n_rows"] == 20 and seal["n_shards"] == 3
    c = Cache.open(tmp_path / "c")
    site = spec.site_names[0]
    got = np.concatenate([c.read_acts(site, k) for k in c.shards])
    want = np.concatenate([shard_data(spec, k)[0][site] for k in range(3)])
    np.testing.assert_array_equal(got, want)
    assert c.n_rows == 20
    np.testing.assert_array_equal(np.concatenate([c.read_vector("tokens", k) for k in c.shards]), np.arange(20))
    st = c.stats(site)
    np.testing.assert_allclose(st["mean_sq_norm"], (want.astype(np.float64) ** 2).sum(1).mean(), rtol=1e-6)
    np.testing.assert_allclose(st["mean"], want.mean(0), rtol=1e-6, atol=1e-9)
    assert c.verify() == []


def test_unsealed_refused_unless_allowed(tmp_path):
    spec = make_spec()
    fill(tmp_path / "c", spec, shards=[0, 2])
    with pytest.raises(CacheError, match="not sealed"):
        Cache.open(tmp_path / "c")
    c = Cache.open(tmp_path / "c", allow_unsealed=True)
    assert c.shards == [0, 2]
    assert any("shard 1: missing" in p for p in c.verify())


def test_missing_shard_never_reads_as_zeros(tmp_path):
    spec = make_spec()
    fill(tmp_path / "c", spec, shards=[0])
    c = Cache.open(tmp_path / "c", allow_unsealed=True)
    with pytest.raises(CacheError, match="shard 1 is not committed"):
        c.read_acts(spec.site_names[0], 1)


def test_uncommitted_chunk_is_rewritten_on_resume(tmp_path):
    """A chunk file written without its ledger record (killed before commit) is not done."""
    spec = make_spec()
    w = fill(tmp_path / "c", spec, shards=[0])
    acts, tok, pos = shard_data(spec, 1)
    w._arrays[f"acts/{spec.site_names[0]}"][8:16] = np.full((8, D), 7.0, np.float32)  # stale partial
    w2 = CacheWriter.create_or_open(tmp_path / "c", spec)
    assert w2.done_shards() == {0}
    w2.write_shard(1, acts, tok, pos)
    w2.write_shard(2, *shard_data(spec, 2))
    w2.seal()
    c = Cache.open(tmp_path / "c")
    np.testing.assert_array_equal(c.read_acts(spec.site_names[0], 1), acts[spec.site_names[0]])


def test_resumed_cache_is_byte_identical(tmp_path):
    spec = make_spec()
    fill(tmp_path / "a", spec).seal()
    fill(tmp_path / "b", spec, shards=[2, 0])
    w = CacheWriter.create_or_open(tmp_path / "b", spec)
    w.write_shard(1, *shard_data(spec, 1))
    w.seal()
    for rel in ["acts/blocks.1.hook_resid_pre/c/0/0", "acts/blocks.1.hook_resid_pre/c/2/0", "tokens/c/1"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_commit_is_write_once(tmp_path):
    spec = make_spec()
    w = fill(tmp_path / "c", spec, shards=[0])
    with pytest.raises(CacheError, match="already committed"):
        w.write_shard(0, *shard_data(spec, 0))


@pytest.mark.parametrize(
    "field,value",
    [
        ("context_length", 8),
        ("dtype", "float16"),
        ("sites", [SiteRecord("blocks.2.hook_resid_pre", 2, "resid_pre", "model.layers.2")]),
        ("model", {"id": "other", "config_hash": "abc"}),
    ],
)
def test_identity_mismatch_names_field(tmp_path, field, value):
    spec = make_spec()
    fill(tmp_path / "c", spec, shards=[0])
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*"))
    with pytest.raises(CacheError, match=field):
        CacheWriter.create_or_open(tmp_path / "c", make_spec(**{field: value}))
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*")) == before


def test_non_cache_folder_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("hi")
    with pytest.raises(CacheError, match="not an activation cache"):
        CacheWriter.create_or_open(tmp_path / "x", make_spec())


def test_short_corpus_seals_with_fewer_rows(tmp_path):
    spec = make_spec(planned_rows=40)
    w = CacheWriter.create_or_open(tmp_path / "c", spec)
    w.write_shard(0, *shard_data(spec, 0))
    w.write_shard(1, *shard_data(spec, 1, rows=4))
    seal = w.seal(n_shards=2)
    assert seal["n_rows"] == 12
    c = Cache.open(tmp_path / "c")
    assert c.n_rows == 12 and c.read_acts(spec.site_names[0], 1).shape == (4, D)


def test_verify_detects_flip_and_truncation(tmp_path):
    spec = make_spec()
    fill(tmp_path / "c", spec).seal()
    chunk = tmp_path / "c/acts/blocks.1.hook_resid_pre/c/1/0"
    b = bytearray(chunk.read_bytes())
    b[5] ^= 1
    chunk.write_bytes(bytes(b))
    problems = Cache.open(tmp_path / "c").verify()
    assert len(problems) == 1 and "shard 1" in problems[0] and "checksum" in problems[0]
    chunk.write_bytes(bytes(b[:10]))
    with pytest.raises(CacheError, match="shard 1 .*truncated"):
        Cache.open(tmp_path / "c").read_acts(spec.site_names[0], 1)


def test_corrupt_ledger_record_named(tmp_path):
    spec = make_spec()
    fill(tmp_path / "c", spec, shards=[0])
    (tmp_path / "c/ledger/shard-000000.json").write_text("{not json")
    with pytest.raises(CacheError, match="shard-000000.json is corrupt"):
        Cache.open(tmp_path / "c", allow_unsealed=True)


def test_bfloat16_lossless(tmp_path):
    spec = make_spec(dtype="bfloat16")
    x = torch.randn(20, D) * 1000
    xb = x.to(torch.bfloat16)
    w = write_shards(CacheWriter.create_or_open(tmp_path / "c", spec), spec, lambda k, rows: x[torch.from_numpy(rows)],
                     tokens=zero_tokens, positions=zero_tokens)
    w.seal()
    c = Cache.open(tmp_path / "c")
    got = np.concatenate([c.read_acts(spec.site_names[0], k) for k in range(3)])
    assert got.dtype == ml_dtypes.bfloat16
    assert torch.equal(torch.from_numpy(got.view(np.int16)).view(torch.bfloat16), xb)


def test_float16_overflow_reported():
    with pytest.raises(CacheError, match="float16 overflow.*bfloat16"):
        to_storage(torch.tensor([[1.0, 70000.0]]), "float16", "shard 3 site blocks.8.hook_resid_pre")
    with pytest.raises(CacheError, match="NaN or inf"):
        to_storage(torch.tensor([[1.0, float("nan")]]), "float32", "x")


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_roundtrip(tmp_path, compression):
    spec = make_spec(compression=compression)
    fill(tmp_path / "c", spec).seal()
    c = Cache.open(tmp_path / "c")
    np.testing.assert_array_equal(c.read_acts(spec.site_names[0], 2), shard_data(spec, 2)[0][spec.site_names[0]])
    np.testing.assert_array_equal(c.read_vector("tokens", 2), np.arange(16, 20))
    assert c.verify() == []


def test_zarr_readable(tmp_path):
    """Other zarr v3 readers see a normal group."""
    import zarr

    spec = make_spec()
    fill(tmp_path / "c", spec).seal()
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert g["acts/blocks.1.hook_resid_pre"].shape == (20, D)
    assert g.attrs["saeforge"]["spec"]["context_length"] == 4


def test_rewriting_a_shard_removes_zarr_temporaries_left_by_a_kill(tmp_path):
    """A kill between zarr's write of `<chunk>.<uuid>.partial` and its rename leaves that file; the
    resumed writer of the shard removes it, so the finished cache holds exactly its own files."""
    spec = make_spec()
    fill(tmp_path / "c", spec, shards=[0])
    strays = [tmp_path / "c/acts/blocks.1.hook_resid_pre/c/1/0.0123abcd.partial", tmp_path / "c/tokens/c/1.4567ef.partial"]
    for p in strays:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    keep = tmp_path / "c/tokens/c/2.89ab.partial"  # another shard's: not this writer's business
    keep.write_bytes(b"")
    w = CacheWriter.create_or_open(tmp_path / "c", spec)
    w.write_shard(1, *shard_data(spec, 1))
    assert not any(p.exists() for p in strays) and keep.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path, dtype, monkeypatch):
    """Uncompressed chunks are written directly (not through zarr): the files are byte for byte
    what zarr's own write makes, including the zero padding of a short last shard, and leave no
    temporaries."""
    spec = make_spec(dtype=dtype)
    fill(tmp_path / "direct", spec)
    monkeypatch.setattr(np, "little_endian", False)  # the fallback: every chunk through zarr
    fill(tmp_path / "zarr", spec)
    monkeypatch.undo()
    files = sorted(p.relative_to(tmp_path / "direct") for p in (tmp_path / "direct").rglob("c/**/*") if p.is_file())
    assert len(files) == 3 * spec.n_shards and not list((tmp_path / "direct").rglob("*.partial"))
    for f in files:
        assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "zarr" / f).read_bytes(), f
    CacheWriter.create_or_open(tmp_path / "direct", spec).seal()
    c = Cache.open(tmp_path / "direct")
    assert c.verify() == []
    got = np.concatenate([np.asarray(c.read_acts(spec.site_names[0], k), dtype=np.float32) for k in c.shards])
    want = np.concatenate([np.asarray(shard_data(spec, k)[0][spec.site_names[0]], dtype=np.float32) for k in range(3)])
    np.testing.assert_array_equal(got, want)
