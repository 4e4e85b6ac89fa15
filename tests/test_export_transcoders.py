"""`train export` of transcoders and CLTs: SAELens 6's transcoder forms, and circuit-tracer 0.5's
transcoder sets and CLTs, each checked against an independent re-implementation of the target's
inference equations (written below from its documented forms, not from our code) and, where the
real package is installed in its own venv, against its loader in a subprocess:

    SAELens        h = x W_enc + b_enc (no input centring); f = relu(h), or relu(h) * (h > threshold)
                   for the jumprelu forms; y_hat = f W_dec + b_dec (+ x W_skip^T for the skip forms)
    circuit-tracer h_l = x_l W_enc_l^T + b_enc_l (its W_enc is [m, d]); f_l = relu(h_l) or
                   h_l * (h_l > threshold_l); a set: y_hat_l = f_l W_dec_l + b_dec_l (+ x_l W_skip_l^T);
                   a clt: y_hat_t = b_dec_t + sum_{l <= t} f_l W_dec_l[:, t - l]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from shared.cache import Cache
from tests.helpers import HARVEST_CTX, cfg_for, harvest_sites
from train.cli import main as train_cli
from train.export import SAELENS_KEYS, ExportError, export_checkpoint
from train.runs import load_sae_checkpoint
from train.training import train_sae

SAELENS_PY = Path("/opt/saelens-venv/bin/python")
CT_PY = Path("/opt/circuit-tracer-venv/bin/python")
LAYERS = [0, 1]
IN = [f"blocks.{l}.ln2.hook_normalized" for l in LAYERS]
OUT = [f"blocks.{l}.hook_mlp_out" for l in LAYERS]
D, M = 32, 64  # the tiny GPT-2's width; expansion 2

RUNS = {  # name -> (settings, SAELens architecture or None when refused)
    "relu_l0": (dict(arch="transcoder", sparsity="vanilla", l1_coeff=0.3, out_site=OUT[0]), "transcoder"),
    "relu_l1": (dict(arch="transcoder", sparsity="vanilla", l1_coeff=0.3, out_site=OUT[1]), "transcoder"),
    "skip_relu": (dict(arch="skip_transcoder", sparsity="vanilla", l1_coeff=0.3), "skip_transcoder"),
    "jumprelu": (dict(arch="transcoder", sparsity="jumprelu", l0_coeff=0.05, threshold_init=0.05),
                 "jumprelu_transcoder"),
    "batchtopk": (dict(arch="transcoder", sparsity="batchtopk"), "jumprelu_transcoder"),
    "skip_jumprelu": (dict(arch="skip_transcoder", sparsity="jumprelu", l0_coeff=0.05, threshold_init=0.05),
                      "jumprelu_skip_transcoder"),
    "topk": (dict(arch="transcoder", sparsity="topk"), None),
    "clt": (dict(arch="clt", sparsity="batchtopk"), None),
    "clt_relu": (dict(arch="clt", sparsity="vanilla", l1_coeff=0.3), None),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_gpt2_dir, tiny_corpus):
    out = tmp_path_factory.mktemp("tc-export") / "cache"
    return harvest_sites(tiny_gpt2_dir, tiny_corpus["jsonl"], out, ["mlp_in", "mlp_out"], LAYERS,
                         tokens=HARVEST_CTX * 40, shard_tokens=HARVEST_CTX * 8)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc-export-runs")
    made = {}
    for name, (over, _) in RUNS.items():
        cfg = cfg_for(cache, out / name, batch_size=64, tokens=64 * 20, checkpoint_every=64 * 20, expansion=2,
                      threshold_batches=2, dead_tokens_threshold=10**6, lr=3e-3, **over)
        made[name] = train_sae(None, cfg, progress=False)[1]
    return made


def raw_rows(cache_dir, site: str, n_random: int = 64) -> torch.Tensor:
    """Raw rows of `site`: the last shard's and random rows of the same mean and scale."""
    cache = Cache.open(cache_dir)
    real = torch.from_numpy(np.array(cache.read_acts(site, cache.shards[-1]), dtype=np.float32))
    st = cache.stats(site)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(n_random, D, generator=g) * (st["mean_sq_norm"] / D) ** 0.5 + torch.tensor(st["mean"],
                                                                                                  dtype=torch.float32)
    return torch.cat([real, rand])


