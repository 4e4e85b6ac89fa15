"""Adding a variant is one class: a toy variant, defined in this file only, is listed by the
registry, validated and built from a config, trained through train_sae, checkpointed, reloaded
from its checkpoint folder alone, resumed bit for bit, evaluated, and refused by export and
calibration with the registry's own lists."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SITE, cfg_for
from train.checkpoints import list_checkpoints
from train.config import ConfigError, post_init_cfg, update_cfg
from train.errors import EvalError
from train.evaluation import calibrate_checkpoint, evaluate_checkpoint
from train.export import ExportError, export_checkpoint
from train.runs import load_sae
from train.sae import SAE_REGISTRY, BaseAutoencoder, arch_names, register
from train.sae.registry import build_from_cfg
from train.training import resume_training, train_sae

TOY = "toy_shifted_relu"


class ShiftedReLU:
    """A sparsity rule for the test: f = relu(z - margin), L1 penalty l1_coeff * mean_B sum_i f_i."""

    config_keys = {"l1_coeff": "l1_coeff", "margin": "threshold_init"}

    @classmethod
    def config_error(cls, cfg):
        return f"{TOY} needs l1_coeff > 0, got {cfg.l1_coeff}" if cfg.l1_coeff == 0 else None

    @classmethod
    def run_label(cls, cfg):
        return f"l1_{cfg.l1_coeff:g}_m{cfg.threshold_init:g}"

    def __init__(self, d_in, d_sae, *, l1_coeff=1.0, margin=0.0, **base):
        super().__init__(d_in, d_sae, **base)
        self.l1_coeff, self.margin = l1_coeff, margin

    def activation(self, pre):
        return (pre - self.margin).relu()

    def sparsity_loss(self, f, pre):
        return self.l1_coeff * f.sum(-1).mean()


@pytest.fixture(scope="module")
def toy():
    cls = register(TOY)(type("ToySAE", (ShiftedReLU, BaseAutoencoder), {}))
    yield cls
    del SAE_REGISTRY[TOY]


@pytest.fixture(scope="module")
def toy_run(toy, sparse_cache, tmp_path_factory):
    cfg = cfg_for(sparse_cache, tmp_path_factory.mktemp("toy"), arch=TOY, l1_coeff=0.5, threshold_init=0.01,
                  tokens=256 * 20)
    sae, run_dir = train_sae(None, cfg, progress=False)
    return cfg, sae, run_dir


def test_the_registry_lists_validates_and_builds_it(toy, sparse_cache, tmp_path):
    assert TOY in arch_names() and arch_names()[:4] == ("vanilla", "topk", "batchtopk", "jumprelu")
    cfg = cfg_for(sparse_cache, tmp_path, arch=TOY, l1_coeff=0.5, threshold_init=0.01)
    with pytest.raises(ConfigError, match=f"{TOY} needs l1_coeff > 0, got 0.0"):
        update_cfg(cfg, l1_coeff=0)
    cfg = post_init_cfg(cfg, d_in=16, site=SITE)
    assert cfg.run_name.startswith(f"{TOY}_{SITE}_64_l1_0.5_m0.01_")
    sae = build_from_cfg(cfg)
    assert type(sae) is toy and sae.arch == TOY and sae.title == "Toy"
    assert (sae.l1_coeff, sae.margin, sae.d_in, sae.d_sae) == (0.5, 0.01, 16, 64)


def test_it_trains_checkpoints_and_reloads_from_the_checkpoint_alone(toy, toy_run, tmp_path):
    cfg, sae, run_dir = toy_run
    done = json.loads((run_dir / "done.json").read_text())
    assert done["step"] == 20 and done["results"]["heldout"]["rows"] > 0
    assert done["results"]["heldout"]["explained_variance"] > 0
    final = list_checkpoints(run_dir)[-1]
    assert json.loads((final / "state.json").read_text())["sae"]["arch"] == TOY
    loose = tmp_path / "a-copy"  # outside any run folder: only the checkpoint's own files
    shutil.copytree(final, loose)
    loaded = load_sae(loose)
    assert type(loaded) is toy and loaded.margin == 0.01
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_it_resumes_bit_identically(toy_run, tmp_path):
    _, _, run_dir = toy_run
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    (cut / "done.json").unlink()
    shutil.rmtree(list_checkpoints(cut)[-1])  # back to the step-10 checkpoint
    resume_training(None, None, cut, progress=False)
    a = load_file(str(list_checkpoints(run_dir)[-1] / "sae.safetensors"))
    b = load_file(str(list_checkpoints(cut)[-1] / "sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_it_is_evaluated_and_refused_where_it_has_no_form(toy_run, tmp_path):
    _, _, run_dir = toy_run
    results, dest = evaluate_checkpoint(run_dir, skip_lm=True, batches=5, out=tmp_path / "eval.json")
    assert results["arch"] == TOY and results["k"] is None and results["threshold_kind"] is None
    assert list(results["encodings"]) == ["inference"] and results["primary"] == "inference"
    figures = results["encodings"]["inference"]
    assert figures["label"] == f"{TOY} encoder (per token)" and 0 < figures["explained_variance"] <= 1
    assert json.loads(dest.read_text())["arch"] == TOY
    with pytest.raises(ExportError, match=f"architecture '{TOY}' has no SAELens equivalent "
                                          r"\(exportable: vanilla, topk, batchtopk, jumprelu, gated, matryoshka\)"):
        export_checkpoint(run_dir, tmp_path / "export")
    with pytest.raises(EvalError, match=f"is a {TOY} SAE; only batchtopk, matryoshka need a threshold calibration"):
        calibrate_checkpoint(run_dir)
