"""Caches on object storage: harvest to s3:// on a moto server (loopback only), read, resume, races."""

import json
import logging
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from harvest.runner import run_harvest
from shared import faults
from shared.cache import Cache, CacheError, CacheSpec
from shared.remote import RemoteError, RemoteCacheWriter, RemoteStore, is_remote
from shared.synthetic import shard_arrays, synthetic_spec
from tests.helpers import cache_bytes, harvest_cli_args, harvest_config
from train.activation_store import ActivationStore

SITE = "blocks.1.hook_resid_pre"
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (random port) with one bucket; yields 's3://bucket'.

    The AWS variables point every client (in-process and subprocesses) at it; the staging and
    mirror folders default to temporary folders.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    base = tmp_path_factory.mktemp("s3-local")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "SAEFORGE_STORAGE_OPTIONS"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("SAEFORGE_STAGING", str(base / "staging"))
        mp.setenv("SAEFORGE_MIRROR", str(base / "mirror"))
        RemoteStore("s3://saeforge-test").fs.mkdir("saeforge-test")
        yield "s3://saeforge-test"
    server.stop()


def new_url(s3: str) -> str:
    return f"{s3}/{uuid.uuid4().hex[:8]}/cache"


def objects(url: str) -> dict[str, bytes]:
    """Every object under a URL but the seal (as cache_bytes does for folders)."""
    store = RemoteStore(url)
    keys = sorted(k for k in store.list("") if k != "seal.json")
    got = store.get_many(keys)
    return {k: got[k] for k in keys}


def ledger_keys(url: str) -> list[str]:
    return sorted(k for k in RemoteStore(url).list("ledger"))


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, tiny_llama_dir, tiny_corpus):
    out = tmp_path_factory.mktemp("local") / "cache"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out), progress=False)
    return out


@pytest.fixture(scope="module")
def remote_ref(s3, tiny_llama_dir, tiny_corpus):
    url = new_url(s3)
    assert run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], url), progress=False) == url
    return url


def test_harvest_to_s3_is_byte_identical_to_local(remote_ref, local_ref, tmp_path):
    assert is_remote(remote_ref) and not is_remote(str(local_ref))
    assert objects(remote_ref) == cache_bytes(local_ref)
    assert ledger_keys(remote_ref) == [f"ledger/shard-{k:06d}.json" for k in range(5)]

    mirror = tmp_path / "mirror"
    cache, local = Cache.open(remote_ref, mirror=mirror), Cache.open(local_ref)
    assert cache.sealed and cache.shards == local.shards and cache.stats(SITE) == local.stats(SITE)
    assert not list(mirror.rglob("c/*")), "chunk files are fetched lazily"
    a = cache.read_acts(SITE, 2)
    assert isinstance(a, np.memmap) and str(mirror) in str(a.filename)
    assert len(list(mirror.rglob("acts/*/c/*/0"))) == 1
    for k in local.shards:
        np.testing.assert_array_equal(cache.read_acts(SITE, k), local.read_acts(SITE, k))
        np.testing.assert_array_equal(cache.read_vector("tokens", k), local.read_vector("tokens", k))
        np.testing.assert_array_equal(cache.read_vector("positions", k), local.read_vector("positions", k))
    assert cache.verify() == []
    # the mirror folder opened by its path reads through too
    again = Cache.open(cache.root)
    assert again.where == remote_ref and again.ledger == cache.ledger

    r = CliRunner().invoke(harvest_cli, ["info", remote_ref])
    assert r.exit_code == 0 and "5 of 5 done, sealed" in r.output and remote_ref in r.output, r.output
    r = CliRunner().invoke(harvest_cli, ["verify", remote_ref])
    assert r.exit_code == 0 and "ok: 5 shards" in r.output, r.output


def test_activation_store_over_url_serves_the_local_batches(remote_ref, local_ref):
    kw = dict(batch_size=48, window_shards=2, seed=7, heldout_shards=1, prefetch=False)
    remote, local = ActivationStore(remote_ref, **kw), ActivationStore(str(local_ref), **kw)
    assert remote.state_dict() == local.state_dict()  # same cache identity: a checkpoint resumes on either
    for position in (0, 48 * 3, 250, 48 * 11 + 5):
        remote.seek(position)
        local.seek(position)
        for _ in range(2):
            torch.testing.assert_close(remote.next_batch(), local.next_batch(), rtol=0, atol=0)
    assert remote.state_dict() == local.state_dict()