def ours(run_dir, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our model on raw inputs (one [N, d] per covered layer): per layer (f, y_hat) in raw units."""
    run = load_sae_checkpoint(run_dir)
    sae, factors, cfg = run.sae, run.state["scaling_factors"], run.cfg
    ins, outs = cfg.in_site.split(","), cfg.out_site.split(",")
    scaled = [x * factors[s] for x, s in zip(xs, ins)]
    kw = {"use_threshold": True} if sae.needs_calibration else {}
    with torch.no_grad():
        if cfg.arch == "clt":
            f = sae.encode(torch.stack(scaled, 1), **kw).view(-1, sae.n_layers, sae.d_latent)
            y = sae.decode(f.reshape(f.shape[0], -1))
            return [f[:, l] for l in range(sae.n_layers)], [y[:, l] / factors[s] for l, s in enumerate(outs)]
        f = sae.encode(scaled[0], **kw)
        return [f], [sae.decode(f, scaled[0]) / factors[outs[0]]]


def saelens_reference(cfg, w, x):
    h = x @ w["W_enc"] + w["b_enc"]
    f = torch.relu(h) * (h > w["threshold"]) if cfg["architecture"].startswith("jumprelu") else torch.relu(h)
    y = f @ w["W_dec"] + w["b_dec"]
    return f, (y + x @ w["W_skip"].T) if "skip" in cfg["architecture"] else y


def circuit_tracer_reference(kind, files, xs):
    """Per layer (f, y_hat) from circuit-tracer's equations on the exported files ({name: tensors})."""
    act = lambda h, t: torch.relu(h) if t is None else h * (h > t)  # noqa: E731
    if kind == "transcoder_set":
        out = []
        for l, x in enumerate(xs):
            w = files[f"layer_{l}.safetensors"]
            f = act(x @ w["W_enc"].T + w["b_enc"], w.get("activation_function.threshold"))
            y = f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)
            out.append((f, y))
        return [f for f, _ in out], [y for _, y in out]
    L = len(xs)
    enc = [files[f"W_enc_{l}.safetensors"] for l in range(L)]
    fs = [act(x @ e[f"W_enc_{l}"].T + e[f"b_enc_{l}"], e.get(f"threshold_{l}")) for l, (x, e) in enumerate(zip(xs, enc))]
    ys = []
    for t in range(L):
        y = enc[t][f"b_dec_{t}"].clone()
        for l in range(t + 1):
            y = y + fs[l] @ files[f"W_dec_{l}.safetensors"][f"W_dec_{l}"][:, t - l]
        ys.append(y)
    return fs, ys


def assert_close_outputs(a, b, edge_h=None, edge_t=None):
    """Lists of per-layer (f list, y list) agree; a token whose pre-activation sits on a JumpReLU
    threshold to within rounding (the calibration rows) may flip, and is then left out."""
    (fa, ya), (fb, yb) = a, b
    for l, (f1, f2, y1, y2) in enumerate(zip(fa, fb, ya, yb)):
        flip = (f1 > 0) != (f2 > 0)
        if edge_h is not None:
            on_edge = (edge_h[l] - edge_t[l]).abs() <= 1e-5 * edge_t[l].abs() + 1e-7
            assert not bool((flip & ~on_edge).any()) and int(flip.sum()) <= 3
        else:
            assert not bool(flip.any())
        keep = ~flip.any(-1)
        assert float(keep.float().mean()) > 0.98
        torch.testing.assert_close(f1[keep], f2[keep], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y1[keep], y2[keep], rtol=1e-4, atol=1e-5)
        assert bool((f1 > 0).any())


