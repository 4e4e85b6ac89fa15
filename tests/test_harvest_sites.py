"""Harvests of several sites at all layers in one pass (--site mlp_in --site mlp_out --layer all):
provenance, values, one forward per batch, the store serving two sites of one row, kill -9
resume, --layer values, the disk-space check, and the refusals of sites an architecture lacks."""

from __future__ import annotations

import shutil
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import harvest.runner as runner
import harvest.space as space
import shared.faults as faults
from harvest.cli import main as harvest_cli
from harvest.repair import harvest_command
from harvest.runner import run_harvest
from harvest.selection import expand_layers, format_layers, layer_selection, parse_layer_value, site_kinds
from shared.cache import Cache
from shared.hook_sites import HookSiteError, find_block_list
from shared.models import load_model
from tests.helpers import (HARVEST_CTX, N_LAYERS, cache_bytes, harvest_cli_args, harvest_config,
                           harvest_killed_then_rerun, not_sealed)
from train.activation_store import ActivationStore

KINDS = ["mlp_in", "mlp_out"]
NAMES = [n for L in range(N_LAYERS) for n in (f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out")]
MULTI = ["--site", "mlp_out", "--site", "mlp_in", "--layer", "all"]  # kinds typed out of block order on purpose


def multi_args(model_dir, corpus, out, *extra):
    """harvest_cli_args (layer 1, 20 contexts, 5 shards, float32) with every layer and mlp_in + mlp_out."""
    args = harvest_cli_args(model_dir, corpus, out, *MULTI, *extra)
    i = args.index("--layer")
    return args[:i] + args[i + 2 :]


@pytest.fixture(scope="module")
def multi_cache(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> Path:
    """tiny Llama, mlp_in + mlp_out at all 4 layers, the reference harvest's 5 shards, by the CLI."""
    out = tmp_path_factory.mktemp("multi") / "cache"
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 0, r.output
    return out


def test_provenance_and_size_line(multi_cache, tiny_llama_dir, tiny_corpus, tmp_path):
    cache = Cache.open(multi_cache)
    spec = cache.spec
    assert spec.site_names == NAMES and len(cache.shards) == 5
    rec = {s.name: s for s in spec.sites}
    assert rec["blocks.2.ln2.hook_normalized"].to_dict() == {
        "name": "blocks.2.ln2.hook_normalized", "layer": 2, "kind": "mlp_in",
        "hf_module": "model.layers.2.post_attention_layernorm", "hf_io": "output"}
    assert rec["blocks.2.hook_mlp_out"].to_dict() == {  # the original kinds' records are unchanged
        "name": "blocks.2.hook_mlp_out", "layer": 2, "kind": "mlp_out", "hf_module": "model.layers.2.mlp"}
    assert rec["blocks.2.hook_mlp_out"].io == "output"
    # the size line: 5 shards x 64 rows x 8 sites x 32 x 4 bytes (+ 8 bytes a row) = 330,240 bytes
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], tmp_path / "c"))
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("harvest: writing"))
    assert "322.5 KiB (5 shards x 64 rows x 8 sites x 32 x 4 bytes + token ids and positions)" in line
    assert cache_bytes(tmp_path / "c") == cache_bytes(multi_cache)


