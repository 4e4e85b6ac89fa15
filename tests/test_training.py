"""Training loop: config errors, the variants, exact resume after kill -9, accumulation,
NaN handling, thresholds, run folders, logs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.helpers import SITE, SPARSE_D, cfg_for, final_weights, kill9_and_resume, train_cli_run
from train.checkpoints import create_run_dir, latest_checkpoint, list_checkpoints, read_checkpoint
from train.cli import main as train_cli
from train.config import ConfigError, get_default_cfg, load_toml, parse_set, post_init_cfg, update_cfg
from train.training import Trainer, TrainingError, resume_training, train_sae

# sparse_cache, reference_run: tests/conftest.py


# --------------------------------------------------------------------------- config


def test_config_errors_name_the_key(tmp_path):
    cfg = get_default_cfg()
    with pytest.raises(ConfigError, match="unknown config key 'lrr'; did you mean 'lr'"):
        update_cfg(cfg, lrr=1e-3)
    with pytest.raises(ConfigError, match="'k' must be int"):
        update_cfg(cfg, k="many")
    with pytest.raises(ConfigError, match="k=64 is larger than dict_size=32"):
        update_cfg(cfg, k=64, dict_size=32)
    with pytest.raises(ConfigError, match="batch_size=4096 is not divisible by micro_batch_size=1000"):
        update_cfg(cfg, micro_batch_size=1000)
    with pytest.raises(ConfigError, match="arch='topkk'.*did you mean 'topk'"):
        update_cfg(cfg, arch="topkk")
    with pytest.raises(ConfigError, match="lr=-1.0 must be positive"):
        update_cfg(cfg, lr=-1)
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_set(["lr"])
    toml = tmp_path / "c.toml"
    toml.write_text('arch = "jumprelu"\nl0_coeff = 0.5\n[train]\nx = 1\n')
    with pytest.raises(ConfigError, match="table"):
        load_toml(toml)
    toml.write_text('[train]\narch = "jumprelu"\nl0_coeff = 0.5\ntokens = 1e6\n')
    cfg2 = update_cfg(cfg, **load_toml(toml))
    assert cfg2.arch == "jumprelu" and cfg2.l0_coeff == 0.5 and cfg2.tokens == 1_000_000
    assert update_cfg(cfg, **parse_set(["lr=1e-3", "micro_batch_size=1024", "site=none"])).micro_batch_size == 1024


def test_post_init_derives_fields_without_side_effects(tmp_path):
    cfg = post_init_cfg(update_cfg(get_default_cfg(), expansion=4, k=8, out=str(tmp_path / "nowhere")), d_in=16, site=SITE)
    assert cfg.d_in == 16 and cfg.dict_size == 64 and cfg.site == SITE
    assert cfg.run_name.startswith(f"topk_{SITE}_64_k8_")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(ConfigError, match="d_in=32 in the config.*d_model=16"):
        post_init_cfg(update_cfg(get_default_cfg(), d_in=32), d_in=16, site=SITE)


def test_run_dirs_are_never_reused(tmp_path):
    a = create_run_dir(tmp_path, "run")
    b = create_run_dir(tmp_path, "run")
    assert a != b and a.is_dir() and b.is_dir()


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("arch,extra", [("vanilla", {"l1_coeff": 0.5}), ("topk", {}), ("batchtopk", {}),
                                        ("jumprelu", {"l0_coeff": 0.05, "threshold_init": 0.05}),
                                        ("gated", {"l1_coeff": 0.5}), ("matryoshka", {})])
def test_each_variant_learns(sparse_cache, tmp_path, arch, extra):
    sae, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, arch=arch, **extra), progress=False)
    done = json.loads((run_dir / "done.json").read_text())
    held = done["results"]["heldout"]
    assert held["explained_variance"] > 0.5, held
    assert 0 < held["l0"] < (sae.d_sae / 2 if arch in ("vanilla", "gated") else 4 * 6), held
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 5 and metrics[-1]["step"] == 40
    first = next(m for m in metrics if "loss" in m)
    assert {"loss", "mse", "l0", "explained_variance", "dead_latents", "lr", "grad_norm", "tokens_per_s",
            "grad_norm/W_enc"} <= set(first)
    hist = next(m for m in metrics if "density_hist" in m)["density_hist"]
    assert sum(hist["counts"]) == sae.d_sae
    if arch in ("batchtopk", "matryoshka"):
        assert done["results"]["threshold_kind"] == "global"
        assert abs(done["results"]["inference_l0"] - 4) < 2.5
        assert sae.threshold_kind == "global"
    if arch == "matryoshka":  # each inner prefix alone, nested: the wider, the better
        prefix = done["results"]["heldout_prefix"]
        assert list(prefix) == ["4", "16"]
        evs = [prefix["4"]["explained_variance"], prefix["16"]["explained_variance"], held["explained_variance"]]
        assert evs == sorted(evs) and evs[0] > 0, evs
        assert {"mse_prefix/4", "mse_prefix/16"} <= set(first)
    if arch == "gated":
        assert "mse_gate" in first


def test_per_feature_threshold(sparse_cache, tmp_path):
    sae, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, arch="batchtopk", threshold_kind="per_feature"),
                             progress=False)
    assert sae.threshold_kind == "per_feature" and sae.threshold.unique().numel() > 1
    tensors = load_file(str(list_checkpoints(run_dir)[-1] / "sae.safetensors"))
    assert torch.equal(tensors["threshold"], sae.threshold)


# --------------------------------------------------------------------------- resume


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fault", ["after_optimizer_step@17", "checkpoint_mid_write@2", "after_optimizer_step@40",
                                   "checkpoint_retire@1"])
def test_kill9_and_resume_is_bit_identical(sparse_cache, reference_run, tmp_path, fault):
    first = train_cli_run(sparse_cache, tmp_path, fault)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = next(tmp_path.iterdir())
    assert not (run_dir / "done.json").exists()
    for ckpt in list_checkpoints(run_dir):  # every committed checkpoint is whole, also one being deleted
        read_checkpoint(ckpt)
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(run_dir)
    _assert_same(final_weights(run_dir), final_weights(reference_run))
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporaries or half-deleted folders left
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line)["step"] for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == want


def test_uninterrupted_cli_run_prints_run_dir(sparse_cache, reference_run, tmp_path):
    r = train_cli_run(sparse_cache, tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path and (run_dir / "done.json").exists()
    _assert_same(final_weights(run_dir), final_weights(reference_run))


def test_damaged_newest_checkpoint_falls_back(sparse_cache, reference_run, tmp_path):
    first = train_cli_run(sparse_cache, tmp_path, "after_optimizer_step@25")
    assert first.returncode == -signal.SIGKILL
    run_dir = next(tmp_path.iterdir())
    newest = list_checkpoints(run_dir)[-1]
    (newest / "trainer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="fails its checksum"):
        _, ckpt, *_ = latest_checkpoint(run_dir)
    assert ckpt == list_checkpoints(run_dir)[-2]
    with pytest.warns(UserWarning):
        resume_training(None, None, run_dir, progress=False)
    _assert_same(final_weights(run_dir), final_weights(reference_run))


# The variants and options added with Matryoshka (issue 13), each with the state a resume must restore:
# k annealing mid-way at the kill, the quadratic L0 target with thresholds set from the first batch.
NEWER = {"matryoshka": {"k_anneal_tokens": 6000, "k_anneal_start": 12}, "gated": {"l1_coeff": 0.5},
         "jumprelu": {"target_l0": 4, "l0_coeff": 0.05, "jumprelu_pre_act_coeff": 1e-3, "jumprelu_freq_coeff": 0.1}}


@pytest.mark.parametrize("arch", list(NEWER))
def test_newer_variants_resume_bit_identically_after_kill9(sparse_cache, tmp_path, arch):
    over = NEWER[arch]
    run_dir, ref = kill9_and_resume(sparse_cache, tmp_path, arch, over)
    _assert_same(final_weights(run_dir), final_weights(ref))
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [m["step"] for m in want]
    assert [m.get("l0") for m in steps] == [m.get("l0") for m in want]
    if "k_anneal_tokens" in over:  # the logged L0 follows the annealed k down to k
        l0 = [m["l0"] for m in want if "l0" in m]
        assert l0[0] > 6 and l0[-1] == pytest.approx(4, abs=0.01), l0


# --------------------------------------------------------------------------- step mechanics


def test_gradient_accumulation_matches_one_large_batch(sparse_cache, tmp_path):
    from train.training import build_from_cfg, make_optimizer, open_store

    results = []
    for micro in (None, 64):
        cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, arch="topk", micro_batch_size=micro, aux_coeff=0.0),
                            SPARSE_D, SITE)
        store = open_store(cfg, torch.device("cpu"))
        sae = build_from_cfg(cfg, torch.device("cpu"))
        trainer = Trainer(cfg, sae, store, make_optimizer(cfg, sae), tmp_path, progress=False)
        for _ in range(3):
            trainer.train_step(store.next_batch())
        store.close()
        results.append({k: v.detach().clone() for k, v in sae.named_parameters()})  # dead counters count per micro-batch
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_last_good_checkpoint(sparse_cache, tmp_path, monkeypatch):
    from train import sae as sae_mod

    original = sae_mod.BaseAutoencoder.forward
    calls = {"n": 0}

    def poisoned(self, x, sparsity_coeff_scale=1.0, **kw):
        calls["n"] += 1
        if calls["n"] > 22:
            x = x * float("nan")
        return original(self, x, sparsity_coeff_scale, **kw)

    monkeypatch.setattr(sae_mod.BaseAutoencoder, "forward", poisoned)
    with pytest.raises(TrainingError, match="NaN or inf.*last good checkpoint: .*step-000000020"):
        train_sae(None, cfg_for(sparse_cache, tmp_path, arch="topk"), progress=False)
    run_dir = next(tmp_path.iterdir())
    good = final_weights(run_dir)
    assert all(torch.isfinite(v.float()).all() for v in good.values())


def test_cli_errors(sparse_cache, tmp_path):
    r = CliRunner().invoke(train_cli, ["run", "--store", str(sparse_cache), "--set", "lrr=1", "--quiet"])
    assert r.exit_code == 2 and "did you mean 'lr'" in r.output
    r = CliRunner().invoke(train_cli, ["run", "--store", str(tmp_path / "missing"), "--quiet", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "missing" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(train_cli, ["run", "--store", str(sparse_cache), "--site", "blocks.9.hook_resid_pre",
                                       "--quiet", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "blocks.9.hook_resid_pre" in r.output
    r = CliRunner().invoke(train_cli, ["resume", str(tmp_path)])
    assert r.exit_code == 2 and "neither a run folder" in r.output
    r = CliRunner().invoke(train_cli, ["config"])
    assert r.exit_code == 0 and "micro_batch_size" in r.output
    r = CliRunner().invoke(train_cli, ["run", "--help"])
    assert "--dict-size" in r.output and "--set" in r.output


def test_wandb_mode_without_key_falls_back(monkeypatch, tmp_path):
    from train.logs import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_eval_during_training_is_logged_and_changes_nothing(sparse_cache, reference_run, tmp_path):
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, arch="batchtopk", eval_every=2560, eval_batches=2),
                           progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/explained_variance" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["eval/explained_variance"] <= 1 and r["eval/rows"] > 0 for r in evals), evals
    assert evals[-1]["eval/explained_variance"] > evals[0]["eval/explained_variance"]
    _assert_same(final_weights(run_dir), final_weights(reference_run))


# --------------------------------------------------------------------------- mixed precision, compile


@pytest.mark.parametrize("arch,extra", [("vanilla", {"l1_coeff": 0.5}), ("topk", {}), ("batchtopk", {}),
                                        ("jumprelu", {"l0_coeff": 0.05, "threshold_init": 0.05}),
                                        ("gated", {"l1_coeff": 0.5}), ("matryoshka", {})])
def test_bf16_autocast_trains_with_float32_master_weights(sparse_cache, tmp_path, arch, extra):
    """autocast=bf16: the matrix products run in bfloat16, everything kept is float32, and the run
    learns about as well as in float32 (same data, same init)."""
    runs = {}
    for mode in ("none", "bf16"):
        sae, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / mode, arch=arch, autocast=mode, **extra),
                                 progress=False)
        runs[mode] = (sae, json.loads((run_dir / "done.json").read_text())["results"]["heldout"])
    sae, held = runs["bf16"]
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert held["explained_variance"] > 0.5, held
    assert abs(held["explained_variance"] - runs["none"][1]["explained_variance"]) < 0.1, (held, runs["none"][1])


def test_autocast_is_part_of_the_run_identity(sparse_cache, tmp_path):
    from train.config import config_hash
    base = cfg_for(sparse_cache, tmp_path)
    assert config_hash(base) != config_hash(update_cfg(base, autocast="bf16"))
    assert config_hash(base) == config_hash(update_cfg(base, compile=True))  # same computation


def test_compile_matches_eager(sparse_cache, tmp_path):
    """compile=True gives the eager run's weights within float tolerance (vanilla: the quickest compile)."""
    weights = {}
    for flag in (False, True):
        cfg = cfg_for(sparse_cache, tmp_path / str(flag), arch="vanilla", l1_coeff=0.5, tokens=256 * 6,
                      checkpoint_every=256 * 6, compile=flag)
        _, run_dir = train_sae(None, cfg, progress=False)
        weights[flag] = final_weights(run_dir)
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_dense_kernels_train_the_same_sae(sparse_cache, tmp_path, arch):
    """sparse_kernels=false (the dense reference path) gives the sparse run's weights within float
    tolerance, and names the run the same (same computation)."""
    from train.config import config_hash
    weights = {}
    for flag in (True, False):
        cfg = cfg_for(sparse_cache, tmp_path / str(flag), arch=arch, tokens=256 * 6, checkpoint_every=256 * 6,
                      sparse_kernels=flag)
        sae, run_dir = train_sae(None, cfg, progress=False)
        assert sae.fast is flag
        weights[flag] = final_weights(run_dir)
    for k in weights[True]:
        torch.testing.assert_close(weights[False][k], weights[True][k], rtol=1e-4, atol=1e-5)
    base = cfg_for(sparse_cache, tmp_path)
    assert config_hash(base) == config_hash(update_cfg(base, sparse_kernels=False))


