"""A sweep spread over ranks (gloo, 2 CPU processes): rank r trains the SAEs i with i % 2 == r from
the same batches, and every SAE ends bit-identical to the one-process sweep; a sweep killed on 2
ranks resumes on 1 to the same weights."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import final_weights, write_sweep_spec
from train.checkpoints import list_checkpoints
from train.config import ConfigError
from train.sweep import load_spec, resume_sweep, run_sweep

STEPS, EVERY = 18, 6  # 18 steps of 256 rows, checkpoints at steps 6, 12 and the final one
LAST_TWO = [f"step-{STEPS - EVERY:09d}", f"step-{STEPS:09d}"]  # what keep_checkpoints = 2 leaves


def write_spec(path, store, out, top=""):
    return write_sweep_spec(path, store, out, 'arch = ["topk", "batchtopk", "jumprelu"]', name="ranks", top=top,
                            tokens=256 * STEPS, checkpoint_every=256 * EVERY, k=4)


def runs_of(sweep_dir):
    return [sweep_dir / r["run_dir"] for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]]


def logged_losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m.get("loss")) for m in map(json.loads, lines)]


def assert_same_runs(reference, sweep_dir):
    """Every SAE's final weights equal bit for bit, and its metrics.jsonl logs the same steps and
    losses once (one writer per SAE)."""
    ref_runs, got_runs = runs_of(reference), runs_of(sweep_dir)
    assert [r.name for r in ref_runs] == [r.name for r in got_runs]
    for a_dir, b_dir in zip(ref_runs, got_runs):
        assert (b_dir / "done.json").exists(), b_dir
        a, b = final_weights(a_dir), final_weights(b_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), b_dir.name
        assert logged_losses(a_dir) == logged_losses(b_dir), b_dir.name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn_name, path):
    """One rank of an mp.spawn world, as torchrun would set it up; runs train.sweep.<fn_name>(path)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        import train.sweep

        getattr(train.sweep, fn_name)(path, progress=False)
    finally:
        dist.destroy_process_group()


def spawn(fn_name, path, world_size=2):
    mp.spawn(_rank_main, args=(world_size, free_port(), fn_name, str(path)), nprocs=world_size, join=True)


@pytest.fixture(autouse=True)
def _gloo_env(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_process_sweep(sparse_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return run_sweep(write_spec(out / "spec.toml", sparse_cache, out / "runs"), progress=False)


def test_distribute_key_and_errors(sparse_cache, tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs", top='distribute = "sae"')
    assert load_spec(spec)["distribute"] == "sae"
    bad = write_spec(tmp_path / "bad.toml", sparse_cache, tmp_path / "runs", top='distribute = "data"')
    with pytest.raises(ConfigError, match="distribute = 'data' is not supported.*never data-parallel"):
        load_spec(bad)
    bad = write_spec(tmp_path / "bad2.toml", sparse_cache, tmp_path / "runs", top='distributed = "sae"')
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['distributed'\]"):
        load_spec(bad)
    gpus = write_spec(tmp_path / "gpus.toml", sparse_cache, tmp_path / "runs", top='devices = ["cpu"]')
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="remove devices"):
        run_sweep(gpus, progress=False)
    assert not (tmp_path / "runs").exists()


def test_two_ranks_match_one_process(one_process_sweep, sparse_cache, tmp_path):
    spec = write_spec(tmp_path / "spec.toml", sparse_cache, one_process_sweep.parent)
    # same configs, same out: the sweep name is the same, and the folder gets a -2 suffix
    spawn("run_sweep", spec)
    sweep_dir = one_process_sweep.parent / f"{one_process_sweep.name}-2"
    assert sorted(p.name for p in one_process_sweep.parent.iterdir()) == [one_process_sweep.name, sweep_dir.name]
    assert_same_runs(one_process_sweep, sweep_dir)
    for run_dir in runs_of(sweep_dir):  # every SAE checkpointed at the same steps
        assert [p.name for p in list_checkpoints(run_dir)] == LAST_TWO


def test_killed_on_two_ranks_resumes_on_one(one_process_sweep, sparse_cache, tmp_path):
    spec = write_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs")
    env = dict(os.environ, SAEFORGE_FAULT="after_optimizer_step@10")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train", "sweep", str(spec), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    runs = runs_of(sweep_dir)
    assert not any((d / "done.json").exists() for d in runs)
    steps = [{p.name for p in list_checkpoints(d)} for d in runs]
    assert "step-000000006" in set.intersection(*steps), steps  # the last common checkpoint before the kill
    resume_sweep(sweep_dir, progress=False)  # one process
    assert_same_runs(one_process_sweep, sweep_dir)


def test_resume_on_more_ranks_than_unfinished_saes(one_process_sweep, tmp_path):
    """Killed while finishing: one SAE is left, at step 12. Rank 0 trains it; rank 1 has none and idles."""
    sweep_dir = shutil.copytree(one_process_sweep, tmp_path / one_process_sweep.name)
    left = runs_of(sweep_dir)[1]
    (left / "done.json").unlink()
    shutil.rmtree(list_checkpoints(left)[-1])
    spawn("resume_sweep", sweep_dir)
    assert [p.name for p in list_checkpoints(left)] == LAST_TWO
    assert_same_runs(one_process_sweep, sweep_dir)
