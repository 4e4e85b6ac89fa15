"""Sweeps: grid expansion, one pass over the store for all SAEs, equality with separate runs,
exact resume of the whole sweep after kill -9."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers import cfg_for, final_weights, write_sweep_spec
from train.config import ConfigError
from train.sweep import expand_spec, load_spec, run_sweep
from train.training import train_sae


def write_spec(path, store, out, grid='arch = ["topk", "batchtopk"]\nk = [2, 4]'):
    return write_sweep_spec(path, store, out, grid)


def test_spec_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nk = 3\n")
    with pytest.raises(ConfigError, match="grid.k must be a non-empty list"):
        load_spec(bad)
    bad.write_text("[bases]\nk = 3\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        load_spec(bad)
    with pytest.raises(ConfigError, match="batch_size is shared"):
        expand_spec({"grid": {"batch_size": [1, 2]}})
    with pytest.raises(ConfigError, match="unknown config key 'kk'"):
        expand_spec({"grid": {"kk": [1, 2]}})
    assert [c.k for c in expand_spec({"grid": {"k": [1, 2], "lr": [1e-3, 2e-3]}})] == [1, 1, 2, 2]


@pytest.fixture(scope="module")
def reference_sweep(sparse_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    spec = write_spec(out / "spec.toml", sparse_cache, out / "runs")
    return run_sweep(spec, progress=False)


def test_sweep_trains_each_sae_like_a_separate_run(reference_sweep, sparse_cache, tmp_path):
    record = json.loads((reference_sweep / "sweep.json").read_text())
    assert [(r["config"]["arch"], r["config"]["k"]) for r in record["runs"]] == [
        ("topk", 2), ("topk", 4), ("batchtopk", 2), ("batchtopk", 4)]
    for r in record["runs"]:
        run_dir = reference_sweep / r["run_dir"]
        done = json.loads((run_dir / "done.json").read_text())
        assert done["results"]["heldout"]["explained_variance"] > 0.3
        assert r["config"]["wandb_group"] == reference_sweep.name
    # the batchtopk k=4 member equals a separate run with the same config, bit for bit
    member = record["runs"][3]
    _, alone = train_sae(None, cfg_for(sparse_cache, tmp_path, arch="batchtopk", k=4), progress=False)
    a, b = final_weights(reference_sweep / member["run_dir"]), final_weights(alone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["checkpoint_mid_write@6", "after_optimizer_step@23"])
def test_sweep_resumes_exactly_after_kill9(reference_sweep, sparse_cache, tmp_path, fault):
    spec = write_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs")
    env = dict(os.environ, SAEFORGE_FAULT=fault)
    first = subprocess.run([sys.executable, "-m", "train", "sweep", str(spec), "--quiet"], env=env,
                           capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr
    sweep_dir = next((tmp_path / "runs").iterdir())
    env.pop("SAEFORGE_FAULT")
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(sweep_dir), "--quiet"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = json.loads((reference_sweep / "sweep.json").read_text())["runs"]
    got = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    for a_rec, b_rec in zip(ref, got):
        a, b = final_weights(reference_sweep / a_rec["run_dir"]), final_weights(sweep_dir / b_rec["run_dir"])
        assert all(torch.equal(a[k], b[k]) for k in a), b_rec["run_dir"]


def test_report_for_sweep_and_run(reference_sweep, tmp_path):
    import matplotlib.image as mpimg
    from click.testing import CliRunner

    from train.cli import main as train_cli

    r = CliRunner().invoke(train_cli, ["report", str(reference_sweep)])
    assert r.exit_code == 0, r.output
    md = (reference_sweep / "report.md").read_text()
    runs = json.loads((reference_sweep / "sweep.json").read_text())["runs"]
    assert all(rec["run_dir"] in md for rec in runs)
    for png in ("curves.png", "frontier.png"):
        img = mpimg.imread(reference_sweep / png)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
    assert (reference_sweep / runs[0]["run_dir"] / "report.png").exists()
    run_md = (reference_sweep / runs[0]["run_dir"] / "report.md").read_text()
    assert "explained_variance" in run_md
    r = CliRunner().invoke(train_cli, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no metrics.jsonl" in r.output


NEWER = {"l1_coeff": 0.5, "l0_coeff": 0.05, "target_l0": 4, "k": 4, "matryoshka_widths": "1/8,1/2"}


def test_a_sweep_mixes_the_newer_architectures(sparse_cache, tmp_path):
    """Matryoshka, Gated and JumpReLU (with a target L0) in one sweep: each member equals its
    separate run bit for bit, and the report knows Matryoshka's prefixes."""
    from click.testing import CliRunner

    from train.cli import main as train_cli

    spec = write_sweep_spec(tmp_path / "spec.toml", sparse_cache, tmp_path / "runs",
                            'arch = ["matryoshka", "gated", "jumprelu"]', name="mixed", **NEWER)
    sweep = run_sweep(spec, progress=False)
    record = json.loads((sweep / "sweep.json").read_text())["runs"]
    assert [r["config"]["arch"] for r in record] == ["matryoshka", "gated", "jumprelu"]
    for r in record:
        _, alone = train_sae(None, cfg_for(sparse_cache, tmp_path / r["config"]["arch"], arch=r["config"]["arch"],
                                           **NEWER), progress=False)
        a, b = final_weights(sweep / r["run_dir"]), final_weights(alone)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r["run_dir"]
    assert CliRunner().invoke(train_cli, ["report", str(sweep)]).exit_code == 0
    md = (sweep / record[0]["run_dir"] / "report.md").read_text()
    assert "explained_variance_prefix_8" in md and "explained_variance_prefix_32" in md
