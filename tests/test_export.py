"""`train export --format saelens` and `train calibrate`: files, fold-in of the scaling, refusal.

The exported SAE is checked against an independent re-implementation of SAELens 6's inference
equations (below, from SAELens' StandardSAE / TopKSAE / JumpReLUSAE):

    sae_in = x - b_dec * apply_b_dec_to_input
    h      = sae_in @ W_enc + b_enc
    standard: f = relu(h); topk: relu of the k largest h per token; jumprelu: relu(h) * (h > threshold)
    x_hat  = f @ W_dec + b_dec

and, where SAELens is installed, against `SAE.load_from_disk` itself.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from packaging.version import Version
from safetensors.torch import load_file, save_file

from harvest.runner import HarvestConfig, run_harvest
from shared.cache import Cache
from train.checkpoints import latest_checkpoint, list_checkpoints
from train.cli import main as train_cli
from train.config import get_default_cfg, update_cfg
from train.evaluation import load_sae_checkpoint
from train.export import SAELENS_KEYS, ExportError, export_checkpoint, saelens_state_dict
from train.sae import build_sae
from train.training import load_run_config, open_store, threshold_loop_collect, threshold_loop_compute, train_sae

CTX = 16
SITE = "blocks.1.hook_resid_pre"
SAELENS_VENV_PYTHON = Path("/opt/saelens-venv/bin/python")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    out = tmp_path_factory.mktemp("cache") / "c"
    cfg = HarvestConfig(model=str(tiny_gpt2_dir), dataset=str(tiny_corpus["jsonl"]), out=str(out), layers=[1],
                        tokens=CTX * 40, context_length=CTX, batch_size=8, dtype="float32", shard_tokens=CTX * 8,
                        device="cpu")
    run_harvest(cfg, progress=False)
    return out


RUNS = {
    "vanilla": {"arch": "vanilla", "l1_coeff": 0.5},
    "topk": {"arch": "topk"},
    "batchtopk": {"arch": "batchtopk"},
    "batchtopk_pf": {"arch": "batchtopk", "threshold_kind": "per_feature"},
    "jumprelu": {"arch": "jumprelu", "l0_coeff": 0.05, "threshold_init": 0.05},
}


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name, over in RUNS.items():
        cfg = update_cfg(get_default_cfg(), store=str(cache_dir), out=str(out), batch_size=64, tokens=64 * 20,
                         expansion=2, k=5, lr=3e-3, checkpoint_every=64 * 10, log_every=10, density_every=20,
                         wandb_mode="disabled", device="cpu", dead_tokens_threshold=1000, threshold_batches=2,
                         b_dec_init="mean", run_name=name, **over)
        made[name] = train_sae(None, cfg, progress=False)[1]
    return made


def saelens_reference(cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6 inference, written from its equations (not from our code)."""
    h = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = torch.relu(h)
    elif cfg["architecture"] == "topk":
        vals, idx = torch.topk(h, cfg["k"], dim=-1)
        f = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    elif cfg["architecture"] == "jumprelu":
        f = torch.relu(h) * (h > w["threshold"]).to(h.dtype)
    else:
        raise AssertionError(cfg["architecture"])
    return f, f @ w["W_dec"] + w["b_dec"]


def assert_same_outputs(w: dict[str, torch.Tensor], x: torch.Tensor, a: tuple, b: tuple) -> None:
    """Two (f, x_hat) of the exported SAE `w` on raw x agree.

    Fired sets must be equal except where a pre-activation sits on a JumpReLU threshold to within
    rounding: the held-out rows are the calibration rows, and a per-feature threshold is one of
    their values (the folded weights round that value differently by an ulp). Rows with such a
    flip are left out of the value comparison.
    """
    flip = (a[0] > 0) != (b[0] > 0)
    if "threshold" in w:
        h = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        on_edge = (h - w["threshold"]).abs() <= 1e-5 * w["threshold"].abs()
        assert not bool((flip & ~on_edge).any()) and int(flip.sum()) <= 3
    else:
        assert not bool(flip.any())
    keep = ~flip.any(-1)
    assert float(keep.float().mean()) > 0.99
    torch.testing.assert_close(a[0][keep], b[0][keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1][keep], b[1][keep], rtol=1e-4, atol=1e-5)