def test_values_one_forward_per_batch_and_same_bytes_as_single_site(multi_cache, tmp_path, tiny_llama_dir,
                                                                     tiny_corpus, monkeypatch):
    cache = Cache.open(multi_cache)
    loaded = load_model(str(tiny_llama_dir))
    _, blocks = find_block_list(loaded.model)
    with torch.no_grad():
        for L in range(N_LAYERS):
            x = np.concatenate([cache.read_acts(f"blocks.{L}.ln2.hook_normalized", k) for k in cache.shards])
            y = np.concatenate([cache.read_acts(f"blocks.{L}.hook_mlp_out", k) for k in cache.shards])
            np.testing.assert_allclose(blocks[L].mlp(torch.from_numpy(x)).numpy(), y, rtol=1e-5, atol=1e-5)
    calls = []
    real = runner.capture
    monkeypatch.setattr(runner, "capture", lambda model, sites, *a, **k: calls.append(len(sites)) or real(model, sites, *a, **k))
    out = tmp_path / "again"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out, layers="all", site=["mlp_in", "mlp_out"]),
                progress=False)
    assert calls == [8] * 7  # 20 contexts in batches of 3: 7 forward passes, each capturing all 8 sites
    assert cache_bytes(out) == cache_bytes(multi_cache)
    # each site's bytes are those of a harvest of that site alone
    for layer, kind, name in [(3, "mlp_out", "blocks.3.hook_mlp_out"), (0, "mlp_in", "blocks.0.ln2.hook_normalized")]:
        alone = tmp_path / f"alone-{kind}"
        run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], alone, layers=[layer], site=kind), progress=False)
        for k in range(5):
            assert (alone / f"acts/{name}/c/{k}/0").read_bytes() == (multi_cache / f"acts/{name}/c/{k}/0").read_bytes()