def test_deterministic_kernels_are_switched_on_for_cuda_only(monkeypatch):
    from train.training import use_deterministic_kernels
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    use_deterministic_kernels(torch.device("cpu"), True)
    use_deterministic_kernels(torch.device("cuda"), False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        use_deterministic_kernels(torch.device("cuda"), True)  # flags only: no CUDA needed
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_store_threads_reach_the_store_and_leave_the_run_identity(sparse_cache, tmp_path):
    from train.config import config_hash
    from train.training import open_store
    cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, store_threads=2), SPARSE_D, SITE)
    with open_store(cfg, torch.device("cpu")) as store:
        assert store._threads == 2
    assert config_hash(cfg) == config_hash(update_cfg(cfg, store_threads=1))
    with pytest.raises(ConfigError, match="store_threads"):
        cfg_for(sparse_cache, tmp_path, store_threads=0)


def test_store_io_reaches_the_store_and_leaves_the_run_identity(sparse_cache, tmp_path):
    from train.config import config_hash
    from train.training import open_store
    cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, store_io="copy"), SPARSE_D, SITE)
    with open_store(cfg, torch.device("cpu")) as store:
        assert store.window_io == "copy"
    assert config_hash(cfg) == config_hash(update_cfg(cfg, store_io="auto"))
    with pytest.raises(ConfigError, match="store_io='mmap' is not one of auto, map, copy; did you mean 'map'"):
        cfg_for(sparse_cache, tmp_path, store_io="mmap")
