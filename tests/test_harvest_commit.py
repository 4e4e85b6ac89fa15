"""The harvest writer's pipelined commit (harvest.runner.ShardWriterThread over
CacheWriter.stage_shard / StagedShard.commit): shard k+1 is staged before shard k is committed,
records are written in shard order and each only after its own files are fsynced; a kill between
a stage and its commit resumes to the bytes of an uninterrupted harvest."""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import shared.cache_writer as cache_writer
from harvest.runner import ShardWriterThread
from shared.cache import Cache, CacheError, CacheWriter
from shared.synthetic import shard_arrays, synthetic_spec
from tests.helpers import cache_bytes, harvest_cli_args, harvest_killed_then_rerun

# reference_cache: tests/conftest.py

N_SHARDS = 4


def spec():
    return synthetic_spec(d_model=8, rows_per_shard=16, planned_rows=16 * N_SHARDS, context_length=4)


def normal(k, rows):
    return np.random.default_rng(k).normal(size=(len(rows), 8)).astype(np.float32)


class LoggingWriter(CacheWriter):
    """A CacheWriter that logs ("stage", k) and ("commit", k), and holds shard 0's stage until
    `go` is set (so every shard is queued behind it and the pipeline is full)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple] = []
        self.go = threading.Event()

    def stage_shard(self, shard, *args):
        if shard == 0:
            assert self.go.wait(10)
        staged = super().stage_shard(shard, *args)
        self.log.append(("stage", shard))
        inner = staged.commit

        def commit():
            self.log.append(("commit", shard))
            return inner()

        return cache_writer.StagedShard(shard, commit)


def test_next_shard_is_staged_before_commit_and_records_follow_their_fsyncs(tmp_path, monkeypatch):
    s = spec()
    created = CacheWriter.create_or_open(tmp_path / "c", s)
    writer = LoggingWriter(created.layout.root, s)
    writer._open_arrays()
    events: list[tuple] = []
    real_fsync, real_write_atomic = cache_writer.fsync_path, cache_writer.write_atomic

    def fsync(path):
        real_fsync(path)
        events.append(("fsync", Path(path)))

    def write_atomic(path, data, **kw):
        events.append(("record", Path(path)))
        return real_write_atomic(path, data, **kw)

    monkeypatch.setattr(cache_writer, "fsync_path", fsync)
    monkeypatch.setattr(cache_writer, "write_atomic", write_atomic)
    thread = ShardWriterThread(writer, depth=N_SHARDS)
    for k in range(N_SHARDS):
        thread.submit(k, *shard_arrays(s, k, normal))
    writer.go.set()
    thread.close()

    # pipelined: stage k+1, then commit k; the last is committed at close
    want = [("stage", 0)]
    for k in range(1, N_SHARDS):
        want += [("stage", k), ("commit", k - 1)]
    assert writer.log == want + [("commit", N_SHARDS - 1)]
    records = [i for i, (what, _) in enumerate(events) if what == "record"]
    assert [events[i][1] for i in records] == [writer.layout.record(k) for k in range(N_SHARDS)]
    for k, at in enumerate(records):
        files = writer.layout.chunk_files(s.site_names, k).values()
        synced = {p for what, p in events[:at] if what == "fsync"}
        assert {*files, *(f.parent for f in files)} <= synced, f"shard {k}'s record before its fsyncs"
    # the same bytes as writing the shards one at a time
    one_by_one = CacheWriter.create_or_open(tmp_path / "one", s)
    for k in range(N_SHARDS):
        one_by_one.write_shard(k, *shard_arrays(s, k, normal))
    assert cache_bytes(tmp_path / "c") == cache_bytes(tmp_path / "one")


def test_a_failed_stage_still_commits_the_staged_shard_then_raises(tmp_path, fault):
    s = spec()
    writer = CacheWriter.create_or_open(tmp_path / "c", s)
    fault("shard_mid_write@3:enospc")  # staging shard 2
    thread = ShardWriterThread(writer, depth=N_SHARDS)
    with pytest.raises(CacheError, match="disk full while writing shard 2"):
        try:
            for k in range(N_SHARDS):
                thread.submit(k, *shard_arrays(s, k, normal))
        finally:
            thread.close()
    assert writer.done_shards() == {0, 1}


@pytest.mark.parametrize("point", ["shard_commit@1", "shard_commit@2", "shard_commit@5"])
def test_kill9_between_stage_and_commit_resumes_byte_identical(reference_cache, tmp_path, tiny_llama_dir,
                                                               tiny_corpus, point):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out)]
    n = int(point.split("@")[1])

    def records_in_order():  # killed in the n-th commit: exactly the shards before it have records, in order
        assert sorted(p.name for p in (out / "ledger").iterdir()) == [f"shard-{k:06d}.json" for k in range(n - 1)]

    harvest_killed_then_rerun(args, point, between=records_in_order)
    assert cache_bytes(out) == cache_bytes(reference_cache)
    assert Cache.open(out).verify() == []


def test_statistics_handed_in_give_the_same_record_and_sites_must_match(tmp_path):
    from shared.cache_stats import shard_statistics

    s = spec()
    computed = CacheWriter.create_or_open(tmp_path / "a", s)
    handed = CacheWriter.create_or_open(tmp_path / "b", s)
    for k in range(N_SHARDS):
        acts, tokens, positions = shard_arrays(s, k, normal)
        computed.write_shard(k, acts, tokens, positions)
        handed.write_shard(k, acts, tokens, positions, {site: shard_statistics(a) for site, a in acts.items()})
    assert cache_bytes(tmp_path / "a") == cache_bytes(tmp_path / "b")
    other = CacheWriter.create_or_open(tmp_path / "c", s)
    acts, tokens, positions = shard_arrays(s, 0, normal)
    with pytest.raises(CacheError, match="statistics of"):
        other.write_shard(0, acts, tokens, positions, {"blocks.9.hook_resid_pre": shard_statistics(acts[s.site_names[0]])})
    assert other.done_shards() == set()


def test_writer_releases_each_shard_after_staging_it_or_skipping_it(tmp_path, fault):
    s = spec()
    writer = CacheWriter.create_or_open(tmp_path / "c", s)
    released = []

    def release(k):
        # staged: its chunk files are on disk (whether or not committed yet)
        files = writer.layout.chunk_files(s.site_names, k).values()
        released.append((k, all(p.exists() for p in files)))

    fault("shard_mid_write@2:enospc")  # staging shard 1 fails; shards 2 and 3 are skipped
    thread = ShardWriterThread(writer, depth=N_SHARDS)
    submitted = 0
    with pytest.raises(CacheError, match="disk full while writing shard 1"):
        try:
            for k in range(N_SHARDS):
                thread.submit(k, *shard_arrays(s, k, normal), release=lambda k=k: release(k))
                submitted += 1  # a submit after the failure raises instead
        finally:
            thread.close()
    assert submitted >= 2
    assert released == [(0, True), (1, False)] + [(k, False) for k in range(2, submitted)]
    assert writer.done_shards() == {0}