def test_store_serves_two_sites_of_one_row(multi_cache, tiny_llama_dir):
    """ActivationStore(sites=[mlp_in, mlp_out]) gives both sites of the same rows, in the same order."""
    cache = Cache.open(multi_cache)
    sites = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    full = {s: np.concatenate([cache.read_acts(s, k) for k in cache.shards]) for s in sites}
    rps = cache.spec.rows_per_shard
    _, blocks = find_block_list(load_model(str(tiny_llama_dir)).model)
    with ActivationStore(multi_cache, sites=sites, batch_size=40, window_shards=2, seed=3) as store:
        for _ in range(6):
            ids = store.row_ids(store.position, 40)
            batch = store.next_batch()
            assert sorted(batch) == sorted(sites)
            rows = ids[:, 0] * rps + ids[:, 1]
            assert len(set(rows.tolist())) == 40
            for s in sites:
                np.testing.assert_array_equal(batch[s].numpy(), full[s][rows])
            with torch.no_grad():  # row i of one site is row i of the other
                torch.testing.assert_close(blocks[1].mlp(batch[sites[0]]), batch[sites[1]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault", ["site_write@13", "shard_mid_write@2", "ledger_record@4"])
def test_kill9_then_resume_is_byte_identical(multi_cache, tmp_path, tiny_llama_dir, tiny_corpus, fault):
    """site_write@13: killed in shard 1 with 5 of its 8 site chunk files written."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "harvest", *multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out)]
    harvest_killed_then_rerun(args, fault, between=lambda: not_sealed(out))
    assert cache_bytes(out) == cache_bytes(multi_cache)
    assert Cache.open(out).verify() == []


def test_repair_command_rebuilds_the_multi_site_harvest(multi_cache):
    command = harvest_command(multi_cache, Cache.open(multi_cache).spec)
    assert " --layer 0-3 --site mlp_in --site mlp_out " in command


# --------------------------------------------------------------------------- --layer and --site values


def test_layer_values():
    assert parse_layer_value("all") == "all" and parse_layer_value("ALL") == "all"
    assert parse_layer_value("2-5") == (2, 3, 4, 5) and parse_layer_value("1,3") == (1, 3)
    assert parse_layer_value("7, 1-2") == (7, 1, 2) and parse_layer_value("-1") == (-1,)
    for bad in ("2-x", "", "1,,2", "1.5", "one"):
        with pytest.raises(ValueError, match="is not a layer"):
            parse_layer_value(bad)
    with pytest.raises(ValueError, match="runs backwards; write 1-3"):
        parse_layer_value("3-1")
    assert layer_selection([(3,), (1, 2), (2,)]) == [1, 2, 3]
    assert layer_selection([(3,), "all"]) == "all"
    assert expand_layers("all", 4, "llama") == [0, 1, 2, 3] and expand_layers([2, 0, 2], 4, "llama") == [2, 0]
    with pytest.raises(HookSiteError) as e:
        expand_layers([1, 4], 4, "llama")
    assert str(e.value) == "--layer 4 is out of range: model llama has 4 layers (0..3)"
    assert format_layers([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and format_layers([1]) == "1"
    assert site_kinds(["mlp_out", "mlp_in", "mlp_out"]) == ["mlp_in", "mlp_out"] and site_kinds("resid_post") == ["resid_post"]
    with pytest.raises(HookSiteError, match="unknown --site 'hook_z'"):
        site_kinds(["hook_z"])


def test_layer_ranges_and_repeats_on_the_cli(tmp_path, tiny_gpt2_dir, tiny_corpus):
    out = tmp_path / "c"
    args = harvest_cli_args(tiny_gpt2_dir, tiny_corpus["txt"], out, "--layer", "3", "--layer", "0,2-3",
                            "--site", "mlp_in", "--site", "resid_mid", "--tokens", str(HARVEST_CTX * 4))
    r = CliRunner().invoke(harvest_cli, args)
    assert r.exit_code == 0, r.output
    cache = Cache.open(out)
    assert cache.spec.site_names == [n for L in (0, 1, 2, 3)
                                     for n in (f"blocks.{L}.hook_resid_mid", f"blocks.{L}.ln2.hook_normalized")]
    assert [(s.hf_module, s.hf_io) for s in cache.spec.sites[:2]] == [("transformer.h.0.ln_2", "input"),
                                                                      ("transformer.h.0.ln_2", "output")]
    _, blocks = find_block_list(load_model(str(tiny_gpt2_dir)).model)
    with torch.no_grad():  # both inputs of the MLP branch from one pass: mlp_in = ln_2(resid_mid)
        mid = torch.from_numpy(np.array(cache.read_acts("blocks.2.hook_resid_mid", 0)))
        np.testing.assert_allclose(blocks[2].ln_2(mid).numpy(), cache.read_acts("blocks.2.ln2.hook_normalized", 0),
                                   rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- disk space


def _usage(free):
    return lambda path: namedtuple("usage", "total used free")(10**12, 0, free)


def _need(shards):
    return shards * 64 * (8 * 32 * 4 + 8)  # the multi-site harvest's bytes per shard


def test_space_check_refuses_before_anything_is_written(tmp_path, tiny_llama_dir, tiny_corpus, monkeypatch):
    monkeypatch.setattr(space.shutil, "disk_usage", _usage(_need(5) + space.MARGIN_MIN - 1))
    out = tmp_path / "deep" / "cache"
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert f"--out {out}: the cache needs 322.5 KiB (5 shards x 64 rows x 8 sites" in r.output
    assert f"64.0 MiB margin, but the file system of {tmp_path} has" in r.output and "--no-space-check" in r.output
    assert not (tmp_path / "deep").exists()
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out, "--no-space-check"))
    assert r.exit_code == 0 and "(not checked: --no-space-check)" in r.output, r.output
    monkeypatch.setattr(space.shutil, "disk_usage", _usage(_need(5) + space.MARGIN_MIN))
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], tmp_path / "fits"))
    assert r.exit_code == 0, r.output


def test_space_check_on_resume_counts_only_the_shards_left(multi_cache, tmp_path, tiny_llama_dir, tiny_corpus,
                                                          monkeypatch):
    out = tmp_path / "partial"
    monkeypatch.setattr(faults, "_hits", {})  # the fault count is per process; other in-process tests hit it too
    monkeypatch.setenv("SAEFORGE_FAULT", "shard_mid_write@3:enospc")
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 2 and "disk full while writing shard 2" in r.output, r.output
    monkeypatch.delenv("SAEFORGE_FAULT")
    monkeypatch.setattr(space.shutil, "disk_usage", _usage(_need(3) + space.MARGIN_MIN - 1))
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 2 and "3 of 5 shards x 64 rows" in r.output, r.output
    monkeypatch.setattr(space.shutil, "disk_usage", _usage(_need(3) + space.MARGIN_MIN))
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))
    assert r.exit_code == 0 and "harvest: writing 193.5 KiB (3 of 5 shards" in r.output, r.output
    assert cache_bytes(out) == cache_bytes(multi_cache)
    r = CliRunner().invoke(harvest_cli, multi_args(tiny_llama_dir, tiny_corpus["jsonl"], out))  # sealed: nothing to write
    assert r.exit_code == 0 and "harvest: writing" not in r.output, r.output


def test_space_plan_for_a_url_skips_the_check(multi_cache, monkeypatch):
    def boom(path):
        raise AssertionError("disk_usage must not be called for a URL")

    monkeypatch.setattr(space.shutil, "disk_usage", boom)
    line = space.plan_space("s3://bucket/acts", Cache.open(multi_cache).spec)
    assert line == ("harvest: the cache takes 322.5 KiB (5 shards x 64 rows x 8 sites x 32 x 4 bytes + token ids and "
                    "positions) on s3://bucket/acts; free space not checked (a URL)")
    assert space.human_bytes(512) == "512 B" and space.human_bytes(3 * 2**40) == "3.0 TiB"


# --------------------------------------------------------------------------- sites an architecture lacks


@pytest.fixture(scope="module")
def tiny_olmo2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Olmo2 (post-norms only: no pre-MLP norm) saved with the tiny tokenizer."""
    from transformers import AutoTokenizer, Olmo2Config, Olmo2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = Olmo2Config(num_hidden_layers=N_LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=128, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None)
    out = tmp_path_factory.mktemp("olmo2")
    Olmo2ForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch,extra,needles", [
    ("neox", ["--site", "mlp_in", "--site", "resid_mid"],
     ["site resid_mid (blocks.1.hook_resid_mid) of layer 1 of model gpt_neox does not exist: its blocks are parallel",
      "harvest resid_pre (the MLP's residual input) or mlp_in"]),
    ("olmo2", ["--site", "mlp_in"],
     ["site mlp_in (blocks.1.ln2.hook_normalized) of layer 1 of model olmo2 has no module",
      "its MLP reads the residual stream directly: harvest resid_mid"]),
    ("llama", ["--layer", "2-5"], ["--layer 4 is out of range: model llama has 4 layers (0..3)"]),
])
def test_sites_the_model_lacks_are_one_line_errors(arch, extra, needles, request, tmp_path, tiny_corpus):
    model_dir = request.getfixturevalue("tiny_olmo2_dir" if arch == "olmo2" else f"tiny_{arch}_dir")
    out = tmp_path / "c"
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(model_dir, tiny_corpus["txt"], out, *extra))
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in r.output, r.output
    assert not out.exists()


