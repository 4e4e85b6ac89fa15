"""Training transcoders and CLTs on pairs of sites: the sites a run resolves, learning, exact
resume after kill -9, sweeps of SAEs and transcoders on different sites from one store, and the
one-line errors. The cache (tests.helpers.build_transcoder_cache) has mlp_in and mlp_out at
layers 0 and 1, all driven by the same sparse codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from shared.cache import Cache
from tests.helpers import cfg_for, final_weights, train_cli_run, write_sweep_spec
from train.checkpoints import list_checkpoints, read_checkpoint
from train.cli import main as train_cli
from train.config import ConfigError, get_default_cfg, update_cfg
from train.site_pairs import SiteError, plan_of, resolve_run_sites
from train.sweep import run_sweep
from train.training import train_sae

IN0, OUT0 = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
IN1, OUT1 = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
LEARN = dict(tokens=256 * 120, lr=1e-2)  # enough steps for a transcoder to learn the synthetic map


def _resolved(cache, **keys):
    return resolve_run_sites(update_cfg(get_default_cfg(), store=str(cache), **keys), Cache.open(cache).spec)


def test_sites_resolve_from_names_kinds_and_defaults(transcoder_cache):
    tc = _resolved(transcoder_cache, arch="transcoder")
    assert (tc.in_site, tc.out_site, tc.site) == (IN0, OUT0, IN0)  # mlp_in -> mlp_out at the lowest layer with both
    tc = _resolved(transcoder_cache, arch="skip_transcoder", out_site=OUT1)
    assert (tc.in_site, tc.out_site) == (IN1, OUT1)  # the input kind at the target's layer
    tc = _resolved(transcoder_cache, arch="transcoder", in_site=OUT0, out_site="mlp_out")
    assert (tc.in_site, tc.out_site) == (OUT0, OUT0)
    clt = _resolved(transcoder_cache, arch="clt")
    assert (clt.in_site, clt.out_site) == (f"{IN0},{IN1}", f"{OUT0},{OUT1}")
    plan = plan_of(clt)
    assert plan.sites == [IN0, IN1, OUT0, OUT1] and plan.stacked
    one = _resolved(transcoder_cache, arch="clt", in_site=IN1)
    assert (one.in_site, one.out_site) == (IN1, OUT1)
    sae = _resolved(transcoder_cache, arch="topk")
    assert sae.site == IN0 and plan_of(sae).outputs is None
    with pytest.raises(SiteError, match=r"in_site='resid_mid' is neither a site nor a site kind of the cache \(its sites: "):
        _resolved(transcoder_cache, arch="transcoder", in_site="resid_mid")
    with pytest.raises(ConfigError, match="in_site names 2 sites and out_site 1: a clt needs one of each per layer"):
        _resolved(transcoder_cache, arch="clt", in_site=f"{IN0},{IN1}", out_site=OUT0)


@pytest.mark.parametrize("arch,extra", [("transcoder", {}), ("transcoder", {"sparsity": "vanilla", "l1_coeff": 0.5}),
                                        ("skip_transcoder", {"sparsity": "jumprelu", "l0_coeff": 0.05,
                                                             "threshold_init": 0.05}),
                                        ("clt", {"sparsity": "batchtopk"})])
def test_each_shape_learns(transcoder_cache, tmp_path, arch, extra):
    sae, run_dir = train_sae(None, cfg_for(transcoder_cache, tmp_path, arch=arch, **LEARN, **extra), progress=False)
    done = json.loads((run_dir / "done.json").read_text())
    held = done["results"]["heldout"]
    assert held["explained_variance"] > 0.5, held  # of the target site, from the input site
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["sparsity"] == extra.get("sparsity") and cfg["site"] == IN0 and cfg["in_site"].startswith(IN0)
    state = json.loads((list_checkpoints(run_dir)[-1] / "state.json").read_text())
    assert state["sae"]["arch"] == arch and state["sae"]["args"]["sparsity"] == extra.get("sparsity", "topk")
    assert set(state["scaling_factors"]) == set(plan_of(sae_cfg := update_cfg(get_default_cfg(), **cfg)).sites)
    factors = state["scaling_factors"]
    assert factors[IN0] != factors[OUT0]  # each site has its own dataset scaling
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "l0", "explained_variance", "dead_latents", "grad_norm"} <= set(metrics[0])
    if arch == "clt":
        assert {"fvu/0", "fvu/1", "l0/0", "l0/1"} <= set(metrics[0]) and sae.d_sae == 2 * 64
        assert done["results"]["threshold_kind"] == "global" and sae.calibrated
        assert abs(done["results"]["inference_l0"] - 8) < 5  # k = 4 per layer, 2 layers
        assert sae_cfg.run_name.startswith("clt_batchtopk_2layers_ln2.hook_normalized-hook_mlp_out_64_k4_")
    if arch == "skip_transcoder":
        assert float(sae.W_skip.detach().abs().sum()) > 0  # the skip map trained away from its zero init


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch,sparsity,fault", [("transcoder", "topk", "after_optimizer_step@17"),
                                                 ("skip_transcoder", "jumprelu", "checkpoint_mid_write@2"),
                                                 ("clt", "batchtopk", "after_optimizer_step@23")])
def test_kill9_and_resume_is_bit_identical(transcoder_cache, tmp_path, arch, sparsity, fault):
    _, reference = train_sae(None, cfg_for(transcoder_cache, tmp_path / "ref", arch=arch, sparsity=sparsity),
                             progress=False)
    first = train_cli_run(transcoder_cache, tmp_path / "cut", fault, arch=arch, extra=["--sparsity", sparsity])
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = next((tmp_path / "cut").iterdir())
    assert run_dir.name == reference.name and not (run_dir / "done.json").exists()
    for ckpt in list_checkpoints(run_dir):
        read_checkpoint(ckpt)
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same(final_weights(run_dir), final_weights(reference))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


def test_a_sweep_trains_saes_and_transcoders_on_different_sites_from_one_store(transcoder_cache, tmp_path,
                                                                                  monkeypatch):
    from train import activation_store

    opened = []
    original = activation_store.ActivationStore.__init__

    def counting(self, *args, **kwargs):
        opened.append(kwargs.get("sites"))
        original(self, *args, **kwargs)

    spec = write_sweep_spec(tmp_path / "s.toml", transcoder_cache, tmp_path / "out",
                            'arch = ["topk", "transcoder", "clt"]', k=4)
    monkeypatch.setattr(activation_store.ActivationStore, "__init__", counting)
    sweep_dir = run_sweep(spec, progress=False)
    monkeypatch.undo()
    assert len(opened) == 1 and sorted(opened[0]) == sorted([IN0, IN1, OUT0, OUT1])  # one store, every site once
    record = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    solo_out = tmp_path / "solo"
    for rec in record:
        cfg = update_cfg(get_default_cfg(), **{k: v for k, v in rec["config"].items() if k not in ("out", "run_name",
                                                                                                   "wandb_group")})
        _, solo = train_sae(None, update_cfg(cfg, out=str(solo_out)), progress=False)
        _assert_same(final_weights(sweep_dir / rec["run_dir"]), final_weights(solo))
    assert {r["config"]["arch"] for r in record} == {"topk", "transcoder", "clt"}


def test_one_line_errors(transcoder_cache, tmp_path):
    cases = [
        (["--arch", "transcoder", "--in-site", "blocks.7.hook_resid_mid"], "in_site='blocks.7.hook_resid_mid' is neither"),
        (["--arch", "topk", "--in-site", "mlp_in"], "in_site is for transcoders"),
        (["--arch", "transcoder", "--set", "sparsity=nope"], "sparsity='nope' is not one of vanilla, topk, batchtopk, jumprelu"),
        (["--arch", "clt", "--set", "memory_limit_gib=0.000001"], "this clt needs about"),
        (["--arch", "transcoder", "--in-site", f"{IN0},{IN1}"], "names several sites; a transcoder reads one"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(train_cli, ["run", "--store", str(transcoder_cache), "--out", str(tmp_path), "--quiet",
                                           "--tokens", "2560", "--batch-size", "256", "--wandb-mode", "disabled", *args])
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.stderr and "Traceback" not in r.output, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # refused before any run folder was made