def test_kill9_then_resume_with_fresh_staging(s3, local_ref, tmp_path, tiny_llama_dir, tiny_corpus):
    """Killed after shard 2's chunk objects were put, before its record: a fresh machine redoes it."""
    url, fault = new_url(s3), "remote_record@3"
    args = [sys.executable, "-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], url)]
    first = subprocess.run([*args, "--staging", str(tmp_path / "a")], env=dict(os.environ, SAEFORGE_FAULT=fault),
                           capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert ledger_keys(url) == ["ledger/shard-000000.json", "ledger/shard-000001.json"]
    assert RemoteStore(url).exists(f"acts/{SITE}/c/2/0") and not RemoteStore(url).exists("seal.json")
    second = subprocess.run([*args, "--staging", str(tmp_path / "b")], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert objects(url) == cache_bytes(local_ref)
    assert ledger_keys(url) == [f"ledger/shard-{k:06d}.json" for k in range(5)]
    assert Cache.open(url, mirror=tmp_path / "m").verify() == []


def test_interrupted_publish_and_seal_resume_from_the_same_staging(s3, local_ref, tmp_path, tiny_llama_dir,
                                                                   tiny_corpus, monkeypatch):
    url, staging = new_url(s3), tmp_path / "staging"
    cfg = harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], url, staging=str(staging))
    # shard 1 committed in staging, its record never put on the store
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("SAEFORGE_FAULT", "remote_record@2:enospc")
    with pytest.raises(OSError):
        run_harvest(cfg, progress=False)
    assert ledger_keys(url) == ["ledger/shard-000000.json"]
    assert (staging / "cache" / "ledger" / "shard-000001.json").exists()
    # everything committed, the seal not put on the store
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("SAEFORGE_FAULT", "remote_seal:enospc")
    with pytest.raises(OSError):
        run_harvest(cfg, progress=False)
    assert len(ledger_keys(url)) == 5 and not RemoteStore(url).exists("seal.json")
    with pytest.raises(CacheError, match="not sealed"):
        Cache.open(url, mirror=tmp_path / "m")
    monkeypatch.delenv("SAEFORGE_FAULT")
    run_harvest(cfg, progress=False)
    assert objects(url) == cache_bytes(local_ref)
    assert Cache.open(url, mirror=tmp_path / "m").sealed


def test_spec_mismatch_on_url_names_the_field_and_writes_nothing(remote_ref, tiny_llama_dir, tiny_corpus, tmp_path):
    before = objects(remote_ref)
    args = harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], remote_ref, "--context-length", "8",
                            "--staging", str(tmp_path / "fresh"))
    r = CliRunner().invoke(harvest_cli, args)
    assert r.exit_code == 2 and "context_length" in r.output and remote_ref in r.output, r.output
    assert objects(remote_ref) == before


def test_corrupt_or_missing_remote_chunk_names_the_shard(remote_ref, s3, tmp_path):
    url = new_url(s3)
    src, dst = RemoteStore(remote_ref), RemoteStore(url)
    for key, data in objects(remote_ref).items():
        dst.put_bytes(key, data)
    dst.put_bytes("seal.json", src.get_bytes("seal.json"))
    key = f"acts/{SITE}/c/2/0"
    data = bytearray(dst.get_bytes(key))
    data[100] ^= 0xFF
    dst.put_bytes(key, bytes(data))
    dst.fs.rm_file(dst.path("tokens/c/3"))

    cache = Cache.open(url, mirror=tmp_path / "m")
    cache.read_acts(SITE, 1)
    with pytest.raises(RemoteError, match=f"shard 2 .*{key}.*checksum"):
        cache.read_acts(SITE, 2)
    assert not (cache.root / key).exists(), "a bad object never reaches the mirror"
    with pytest.raises(RemoteError, match="shard 3 .*tokens/c/3.* missing"):
        cache.read_vector("tokens", 3)
    store = ActivationStore(url, batch_size=16, window_shards=5, prefetch=False)
    with pytest.raises(CacheError, match="shard [23]"):
        for _ in range(40):
            store.next_batch()
    r = CliRunner().invoke(harvest_cli, ["verify", url])
    assert r.exit_code == 1 and f"shard 2: acts/{SITE}" in r.output and "shard 3: tokens" in r.output, r.output


def small_spec() -> CacheSpec:
    return synthetic_spec(d_model=8, rows_per_shard=8, planned_rows=32, sites=[SITE], context_length=4,
                          model={"id": "m"}, dataset={"id": "d"}, bos_policy={})


def shard_data(k: int, salt: float = 0.0):
    """write_shard's arguments for shard k: acts 0..63 + k + salt, tokens k..k+7, positions 0..3, 0..3."""
    return shard_arrays(small_spec(), k, lambda k, rows: np.arange(64, dtype=np.float32).reshape(8, 8) + k + salt,
                        tokens=lambda k, rows: np.arange(8, dtype=np.int32) + k,
                        positions=lambda k, rows: np.arange(8, dtype=np.int32) % 4)


def test_racing_writers_never_make_two_records(s3, tmp_path):
    url, spec = new_url(s3), small_spec()
    w1 = RemoteCacheWriter.create_or_open(url, spec, tmp_path / "s1")
    w2 = RemoteCacheWriter.create_or_open(url, spec, tmp_path / "s2")
    record_key = "ledger/shard-000000.json"
    w1.write_shard(0, *shard_data(0))
    with pytest.raises(FileExistsError):  # the ledger put is create-only
        w2.remote.store.put_create(record_key, b"{}")
    assert json.loads(RemoteStore(url).get_bytes(record_key))["shard"] == 0
    assert w2.write_shard(0, *shard_data(0)) == json.loads(RemoteStore(url).get_bytes(record_key))  # done by w1
    # the race proper: w2 staged shard 1 before w1 committed it; w2's record put defers to w1's
    w2.local.write_shard(1, *shard_data(1))
    w1.write_shard(1, *shard_data(1))
    w2._publish(1)
    # different bytes for a committed shard: reported, never a second record
    w1.write_shard(2, *shard_data(2))
    w2.local.write_shard(2, *shard_data(2, salt=0.5))
    with pytest.raises(RemoteError, match="shard 2 was committed meanwhile by another writer"):
        w2._publish(2)
    assert ledger_keys(url) == [f"ledger/shard-{k:06d}.json" for k in range(3)]
    w1.write_shard(3, *shard_data(3))
    w1.seal()
    problems = Cache.open(url, mirror=tmp_path / "m").verify()
    assert problems == [f"shard 2: acts/{SITE} object {url}/acts/{SITE}/c/2/0 fails its checksum"]