def test_olmo2_resid_mid_harvest(tiny_olmo2_dir, tiny_corpus, tmp_path):
    out = tmp_path / "c"
    r = CliRunner().invoke(harvest_cli, harvest_cli_args(tiny_olmo2_dir, tiny_corpus["txt"], out, "--site", "resid_mid",
                                                         "--site", "mlp_out", "--tokens", str(HARVEST_CTX * 4)))
    assert r.exit_code == 0, r.output
    assert [(s.name, s.hf_module, s.hf_io) for s in Cache.open(out).spec.sites] == [
        ("blocks.1.hook_resid_mid", "model.layers.1.mlp", "input"),
        ("blocks.1.hook_mlp_out", "model.layers.1.post_feedforward_layernorm", None)]
    shutil.rmtree(out)


def test_evaluation_finds_the_new_sites_in_the_harvested_model(multi_cache):
    """train.evaluation.load_lm (the CE-loss splice's site lookup) resolves mlp_in to the module the cache hooked."""
    from train.evaluation import load_lm

    _, site, _ = load_lm(Cache.open(multi_cache), "blocks.2.ln2.hook_normalized", None, torch.device("cpu"))
    assert (site.kind, site.hf_module, site.io) == ("mlp_in", "model.layers.2.post_attention_layernorm", "output")
