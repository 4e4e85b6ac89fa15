"""Run folders and checkpoints: one layout, self-describing checkpoints (load_sae from the
checkpoint alone, older checkpoints from their run's config.json), the dataset scaling object."""

import json
import shutil

import pytest
import torch

from shared.cache import Cache
from tests.helpers import SITE, cfg_for
from train.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
from train.evaluation import checkpoint_scaling
from train.export import ExportError, saelens_state_dict
from train.layout import RunLayout, SweepLayout, is_checkpoint_dir, step_name, step_of
from train.runs import load_run_config, load_sae, load_sae_checkpoint
from train.sae import TopKSAE, build_sae
from train.sae.registry import build_from_cfg, sae_from_record, sae_record
from train.scaling import Scaling
from train.training import train_sae


@pytest.fixture(scope="module")
def topk_run(sparse_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train_sae(None, cfg_for(sparse_cache, out, arch="topk", tokens=256 * 20), progress=False)[1]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _drop_from_state(ckpt, *keys) -> None:
    """Rewrite state.json without `keys`, as a checkpoint written before they existed (state.json
    is not among the checksummed files)."""
    path = ckpt / "state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in state.items() if k not in keys}))


def test_layout_names(tmp_path):
    run = RunLayout(tmp_path / "r")
    assert run.config == tmp_path / "r" / "config.json" and run.metrics.name == "metrics.jsonl"
    assert run.done.name == "done.json" and run.eval.name == "eval.json"
    assert run.step_dir(1234) == tmp_path / "r" / "checkpoints" / "step-000001234"
    assert run.tmp_step_dir(7).name == ".tmp-step-000000007"
    assert RunLayout.retired(run.step_dir(7)).name == ".del-step-000000007"
    assert step_of(run.step_dir(1234)) == 1234 and step_name(5) == "step-000000005"
    assert step_of(run.tmp_step_dir(7)) is None and step_of(tmp_path / "step-x") is None
    sweep = SweepLayout(tmp_path / "s")
    assert sweep.spec.name == "sweep.json" and sweep.run("a").root == tmp_path / "s" / "a"
    assert not SweepLayout.is_sweep(tmp_path / "s") and run.step_dirs() == []


def test_checkpoint_rebuilds_itself_from_its_folder_alone(topk_run, tmp_path):
    ckpt = list_checkpoints(topk_run)[-1]
    assert is_checkpoint_dir(ckpt) and RunLayout.of_checkpoint(ckpt).root == topk_run
    state = json.loads((ckpt / "state.json").read_text())
    cfg = load_run_config(topk_run)
    assert state["sae"] == {"arch": "topk", "args": {"d_in": cfg.d_in, "d_sae": cfg.dict_size, "aux_k": None,
                                                     "dead_tokens_threshold": cfg.dead_tokens_threshold, "k": 4,
                                                     "aux_coeff": cfg.aux_coeff, "fast": True}}
    moved = tmp_path / "elsewhere"  # no run folder, no config.json around it
    shutil.copytree(ckpt, moved)
    sae = load_sae(moved)
    assert type(sae) is TopKSAE and sae.k == 4 and not sae.training
    _same_weights(sae, load_sae(topk_run))
    _same_weights(sae, load_sae_checkpoint(topk_run).sae)
    want = build_from_cfg(cfg)
    want.load_state_dict(read_checkpoint(ckpt)[0])
    _same_weights(sae, want)


def test_checkpoint_without_record_loads_from_its_run_config(topk_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(topk_run, run)
    ckpt = list_checkpoints(run)[-1]
    _drop_from_state(ckpt, "sae", "normalize")
    read_checkpoint(ckpt)  # still a valid checkpoint
    _same_weights(load_sae(run), load_sae(topk_run))
    _same_weights(load_sae(ckpt), load_sae(topk_run))
    shutil.copytree(ckpt, tmp_path / "loose")
    with pytest.raises(CheckpointError, match="does not record its SAE's architecture.*config.json"):
        load_sae(tmp_path / "loose")


def test_record_round_trip_keeps_dtype_and_leaves_the_global_rng_alone():
    sae = build_sae("batchtopk", d_in=8, d_sae=16, k=2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    record = sae_record(sae)
    assert record == {"arch": "batchtopk", "args": {"d_in": 8, "d_sae": 16, "k": 2, "dtype": "float64"}}
    json.dumps(record)
    before = torch.get_rng_state()
    twin = sae_from_record(json.loads(json.dumps(record)))
    assert torch.equal(torch.get_rng_state(), before)
    assert type(twin) is type(sae) and twin.W_dec.dtype == torch.float64 and twin.k == 2
    assert sae_record(TopKSAE(8, 16, k=2)) is None  # built directly: nothing recorded


def test_scaling_from_checkpoint_cache_and_store(topk_run, sparse_cache):
    run = load_sae_checkpoint(topk_run)
    cache = Cache.open(sparse_cache)
    s = float(cache.stats(SITE)["norm_scaling_factor"])
    scaling = Scaling.from_state(run.state, normalize=True)
    assert scaling.factor(SITE) == s and s != 1.0 and scaling.fold_factors(SITE) == (s, s)
    assert Scaling.from_state(scaling.to_state(), normalize=True) == scaling
    assert Scaling.from_cache(cache, [SITE], normalize=True) == scaling
    assert Scaling.from_cache(cache, [SITE], normalize=False).factor(SITE) == 1.0
    assert checkpoint_scaling(run, cache) == scaling
    older = {k: v for k, v in run.state.items() if k not in ("scaling_factors", "normalize")}
    assert Scaling.from_state(older, normalize=True) is None
    run.state = older
    assert checkpoint_scaling(run, cache).factor(SITE) == s  # from the cache statistics


def test_an_sae_folds_one_scaling_on_both_sides():
    sae = build_sae("topk", d_in=4, d_sae=8, k=2)
    with pytest.raises(ValueError, match="input scaling 2.0 and output scaling 4.0 must be equal"):
        sae.fold_scaling(2.0, 4.0)
    with pytest.raises(ExportError, match="must be equal"):
        saelens_state_dict(sae, 2.0, 4.0)
    a, b = saelens_state_dict(sae, 2.0), saelens_state_dict(sae, 2.0, 2.0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_metrics_drop_later_steps_final_results_and_a_cut_line(tmp_path):
    from train.logs import RunLogger

    log = RunLogger(tmp_path, {}, "disabled", "p")
    for step in (5, 10, 15):
        log.log(step, {"loss": 1.0})
    log.log(15, {"final/heldout/l0": 4.0})  # logged by a run killed before its done.json
    log.close()
    with open(RunLayout(tmp_path).metrics, "a") as f:
        f.write('{"step": 20, "lo')  # a record cut short by the kill
    RunLogger(tmp_path, {}, "disabled", "p", resume_step=15).close()
    lines = [json.loads(line) for line in RunLayout(tmp_path).metrics.read_text().splitlines()]
    assert lines == [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 1.0}, {"step": 15, "loss": 1.0}]
