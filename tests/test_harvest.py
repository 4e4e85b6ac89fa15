"""Harvest end to end on tiny offline models: values, determinism, resume after kill -9, ranks, errors."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from harvest.runner import run_harvest, writer_lock
from shared.cache import Cache, CacheError
from shared.models import load_model
from shared.tokens import load_documents, pack_contexts
from tests.helpers import (HARVEST_CTX, cache_bytes, harvest_cli_args, harvest_config,
                           harvest_killed_then_rerun, not_sealed)

# reference_cache: tests/conftest.py


def test_values_match_hidden_states_and_tokens(reference_cache, tiny_llama_dir, tiny_corpus):
    cache = Cache.open(reference_cache)
    assert cache.n_rows == HARVEST_CTX * 20 and len(cache.shards) == 5
    site = "blocks.1.hook_resid_pre"
    acts = np.concatenate([cache.read_acts(site, k) for k in cache.shards])
    tokens = np.concatenate([cache.read_vector("tokens", k) for k in cache.shards])
    positions = np.concatenate([cache.read_vector("positions", k) for k in cache.shards])
    loaded = load_model(str(tiny_llama_dir))
    docs = load_documents(str(tiny_corpus["jsonl"]))
    want_tokens = np.stack(list(pack_contexts(docs, loaded.tokenizer, HARVEST_CTX, "context")))[:20]
    np.testing.assert_array_equal(tokens, want_tokens.reshape(-1))
    np.testing.assert_array_equal(positions, np.tile(np.arange(HARVEST_CTX), 20))
    with torch.no_grad():
        hs = loaded.model(torch.from_numpy(want_tokens).long(), output_hidden_states=True).hidden_states[1]
    np.testing.assert_allclose(acts, hs.reshape(-1, hs.shape[-1]).numpy(), rtol=1e-5, atol=1e-5)
    st = cache.stats(site)
    np.testing.assert_allclose(st["mean_sq_norm"], (acts.astype(np.float64) ** 2).sum(1).mean(), rtol=1e-6)


def test_several_layers_one_pass_and_sites(tmp_path, tiny_gpt2_dir, tiny_corpus):
    out = tmp_path / "c"
    run_harvest(harvest_config(tiny_gpt2_dir, tiny_corpus["txt"], out, layers=[0, 2], site="resid_post",
                               tokens=HARVEST_CTX * 4), progress=False)
    cache = Cache.open(out)
    assert cache.spec.site_names == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert cache.spec.sites[1].hf_module == "transformer.h.2"


def test_rerun_is_byte_identical_and_noop_when_sealed(reference_cache, tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "again"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out), progress=False)
    assert cache_bytes(out) == cache_bytes(reference_cache)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out), progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p in before}


@pytest.mark.parametrize("fault", ["shard_write@3", "shard_mid_write@2", "ledger_record@4", "seal"])
def test_kill9_then_resume_is_byte_identical(reference_cache, tmp_path, tiny_llama_dir, tiny_corpus, fault):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out)]
    harvest_killed_then_rerun(args, fault, between=lambda: not_sealed(out))
    assert cache_bytes(out) == cache_bytes(reference_cache)
    assert Cache.open(out).verify() == []


def test_kill9_at_random_time_then_resume(reference_cache, tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "ledger").glob("shard-000001.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert cache_bytes(out) == cache_bytes(reference_cache)


def test_two_ranks_make_the_same_cache(reference_cache, tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "ranks"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cache_bytes(out) == cache_bytes(reference_cache)


def test_identity_mismatch_names_field_and_touches_nothing(reference_cache, tiny_llama_dir, tiny_gpt2_dir, tiny_corpus):
    before = cache_bytes(reference_cache)
    runner = CliRunner()
    for extra, field in [(["--context-length", "8"], "context_length"), (["--dtype", "float16"], "dtype"),
                         (["--site", "resid_post"], "sites")]:
        args = harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], reference_cache) + extra
        r = runner.invoke(harvest_cli, args)
        assert r.exit_code == 2 and field in r.output, r.output
    r = runner.invoke(harvest_cli, harvest_cli_args(tiny_gpt2_dir, tiny_corpus["jsonl"], reference_cache))
    assert r.exit_code == 2 and "model." in r.output
    r = runner.invoke(harvest_cli, harvest_cli_args(tiny_llama_dir, tiny_corpus["txt"], reference_cache))
    assert r.exit_code == 2 and "dataset." in r.output
    assert cache_bytes(reference_cache) == before


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_llama_dir, tiny_corpus):
    runner = CliRunner()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one two\n")
    cases = [
        (harvest_cli_args(tiny_llama_dir, tiny_corpus["txt"], tmp_path / "a", "--layer", "40"), "out of range"),
        (harvest_cli_args(tiny_llama_dir, tmp_path / "nope.jsonl", tmp_path / "b"), "nope.jsonl"),
        (harvest_cli_args(tiny_llama_dir, empty, tmp_path / "c"), "empty.txt: corpus has 0 tokens"),
        (harvest_cli_args(tiny_llama_dir, tiny, tmp_path / "d"), "fewer than one context"),
        (harvest_cli_args(tmp_path / "no-model", tiny_corpus["txt"], tmp_path / "e"), "no-model"),
    ]
    for args, needle in cases:
        r = runner.invoke(harvest_cli, args)
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not list(tmp_path.glob("*/ledger/*.json"))
    r = runner.invoke(harvest_cli, harvest_cli_args(tiny_llama_dir, tiny_corpus["txt"], tmp_path / "f",
                                                    "--site", "resid_middle"))
    assert r.exit_code == 2 and "resid_middle" in r.output


def test_float16_overflow_is_reported_with_layer(tmp_path, tiny_llama_dir, tiny_corpus):
    import shutil

    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    shutil.copytree(tiny_llama_dir, big)
    model = AutoModelForCausalLM.from_pretrained(big)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)
    model.save_pretrained(big)
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(big, tiny_corpus["txt"], tmp_path / "c", "--dtype", "float16"))
    assert r.exit_code == 2 and "float16 overflow" in r.output and "blocks.1.hook_resid_pre" in r.output
    assert not (tmp_path / "c" / "seal.json").exists()
    committed = Cache.open(tmp_path / "c", allow_unsealed=True)
    assert committed.verify() == [f"shard {k}: missing (no ledger record)" for k in range(committed.spec.n_shards) if k not in committed.ledger]
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(big, tiny_corpus["txt"], tmp_path / "d", "--dtype", "bfloat16"))
    assert r.exit_code == 0, r.output


def test_disk_full_keeps_committed_shards_and_resumes(reference_cache, tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    out = tmp_path / "full"
    monkeypatch.setenv("SAEFORGE_FAULT", "shard_mid_write@3:enospc")
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 2 and "disk full while writing shard 2" in r.output, r.output
    assert sorted(p.name for p in (out / "ledger").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    monkeypatch.delenv("SAEFORGE_FAULT")
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 0, r.output
    assert cache_bytes(out) == cache_bytes(reference_cache)


def test_second_writer_is_refused(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "c"
    cfg = harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out, tokens=HARVEST_CTX * 4)
    run_harvest(cfg, progress=False)  # creates the cache
    (out / "seal.json").unlink()
    with writer_lock(out, 0):
        with pytest.raises(CacheError, match="another harvest process"):
            run_harvest(cfg, progress=False)


def test_short_corpus_seals_what_exists(tmp_path, tiny_llama_dir, tiny_corpus):
    out = tmp_path / "c"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["txt"], out, tokens=10**7), progress=False)
    cache = Cache.open(out)
    assert cache.sealed and 0 < cache.n_rows < 10**7 and cache.n_rows % HARVEST_CTX == 0


def test_info_and_verify_cli(reference_cache, tmp_path):
    import shutil

    r = CliRunner().invoke(harvest_cli, ["info", str(reference_cache)])
    assert r.exit_code == 0 and "5 of 5 done, sealed" in r.output and "blocks.1.hook_resid_pre" in r.output
    r = CliRunner().invoke(harvest_cli, ["verify", str(reference_cache)])
    assert r.exit_code == 0 and "ok: 5 shards" in r.output
    bad = tmp_path / "bad"
    shutil.copytree(reference_cache, bad)
    chunk = bad / "acts/blocks.1.hook_resid_pre/c/3/0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    (bad / "tokens/c/1").unlink()
    r = CliRunner().invoke(harvest_cli, ["verify", str(bad)])
    assert r.exit_code == 1
    assert "shard 3: acts/blocks.1.hook_resid_pre" in r.output and "shard 1: tokens" in r.output


def test_default_batch_size_fills_a_gpu_with_8192_tokens():
    from harvest.runner import default_batch_size

    assert default_batch_size(torch.device("cpu"), 128) == 8
    assert [default_batch_size(torch.device("cuda"), t) for t in (128, 1024, 8192, 32768)] == [64, 8, 1, 1]