def _inputs(cache, run_dir):
    cfg = load_sae_checkpoint(run_dir).cfg
    return [raw_rows(cache, s) for s in cfg.in_site.split(",")]


# --------------------------------------------------------------------------- SAELens


@pytest.mark.parametrize("name", [n for n, (_, arch) in RUNS.items() if arch])
def test_saelens_transcoder_export_matches_its_equations(runs, cache, tmp_path, name):
    arch = RUNS[name][1]
    out = export_checkpoint(runs[name], tmp_path / "sae")
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(str(out / "sae_weights.safetensors"))
    assert tuple(sorted(w)) == tuple(sorted(SAELENS_KEYS[arch]))
    assert w["W_enc"].shape == (D, M) and w["W_dec"].shape == (M, D) and w["b_dec"].shape == (D,)
    if "skip" in arch:
        assert w["W_skip"].shape == (D, D) and float(w["W_skip"].abs().sum()) > 0
    assert cfg["architecture"] == arch and cfg["d_in"] == D and cfg["d_out"] == D and cfg["d_sae"] == M
    assert cfg["apply_b_dec_to_input"] is False
    run = load_sae_checkpoint(runs[name])
    md = cfg["metadata"]
    assert md["hook_name"] == run.cfg.in_site and md["hook_name_out"] == run.cfg.out_site
    assert md["hook_layer_out"] == int(run.cfg.out_site.split(".")[1])
    factors = run.state["scaling_factors"]
    assert md["saeforge"]["folded_scaling_factor"] == factors[run.cfg.in_site]
    assert md["saeforge"]["folded_scaling_factor_out"] == factors[run.cfg.out_site] != factors[run.cfg.in_site]
    xs = _inputs(cache, runs[name])
    f_ref, y_ref = saelens_reference(cfg, w, xs[0])
    edge = ([xs[0] @ w["W_enc"] + w["b_enc"]], [w["threshold"]]) if "threshold" in w else (None, None)
    assert_close_outputs(([f_ref], [y_ref]), ours(runs[name], xs), *edge)