def raw_activations(cache_dir, d: int, n_random: int = 256) -> torch.Tensor:
    """Raw (unnormalised) rows: held-out cache rows and random rows of the same scale and mean."""
    cache = Cache.open(cache_dir)
    real = torch.from_numpy(np.array(cache.read_acts(SITE, cache.shards[-1]), dtype=np.float32))
    st = cache.stats(SITE)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(n_random, d, generator=g) * (st["mean_sq_norm"] / d) ** 0.5 + torch.tensor(st["mean"], dtype=torch.float32)
    return torch.cat([real, rand])


def ours(run_dir, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Our model on raw x: f = encode(x * s) (BatchTopK with its threshold), x_hat = decode(f) / s."""
    run = load_sae_checkpoint(run_dir)
    cfg = run.cfg
    s = float(Cache.open(cfg.store).stats(cfg.site)["norm_scaling_factor"])
    with torch.no_grad():
        f = run.sae.encode(x * s, use_threshold=True) if cfg.arch == "batchtopk" else run.sae.encode(x * s)
        return f, run.sae.decode(f) / s, s


@pytest.mark.parametrize("name,arch", [("vanilla", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                       ("batchtopk_pf", "jumprelu"), ("jumprelu", "jumprelu")])
def test_export_matches_saelens_equations(runs, cache_dir, tmp_path, name, arch):
    out = export_checkpoint(runs[name], tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(str(out / "sae_weights.safetensors"))
    d, m = 32, 64
    # the exact tensor set of the SAELens class (its load_state_dict is strict), with SAELens shapes
    assert tuple(sorted(w)) == tuple(sorted(SAELENS_KEYS[arch]))
    assert w["W_enc"].shape == (d, m) and w["W_dec"].shape == (m, d) and w["b_enc"].shape == (m,) and w["b_dec"].shape == (d,)
    assert all(t.dtype == torch.float32 for t in w.values())
    if arch == "jumprelu":
        assert w["threshold"].shape == (m,) and bool((w["threshold"] >= 0).all())
    assert cfg["architecture"] == arch and cfg["d_in"] == d and cfg["d_sae"] == m and cfg["dtype"] == "float32"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    md = cfg["metadata"]
    assert Version(md["sae_lens_version"]) >= Version("6.0.0")
    assert md["hook_name"] == SITE and md["context_size"] == CTX and md["prepend_bos"] is True
    spec = Cache.open(cache_dir).spec
    assert md["model_name"] == spec.model["id"] and md["dataset_path"] == spec.dataset["path"]
    prov = md["saeforge"]
    assert prov["trained_arch"] == RUNS[name]["arch"] and prov["model"]["config_hash"] == spec.model["config_hash"]
    assert prov["checkpoint"] == str(list_checkpoints(runs[name])[-1])
    # same encode / decode on raw activations
    x = raw_activations(cache_dir, d)
    f_ref, xh_ref = saelens_reference(cfg, w, x)
    f, xh, s = ours(runs[name], x)
    assert prov["folded_scaling_factor"] == s and s != 1.0
    assert_same_outputs(w, x, (f_ref, xh_ref), (f, xh))
    assert float((f > 0).float().sum(-1).mean()) > 0  # something fires


@pytest.mark.parametrize("arch", ["vanilla", "topk", "batchtopk", "jumprelu"])
def test_fold_is_bit_exact_for_power_of_two_scale(arch):
    """With s = 4 every multiplication by s is exact, so the folded SAE on x equals ours on s x bit for bit."""
    torch.manual_seed(0)
    extra = {"k": 4} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(arch, d_in=8, d_sae=24, **extra)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sae.make_decoder_unit_norm()
    if arch == "batchtopk":
        sae.set_threshold(torch.rand(24) * 0.2)
    s = 4.0
    folded = saelens_state_dict(sae, s)
    twin = build_sae(arch, d_in=8, d_sae=24, **extra)
    twin.load_state_dict({**sae.state_dict(), **{k: v for k, v in folded.items() if k != "threshold"}})
    x = torch.randn(50, 8) * 3
    with torch.no_grad():
        f = sae.encode(x * s)
        assert torch.equal(twin.encode(x), f) and bool((f > 0).any())
        assert torch.equal(twin.decode(f), sae.decode(f) / s)
    if arch in ("batchtopk", "jumprelu"):
        assert torch.equal(folded["threshold"], sae.inference_threshold())  # thresholds are not rescaled
    torch.testing.assert_close(folded["W_dec"].norm(dim=1), torch.full((24,), 1 / s))


def test_uncalibrated_batchtopk_is_refused_until_calibrated(runs, tmp_path):
    run_dir = runs["batchtopk"]
    mid = list_checkpoints(run_dir)[0]  # intermediate: training calibrates only the final checkpoint
    assert json.loads((mid / "state.json").read_text())["threshold_kind"] == "none"
    with pytest.raises(ExportError, match=r"without a calibrated inference threshold.*train calibrate"):
        export_checkpoint(mid, tmp_path / "a")
    r = CliRunner().invoke(train_cli, ["export", str(mid), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and f"train calibrate {mid}" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "a" / "cfg.json").exists()

    # what calibration must produce: the run's rule on its held-out rows
    cfg = load_run_config(run_dir)
    before = load_sae_checkpoint(mid).sae
    store = open_store(cfg, torch.device("cpu"))
    try:
        want = threshold_loop_compute(threshold_loop_collect(before, store.eval_batches(), cfg.threshold_batches), "global")
    finally:
        store.close()
    final_before = (list_checkpoints(run_dir)[-1] / "sae.safetensors").read_bytes()

    r = CliRunner().invoke(train_cli, ["calibrate", str(mid)])
    assert r.exit_code == 0, r.output
    assert "calibrated global threshold" in r.stderr
    assert list_checkpoints(run_dir)[0] == mid and (list_checkpoints(run_dir)[-1] / "sae.safetensors").read_bytes() == final_before
    _, ckpt, tensors, _, state = latest_checkpoint(mid)  # checksums still valid
    assert state["threshold_kind"] == "global" and state["calibration"]["threshold_kind"] == "global"
    for k, v in load_file(str(mid / "sae.safetensors")).items():  # only the threshold changed
        if not k.startswith("threshold"):
            assert torch.equal(v, before.state_dict()[k].cpu()), k
    r = CliRunner().invoke(train_cli, ["export", str(mid), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip().splitlines()[-1]) == tmp_path / "a"
    thr = load_file(str(tmp_path / "a" / "sae_weights.safetensors"))["threshold"]
    torch.testing.assert_close(thr, torch.full_like(thr, want))


def test_export_refusals(runs, tmp_path):
    out = export_checkpoint(runs["topk"], tmp_path / "e")
    with pytest.raises(ExportError, match="already holds cfg.json"):
        export_checkpoint(runs["topk"], out)
    export_checkpoint(runs["topk"], out, force=True)
    r = CliRunner().invoke(train_cli, ["calibrate", str(runs["topk"])])
    assert r.exit_code == 2 and "only batchtopk" in r.stderr
    r = CliRunner().invoke(train_cli, ["export", str(runs["topk"]), "--out", str(tmp_path / "f"),
                                       "--store", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "nowhere" in r.stderr
    with pytest.raises(ExportError, match="positive finite"):
        saelens_state_dict(build_sae("topk", d_in=4, d_sae=8, k=2), 0.0)


def _probe_inputs(runs, cache_dir, tmp_path):
    x = raw_activations(cache_dir, 32, n_random=64)
    exports = {}
    for name in RUNS:
        exports[name] = export_checkpoint(runs[name], tmp_path / name)
    return x, exports


def test_sae_lens_load_from_disk_in_process(runs, cache_dir, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    x, exports = _probe_inputs(runs, cache_dir, tmp_path)
    for name, path in exports.items():
        sae = sae_lens.SAE.load_from_disk(str(path))
        with torch.no_grad():
            f = sae.encode(x)
            xh = sae.decode(f)
        f_ours, xh_ours, _ = ours(runs[name], x)
        assert_same_outputs(load_file(str(path / "sae_weights.safetensors")), x, (f, xh), (f_ours, xh_ours))


_PROBE = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
report = {}
for path in sys.argv[3:]:
    sae = SAE.load_from_disk(path)
    with torch.no_grad():
        f = sae.encode(x)
        xh = sae.decode(f)
    name = path.rstrip("/").split("/")[-1]
    save_file({"f": f.contiguous(), "x_hat": xh.contiguous()}, f"{sys.argv[2]}/{name}.safetensors")
    report[name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                    "hook_name": sae.cfg.metadata.hook_name, "version": __import__("sae_lens").__version__}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_sae_lens_venv_loads_the_exports(runs, cache_dir, tmp_path):
    if not SAELENS_VENV_PYTHON.exists():
        pytest.skip(f"{SAELENS_VENV_PYTHON} is absent")
    check = subprocess.run([str(SAELENS_VENV_PYTHON), "-c", "import sae_lens"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"sae_lens is not importable in {SAELENS_VENV_PYTHON}")
    x, exports = _probe_inputs(runs, cache_dir, tmp_path)
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    outdir = tmp_path / "probe"
    outdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([str(SAELENS_VENV_PYTHON), "-c", _PROBE, str(tmp_path / "x.safetensors"), str(outdir),
                        *map(str, exports.values())], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    want_class = {"vanilla": "StandardSAE", "topk": "TopKSAE", "batchtopk": "JumpReLUSAE",
                  "batchtopk_pf": "JumpReLUSAE", "jumprelu": "JumpReLUSAE"}
    for name in RUNS:
        assert report[name]["class"] == want_class[name] and report[name]["hook_name"] == SITE
        assert Version(report[name]["version"]) >= Version("6.0.0")
        got = load_file(str(outdir / f"{name}.safetensors"))
        f_ours, xh_ours, _ = ours(runs[name], x)
        w = load_file(str(exports[name] / "sae_weights.safetensors"))
        assert_same_outputs(w, x, (got["f"], got["x_hat"]), (f_ours, xh_ours))


# --------------------------------------------------------------------------- the model card


def _card(folder):
    from huggingface_hub import ModelCard

    text = (folder / "README.md").read_text()
    return text, ModelCard(text).data.to_dict()  # the hub's own parser of the YAML front matter


def test_export_writes_a_model_card(runs, cache_dir, tmp_path):
    import shutil

    from train.evaluation import evaluate_checkpoint
    from train.row_order import cache_identity

    run = tmp_path / "run"
    shutil.copytree(runs["topk"], run)
    out = export_checkpoint(run, tmp_path / "e")
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae_weights.safetensors", "README.md"}
    text, meta = _card(out)
    assert meta["library_name"] == "saelens" and {"saelens", "sparse-autoencoder", "topk"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # a local model folder and file: no hub ids
    spec = Cache.open(cache_dir).spec
    state = latest_checkpoint(run)[4]
    for needle in (spec.model["config_hash"], spec.model["tokenizer_hash"], spec.dataset["sha256"],
                   cache_identity(Cache.open(cache_dir)), "blocks.1.hook_resid_pre", spec.sites[0].hf_module,
                   f"{state['tokens']:,} training tokens", "| lr | `0.003` |", "| k | `5` |"):
        assert needle in text, needle
    ckpt = list_checkpoints(run)[-1]
    assert f"has not been evaluated. `train eval {ckpt}`" in text
    # evaluated: the card carries eval.json's figures and the folder gets saebench_core.json
    res, _ = evaluate_checkpoint(run, max_contexts=4, lm_batch_size=4, batches=2)
    with pytest.raises(ExportError, match="already holds cfg.json, sae_weights.safetensors, README.md"):
        export_checkpoint(run, out)
    export_checkpoint(run, out, force=True)
    text, _ = _card(out)
    figs = res["encodings"]["inference"]
    assert f"| explained variance | {figs['explained_variance']:.4f} |" in text
    assert f"| CE-loss score | {figs['ce_loss_score']:.4f} |" in text and "not been evaluated" not in text
    assert (out / "saebench_core.json").read_bytes() == (run / "saebench_core.json").read_bytes()
    # an eval.json of another checkpoint is not this checkpoint's
    older = list_checkpoints(run)[0]
    assert older != ckpt
    out2 = export_checkpoint(older, tmp_path / "old")
    assert "has not been evaluated" in _card(out2)[0] and not (out2 / "saebench_core.json").exists()


def test_export_card_front_matter_names_hub_ids():
    import types

    from huggingface_hub import ModelCard

    from train.model_card import front_matter

    spec = types.SimpleNamespace(model={"id": "HuggingFaceTB/SmolLM2-135M", "source": "hub"},
                                 dataset={"kind": "hub", "id": "roneneldan/TinyStories"})
    meta = ModelCard(front_matter("jumprelu", "batchtopk", spec) + "\n# x\n").data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["datasets"] == ["roneneldan/TinyStories"]
    assert {"batchtopk", "jumprelu"} <= set(meta["tags"])


def test_push_to_hub_offline_keeps_the_export(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(train_cli, ["export", str(runs["topk"]), "--out", str(tmp_path / "h"),
                                       "--push-to-hub", "me/my-sae"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "the hub is offline" in r.stderr
    assert {p.name for p in (tmp_path / "h").iterdir()} >= {"cfg.json", "sae_weights.safetensors", "README.md"}
