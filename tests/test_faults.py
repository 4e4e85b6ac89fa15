"""Fault injection beyond kill -9: a full disk while checkpointing, damaged checkpoints, damaged
ledger records, and the `harvest verify --repair` recovery (harvest/repair.py).

The kill -9 cases at named points live in test_harvest.py / test_training.py / test_sweep.py and
the random-time kills in test_soak.py; nothing here repeats them.
"""

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from harvest.repair import repair_cache
from harvest.runner import run_harvest, writer_lock
from shared.cache import Cache, CacheError
from tests.helpers import HARVEST_CTX, final_weights, harvest_config, train_cli_args, write_sweep_spec
from train.checkpoints import list_checkpoints, read_checkpoint
from train.cli import main as train_cli

SITE = "blocks.1.hook_resid_pre"



def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def flip_bit(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- training


def test_disk_full_while_checkpointing_then_resume(sparse_cache, reference_run, tmp_path, fault):
    fault("checkpoint_mid_write@2:enospc")
    r = CliRunner().invoke(train_cli, train_cli_args(sparse_cache, tmp_path))
    assert r.exit_code == 2, (r.output, r.exception)
    assert "disk full" in r.output and "no space left on device" in r.output, r.output
    assert "step-000000020" in r.output and "previous checkpoint step-000000010 is intact" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    run_dir = next(tmp_path.iterdir())
    assert f"train resume {run_dir}" in r.output
    # the previous checkpoint is intact and loadable; the partial one is gone (its space given back)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000000010"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    _, _, state = read_checkpoint(list_checkpoints(run_dir)[-1])
    assert state["step"] == 10
    fault(None)
    r = CliRunner().invoke(train_cli, ["resume", str(run_dir), "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert_same_weights(final_weights(run_dir), final_weights(reference_run))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["step"] for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == want


def test_disk_full_while_checkpointing_a_sweep_then_resume(sparse_cache, tmp_path, fault):
    from train.sweep import run_sweep

    grid = 'arch = ["topk", "batchtopk"]\nk = [4]'
    ref = run_sweep(write_sweep_spec(tmp_path / "ref.toml", sparse_cache, tmp_path / "ref", grid=grid), progress=False)
    spec = write_sweep_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs", grid=grid)
    fault("checkpoint_mid_write@3:enospc")  # step 20 of the first SAE (each checkpoints at 10, 20, 30)
    r = CliRunner().invoke(train_cli, ["sweep", str(spec), "--quiet"])
    assert r.exit_code == 2 and "disk full" in r.output, (r.output, r.exception)
    sweep_dir = next((tmp_path / "runs").iterdir())
    assert f"train resume {sweep_dir}`" in r.output, r.output  # the sweep, not one of its runs
    fault(None)
    r = CliRunner().invoke(train_cli, ["resume", str(sweep_dir), "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    for a, b in zip(sorted(p for p in ref.iterdir() if p.is_dir()), sorted(p for p in sweep_dir.iterdir() if p.is_dir()),
                    strict=True):
        assert a.name == b.name
        assert_same_weights(final_weights(b), final_weights(a))


@pytest.mark.parametrize("damage", ["flip a byte of sae.safetensors", "flip a byte of trainer.pt",
                                    "truncate state.json"])
def test_damaged_newest_checkpoint_resume_names_it_and_falls_back(reference_run, tmp_path, damage):
    """The reference run's last two checkpoints are steps 30 and 40 (final); damage 40, drop done.json:
    resume must say which checkpoint is bad, go back to step 30 and end bit-identical."""
    run_dir = tmp_path / reference_run.name
    shutil.copytree(reference_run, run_dir)
    (run_dir / "done.json").unlink()
    bad, previous = list_checkpoints(run_dir)[-1], list_checkpoints(run_dir)[-2]
    assert (bad.name, previous.name) == ("step-000000040", "step-000000030")
    if damage.startswith("flip"):
        flip_bit(bad / damage.split()[-1], offset=len((bad / damage.split()[-1]).read_bytes()) // 2)
        reason = "fails its checksum"
    else:
        text = (bad / "state.json").read_text()
        (bad / "state.json").write_text(text[: len(text) // 2])
        reason = "unreadable"
    with pytest.warns(UserWarning, match=f"checkpoint {bad}.*{reason}.*falling back to the previous checkpoint"):
        r = CliRunner().invoke(train_cli, ["resume", str(run_dir), "--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (run_dir / "done.json").exists()
    assert_same_weights(final_weights(run_dir), final_weights(reference_run))


# --------------------------------------------------------------------------- harvest: verify


def copy_cache(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def data_files(root: Path) -> dict[str, bytes]:
    """Every data, metadata, ledger and seal file (locks and the quarantine aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and "quarantine" not in p.relative_to(root).parts
    }


def test_verify_names_shard_of_garbage_ledger_record(reference_cache, tmp_path):
    bad = copy_cache(reference_cache, tmp_path / "bad")
    (bad / "ledger/shard-000002.json").write_text('{"shard": 2, "rows": 64, "check')
    r = CliRunner().invoke(harvest_cli, ["verify", str(bad)])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "shard-000002.json" in r.output and "corrupt" in r.output, r.output


def test_verify_names_shard_of_ledger_record_with_wrong_checksum(reference_cache, tmp_path):
    bad = copy_cache(reference_cache, tmp_path / "bad")
    rec_path = bad / "ledger/shard-000004.json"
    rec = json.loads(rec_path.read_text())
    rec["checksums"]["tokens"] = "0" * 32
    rec_path.write_text(json.dumps(rec))
    r = CliRunner().invoke(harvest_cli, ["verify", str(bad)])
    assert r.exit_code == 1, r.output
    assert "shard 4: tokens file" in r.output and "fails its checksum" in r.output, r.output
    assert "shard 3" not in r.output


# --------------------------------------------------------------------------- harvest: repair


def rerun_printed_command(command: str):
    args = shlex.split(command)
    assert args[:2] == ["harvest", "run"], command
    return CliRunner().invoke(harvest_cli, args[1:] + ["--quiet"])


def _damage(root: Path, kind: str) -> int:
    """Damage one shard of a sealed cache; returns the shard."""
    if kind == "flip a bit of an activation chunk":
        flip_bit(root / f"acts/{SITE}/c/3/0", offset=777)
        return 3
    if kind == "garbage ledger record":
        (root / "ledger/shard-000001.json").write_text("{not json")
        return 1
    if kind == "ledger record with a wrong checksum":
        p = root / "ledger/shard-000000.json"
        rec = json.loads(p.read_text())
        rec["checksums"][f"acts/{SITE}"] = "f" * 32
        p.write_text(json.dumps(rec))
        return 0
    if kind == "tokens chunk deleted":
        (root / "tokens/c/4").unlink()
        return 4
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["flip a bit of an activation chunk", "garbage ledger record",
                                  "ledger record with a wrong checksum", "tokens chunk deleted"])
def test_repair_then_rerun_restores_the_exact_cache(reference_cache, tmp_path, kind):
    original = data_files(reference_cache)
    root = copy_cache(reference_cache, tmp_path / "c")
    shard = _damage(root, kind)
    report = repair_cache(root)
    assert report.bad_shards == [shard] and report.missing_shards == []
    assert report.exit_code == 1 and report.problems and all(p.startswith(f"shard {shard}:") for p in report.problems)
    assert not (root / "seal.json").exists()
    moved = {src.relative_to(root).as_posix() for src, _ in report.moved}
    assert f"ledger/shard-{shard:06d}.json" in moved and "seal.json" in moved
    for _, dest in report.moved:  # nothing deleted: everything is in the quarantine folder
        assert dest.exists() and report.quarantine in dest.parents
    lines = report.lines()
    assert lines[-1].strip() == report.command and f"shards {shard} will be re-harvested" in "\n".join(lines)
    # the cache is now an unfinished harvest: verify names the shard, and training refuses it
    r = CliRunner().invoke(harvest_cli, ["verify", str(root)])
    assert r.exit_code == 1 and f"shard {shard}: missing" in r.output
    with pytest.raises(CacheError, match="not sealed"):
        Cache.open(root)
    r = rerun_printed_command(report.command)
    assert r.exit_code == 0, (r.output, r.exception)
    assert data_files(root) == original
    r = CliRunner().invoke(harvest_cli, ["verify", str(root)])
    assert r.exit_code == 0 and "ok: 5 shards verified" in r.output, r.output
    assert repair_cache(root).lines() == [f"ok: nothing to repair in {root}"]


def test_repair_of_short_corpus_restores_planned_length(tmp_path, tiny_llama_dir, tiny_corpus):
    """A seal shrinks the arrays to the rows of a short corpus; the repair undoes that so the last
    (short) shard can be written again at its offset."""
    ref = tmp_path / "ref"
    cfg = harvest_config(tiny_llama_dir, tiny_corpus["txt"], ref, tokens=10**5, shard_tokens=HARVEST_CTX * 64, batch_size=8)
    run_harvest(cfg, progress=False)
    cache = Cache.open(ref)
    last = cache.shards[-1]
    assert cache.n_rows < cache.spec.planned_rows and cache.shard_rows(last) < cache.spec.rows_per_shard
    original = data_files(ref)
    root = copy_cache(ref, tmp_path / "c")
    flip_bit(root / f"acts/{SITE}/c/{last}/0", offset=12345)
    report = repair_cache(root)
    assert report.bad_shards == [last] and report.missing_shards == []
    assert json.loads((root / f"acts/{SITE}/zarr.json").read_text())["shape"][0] == cache.spec.planned_rows
    args = shlex.split(report.command)
    assert args[args.index("--tokens") + 1] == str(cache.spec.planned_rows)
    r = CliRunner().invoke(harvest_cli, args[1:] + ["--quiet"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert data_files(root) == original
    assert Cache.open(root).verify() == []


def test_repair_of_healthy_or_unfinished_cache_moves_nothing(reference_cache, tmp_path):
    root = copy_cache(reference_cache, tmp_path / "c")
    before = data_files(root)
    report = repair_cache(root)
    assert report.exit_code == 0 and report.moved == [] and report.command is None
    assert data_files(root) == before
    # an unfinished harvest (records of shards 3, 4 absent, no seal) only needs the same command again
    (root / "seal.json").unlink()
    for k in (3, 4):
        (root / f"ledger/shard-{k:06d}.json").unlink()
    report = repair_cache(root)
    assert report.missing_shards == [3, 4] and report.bad_shards == [] and report.moved == []
    assert report.exit_code == 1 and report.command.startswith("harvest run --model ")
    assert "shards 3-4 will be re-harvested" in "\n".join(report.lines())


def test_repair_is_refused_while_a_harvest_writes(reference_cache, tmp_path):
    root = copy_cache(reference_cache, tmp_path / "c")
    flip_bit(root / "positions/c/2")
    with writer_lock(root, 0):
        with pytest.raises(CacheError, match="a harvest process is writing"):
            repair_cache(root)
    assert (root / "seal.json").exists() and (root / "ledger/shard-000002.json").exists()
    with pytest.raises(CacheError, match="not an activation cache"):
        repair_cache(tmp_path)


def test_repair_without_provenance_still_quarantines(sparse_cache, tmp_path):
    """A cache whose provenance names no model/dataset (here a synthetic one) is repaired all the
    same; the report says to rerun the original command, as it cannot rebuild it."""
    root = copy_cache(sparse_cache, tmp_path / "c")
    flip_bit(root / "acts/blocks.0.hook_resid_pre/c/2/0")
    report = repair_cache(root)
    assert report.bad_shards == [2] and report.exit_code == 1 and report.command is None
    assert not (root / "seal.json").exists() and not (root / "ledger/shard-000002.json").exists()
    assert "cannot be rebuilt" in report.lines()[-1]