def test_transcoder_export_refusals(runs, tmp_path):
    with pytest.raises(ExportError, match=r"a topk transcoder has no SAELens or circuit-tracer form.*--sparsity one of "
                                          r"vanilla, batchtopk, jumprelu"):
        export_checkpoint(runs["topk"], tmp_path / "a")
    with pytest.raises(ExportError, match="a clt has no SAELens form; export it with --format circuit-tracer"):
        export_checkpoint(runs["clt"], tmp_path / "a")
    r = CliRunner().invoke(train_cli, ["export", str(runs["topk"]), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "topk transcoder" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(train_cli, ["export", str(runs["relu_l0"]), str(runs["relu_l1"]), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "--format saelens exports one checkpoint, got 2" in r.stderr
    for bad, msg in [((runs["relu_l1"],), r"predict layers \[1\]; circuit-tracer loads a set covering layers 0..n-1"),
                     ((runs["relu_l0"], runs["skip_relu"]), "both predict layer 0"),
                     ((runs["topk"],), "a topk transcoder has no SAELens or circuit-tracer form"),
                     ((runs["clt"], runs["relu_l0"]), "a clt is exported alone")]:
        r = CliRunner().invoke(train_cli, ["export", *map(str, bad), "--format", "circuit-tracer", "--out",
                                           str(tmp_path / "ct")])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert len(r.stderr.strip().splitlines()) == 1
        import re
        assert re.search(msg, r.stderr), r.stderr
    assert not (tmp_path / "ct" / "config.yaml").exists()


_SAELENS_PROBE = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])
report = {}
for arg in sys.argv[3:]:
    name, path = arg.split("=", 1)
    sae = SAE.load_from_disk(path)
    with torch.no_grad():
        f = sae.encode(x[name])
        y = sae.forward(x[name])
    save_file({"f": f.contiguous(), "y": y.contiguous()}, f"{sys.argv[2]}/{name}.safetensors")
    report[name] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(), "d_out": sae.cfg.d_out,
                    "hook_name_out": sae.cfg.metadata.hook_name_out}
print(json.dumps(report))
"""


def _venv_python(py: Path, module: str):
    if not py.exists():
        pytest.skip(f"{py} is absent")
    if subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode != 0:
        pytest.skip(f"{module} is not importable in {py}")
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


@pytest.mark.slow
def test_sae_lens_venv_loads_the_transcoder_exports(runs, cache, tmp_path):
    env = _venv_python(SAELENS_PY, "sae_lens")
    names = [n for n, (_, arch) in RUNS.items() if arch]
    xs = {n: _inputs(cache, runs[n])[0] for n in names}
    save_file({n: x.contiguous() for n, x in xs.items()}, str(tmp_path / "x.safetensors"))
    paths = {n: export_checkpoint(runs[n], tmp_path / n) for n in names}
    (tmp_path / "probe").mkdir()
    r = subprocess.run([str(SAELENS_PY), "-c", _SAELENS_PROBE, str(tmp_path / "x.safetensors"), str(tmp_path / "probe"),
                        *(f"{n}={p}" for n, p in paths.items())], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    classes = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
               "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}
    for n in names:
        arch = RUNS[n][1]
        assert report[n]["class"] == classes[arch] and report[n]["architecture"] == arch and report[n]["d_out"] == D
        assert report[n]["hook_name_out"] == load_sae_checkpoint(runs[n]).cfg.out_site
        got = load_file(str(tmp_path / "probe" / f"{n}.safetensors"))
        w = load_file(str(paths[n] / "sae_weights.safetensors"))
        edge = ([xs[n] @ w["W_enc"] + w["b_enc"]], [w["threshold"]]) if "threshold" in w else (None, None)
        assert_close_outputs(([got["f"]], [got["y"]]), ours(runs[n], [xs[n]]), *edge)


# --------------------------------------------------------------------------- circuit-tracer


def _ct_export(runs, names, out):
    r = CliRunner().invoke(train_cli, ["export", *(str(runs[n]) for n in names), "--format", "circuit-tracer",
                                       "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip().splitlines()[-1]) == out
    config = yaml.safe_load((out / "config.yaml").read_text())
    files = {p.name: load_file(str(p)) for p in out.glob("*.safetensors")}
    return config, files


CT_CASES = {"set": ["relu_l0", "relu_l1"], "clt": ["clt"], "clt_relu": ["clt_relu"]}


@pytest.mark.parametrize("case", list(CT_CASES))
def test_circuit_tracer_export_matches_its_equations(runs, cache, tmp_path, case):
    names = CT_CASES[case]
    config, files = _ct_export(runs, names, tmp_path / "ct")
    kind = "transcoder_set" if case == "set" else "cross_layer_transcoder"
    assert config["model_kind"] == kind and config["model_name"] == Cache.open(cache).spec.model["id"]
    assert config["feature_input_hook"] == "ln2.hook_normalized" and config["feature_output_hook"] == "hook_mlp_out"
    assert isinstance(config["scan"], str) and len(config["saeforge"]["runs"]) == len(names)
    if kind == "transcoder_set":
        assert set(files) == {"layer_0.safetensors", "layer_1.safetensors"}
        assert files["layer_0.safetensors"]["W_enc"].shape == (M, D)  # transposed relative to SAELens
        xs = [_inputs(cache, runs[n])[0] for n in names]
        f_ours = [ours(runs[n], [x]) for n, x in zip(names, xs)]
        mine = ([f[0][0] for f in f_ours], [f[1][0] for f in f_ours])
        edge = (None, None)
    else:
        assert set(files) == {f"W_{w}_{l}.safetensors" for w in ("enc", "dec") for l in LAYERS}
        assert files["W_enc_0.safetensors"]["W_enc_0"].shape == (M, D)
        assert files["W_dec_0.safetensors"]["W_dec_0"].shape == (M, 2, D)
        assert files["W_dec_1.safetensors"]["W_dec_1"].shape == (M, 1, D)
        xs = _inputs(cache, runs[names[0]])
        mine = ours(runs[names[0]], xs)
        thr = [files[f"W_enc_{l}.safetensors"].get(f"threshold_{l}") for l in LAYERS]
        assert (thr[0] is not None) == (case == "clt")
        edge = (None, None) if thr[0] is None else (
            [x @ files[f"W_enc_{l}.safetensors"][f"W_enc_{l}"].T + files[f"W_enc_{l}.safetensors"][f"b_enc_{l}"]
             for l, x in enumerate(xs)], thr)
    assert_close_outputs(circuit_tracer_reference(kind, files, xs), mine, *edge)


_CT_PROBE = r"""
import json, sys, torch, yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder import load_transcoder_set
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.utils.hf_utils import load_transcoders
import circuit_tracer
x = load_file(sys.argv[1])["x"]  # [L, N, d]
report = {}
for arg in sys.argv[3:]:
    name, path = arg.split("=", 1)
    config = yaml.safe_load(open(f"{path}/config.yaml"))
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    if config["model_kind"] == "transcoder_set":
        n = len(x)
        model = load_transcoders({**config, "transcoders": [f"{path}/layer_{l}.safetensors" for l in range(n)]}, **kw)
        with torch.no_grad():
            f = model.encode(x)
            y = model.decode(f, x)
    else:
        model = load_clt(path, scan=config["scan"], feature_input_hook=config["feature_input_hook"],
                         feature_output_hook=config["feature_output_hook"], **kw)
        with torch.no_grad():
            f = model.encode(x)
            y = model.forward(x)
    save_file({"f": f.contiguous(), "y": y.contiguous()}, f"{sys.argv[2]}/{name}.safetensors")
    report[name] = {"class": type(model).__name__, "in": model.feature_input_hook, "out": model.feature_output_hook,
                    "version": circuit_tracer.__version__ if hasattr(circuit_tracer, "__version__") else None}
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CT_CASES))
def test_circuit_tracer_venv_loads_the_exports(runs, cache, tmp_path, case):
    env = _venv_python(CT_PY, "circuit_tracer")
    names = CT_CASES[case]
    out = tmp_path / "ct"
    config, files = _ct_export(runs, names, out)
    xs = [_inputs(cache, runs[n])[0] for n in names] if case == "set" else _inputs(cache, runs[names[0]])
    save_file({"x": torch.stack(xs).contiguous()}, str(tmp_path / "x.safetensors"))
    (tmp_path / "probe").mkdir()
    r = subprocess.run([str(CT_PY), "-c", _CT_PROBE, str(tmp_path / "x.safetensors"), str(tmp_path / "probe"),
                        f"{case}={out}"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])[case]
    assert report["class"] == ("TranscoderSet" if case == "set" else "CrossLayerTranscoder")
    assert (report["in"], report["out"]) == ("ln2.hook_normalized", "hook_mlp_out")
    got = load_file(str(tmp_path / "probe" / f"{case}.safetensors"))
    theirs = ([got["f"][l] for l in range(len(xs))], [got["y"][l] for l in range(len(xs))])
    kind = "transcoder_set" if case == "set" else "cross_layer_transcoder"
    ref = circuit_tracer_reference(kind, files, xs)
    edge = (None, None)
    if case == "clt":
        edge = ([x @ files[f"W_enc_{l}.safetensors"][f"W_enc_{l}"].T + files[f"W_enc_{l}.safetensors"][f"b_enc_{l}"]
                 for l, x in enumerate(xs)], [files[f"W_enc_{l}.safetensors"][f"threshold_{l}"] for l in LAYERS])
    assert_close_outputs(theirs, ref, *edge)
