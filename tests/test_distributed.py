"""Data-parallel training with torchrun (gloo, 2 CPU processes): same result as one process, and a
run killed on 2 ranks resumes on 1 (elastic: the global batch sequence is unchanged)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import cfg_for, final_weights
from train.checkpoints import list_checkpoints
from train.training import train_sae

ARGS = ["--arch", "topk", "--k", "4", "--expansion", "4", "--batch-size", "256", "--tokens", str(256 * 40),
        "--checkpoint-every", str(256 * 10), "--lr", "3e-3", "--wandb-mode", "disabled", "--quiet",
        "--set", "log_every=5", "--set", "density_every=10", "--set", "dead_tokens_threshold=2048",
        "--set", "b_dec_init=mean"]


def torchrun(store, out, fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    if fault:
        env["SAEFORGE_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train", "run", "--store", str(store), "--out", str(out), *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single_process_run(sparse_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return train_sae(None, cfg_for(sparse_cache, out, arch="topk"), progress=False)[1]


def assert_close(a, b):
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def test_two_ranks_match_one_process(sparse_cache, single_process_run, tmp_path):
    r = torchrun(sparse_cache, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs  # checkpoints and folders written once, by rank 0
    assert r.stdout.strip().splitlines()[-1] == str(runs[0])
    assert_close(final_weights(runs[0]), final_weights(single_process_run))


def test_killed_on_two_ranks_resumes_on_one(sparse_cache, single_process_run, tmp_path):
    r = torchrun(sparse_cache, tmp_path, fault="after_optimizer_step@25")
    assert r.returncode != 0
    run_dir = next(tmp_path.iterdir())
    assert not (run_dir / "done.json").exists() and list_checkpoints(run_dir)
    resumed = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(final_weights(run_dir), final_weights(single_process_run))
