"""The CUDA path, checked against the CPU path: harvest values, store batches (bit for bit), the
sparse kernels against the dense reference, training of every variant, bit-identical resume with
deterministic kernels, bf16 and tf32 autocast (and what auto measures there), and LM evaluation on
the device.

Skipped without CUDA (CI and the development machines have none); run on a GPU machine with
`python -m pytest tests/test_cuda.py` (pipelines/device_check.sh does, with the CUDA benchmarks).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harvest.runner import run_harvest
from shared.cache import Cache
from train.activation_store import ActivationStore
from train.evaluation import evaluate_checkpoint
from train.sae import build_sae
from train.training import train_sae

from tests.helpers import cfg_for, final_weights, harvest_config, train_cli_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ARCHS = [("vanilla", {"l1_coeff": 0.5}), ("topk", {}), ("batchtopk", {}),
         ("jumprelu", {"l0_coeff": 0.05, "threshold_init": 0.05})]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- harvest


@pytest.mark.parametrize("autocast,tol", [("none", 5e-3), ("auto", 3e-2)])
def test_cuda_harvest_matches_cpu(reference_cache, tiny_llama_dir, tiny_corpus, tmp_path, autocast, tol):
    """Same rows, tokens and positions as the CPU harvest; values equal up to TF32 rounding (fp32:
    measured 1.2e-3 relative on an H100 with torch 2.11 and TF32 matmuls off, as torch's
    memory-efficient attention computes float32 on the tensor cores) or bf16 rounding (auto = bf16
    autocast on CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out = tmp_path / "cache"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out, device="cuda", autocast=autocast), progress=False)
    ref, got = Cache.open(reference_cache), Cache.open(out)
    assert got.shards == ref.shards
    site = "blocks.1.hook_resid_pre"
    for k in ref.shards:
        for vec in ("tokens", "positions"):
            assert np.array_equal(got.read_vector(vec, k), ref.read_vector(vec, k))
        a, b = np.array(got.read_acts(site, k)), np.array(ref.read_acts(site, k))
        assert rel_err(torch.from_numpy(a), torch.from_numpy(b)) < tol, k


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype,normalize", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_cuda_store_serves_the_cpu_batches_bit_for_bit(sparse_cache, dtype, normalize):
    kw = dict(batch_size=96, window_shards=2, seed=3, dtype=dtype, normalize=normalize, heldout_shards=1)
    with ActivationStore(sparse_cache, device="cpu", **kw) as cpu, ActivationStore(sparse_cache, device="cuda", **kw) as gpu:
        for _ in range(30):  # crosses windows and an epoch boundary (5 training shards x 512 rows)
            a, b = cpu.next_batch(), gpu.next_batch()
            assert b.device.type == "cuda" and b.dtype == dtype and torch.equal(a, b.cpu())
        gpu.seek(7 * 96)
        cpu.seek(7 * 96)
        assert torch.equal(cpu.next_batch(), gpu.next_batch().cpu())
        held_cpu, held_gpu = list(cpu.eval_batches()), list(gpu.eval_batches())
        assert all(torch.equal(x, y.cpu()) for x, y in zip(held_cpu, held_gpu, strict=True))


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_sparse_kernels_match_the_dense_path(arch):
    """fast=True (sparse backward) against fast=False (dense reference) on CUDA: loss and every
    gradient, with a third of the latents dead so that AuxK runs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    d, m, B = 64, 512, 1024
    grads = {}
    for fast in (True, False):
        gen = torch.Generator().manual_seed(0)
        sae = build_sae(arch, d_in=d, d_sae=m, k=16, aux_k=32, dead_tokens_threshold=10, generator=gen,
                        device="cuda", fast=fast)
        sae.tokens_since_fired[: m // 3] = 100
        x = torch.randn(B, d, generator=torch.Generator().manual_seed(1)).cuda()
        out = sae(x)
        out.loss.backward()
        grads[fast] = (out.loss.detach(), {n: p.grad.detach().clone() for n, p in sae.named_parameters()})
    (loss_f, g_f), (loss_d, g_d) = grads[True], grads[False]
    assert rel_err(loss_f, loss_d) < 1e-5
    for name in g_d:
        assert rel_err(g_f[name], g_d[name]) < 1e-4, name


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_each_variant_trains_on_cuda_like_on_cpu(sparse_cache, tmp_path, arch, extra):
    held = {}
    for dev in ("cpu", "cuda"):
        sae, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path / dev, arch=arch, device=dev, **extra),
                                 progress=False)
        assert sae.W_dec.device.type == dev
        held[dev] = json.loads((run_dir / "done.json").read_text())["results"]["heldout"]
    assert held["cuda"]["explained_variance"] > 0.5, held
    assert abs(held["cuda"]["explained_variance"] - held["cpu"]["explained_variance"]) < 0.05, held


def _cli_run(store, out, arch, fault=None):
    return train_cli_run(store, out, fault, arch=arch, extra=("--set", "device=cuda"))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_run_repeats_and_resumes_bit_for_bit(sparse_cache, tmp_path, arch):
    """deterministic=true (the default): two runs give the same bytes, and a run killed (-9) after
    step 17 and resumed gives the uninterrupted run's final weights."""
    finals = []
    for name in ("a", "b"):
        r = _cli_run(sparse_cache, tmp_path / name, arch)
        assert r.returncode == 0, r.stderr
        finals.append(final_weights(Path(r.stdout.strip().splitlines()[-1])))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0]), "two CUDA runs differ"
    first = _cli_run(sparse_cache, tmp_path / "k", arch, fault="after_optimizer_step@17")
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = next((tmp_path / "k").iterdir())
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    resumed = final_weights(run_dir)
    assert all(torch.equal(resumed[k], finals[0][k]) for k in resumed), "resumed CUDA run differs"


TF32 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                          reason="TF32 needs compute capability >= 8.0")


@pytest.mark.parametrize("autocast", ["bf16", pytest.param("tf32", marks=TF32)])
@pytest.mark.parametrize("arch,extra", ARCHS)
def test_reduced_precision_training_on_cuda(sparse_cache, tmp_path, arch, extra, autocast):
    """bf16 autocast and TF32 products: float32 master weights, a run that learns, the choice recorded."""
    sae, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, arch=arch, device="cuda", autocast=autocast, **extra),
                             progress=False)
    held = json.loads((run_dir / "done.json").read_text())["results"]["heldout"]
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert held["explained_variance"] > 0.5, held
    assert json.loads((run_dir / "config.json").read_text())["autocast"] == autocast


@TF32
def test_tf32_steps_multiply_on_tf32_tensor_cores():
    """Inside a tf32 step the float32 product carries TF32's rounding (10-bit mantissa inputs);
    inside a none step exact float32's; the process's own setting is back after each."""
    from train.config import get_default_cfg, update_cfg
    from train.precision import step_precision

    before = torch.get_float32_matmul_precision()
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    exact = (a.double() @ b.double())
    with step_precision(update_cfg(get_default_cfg(), autocast="tf32")):
        tf32 = a @ b
    with step_precision(update_cfg(get_default_cfg(), autocast="none")):
        fp32 = a @ b
    assert rel_err(tf32, exact) > 20 * rel_err(fp32, exact), (rel_err(tf32, exact), rel_err(fp32, exact))
    assert rel_err(fp32, exact) < 1e-5 and rel_err(tf32, exact) < 1e-2
    assert torch.get_float32_matmul_precision() == before


def test_auto_on_cuda_times_every_precision_the_gpu_has(sparse_cache, tmp_path):
    from train import precision

    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, device="cuda", autocast="auto"), progress=False)
    record = json.loads((run_dir / "precision.json").read_text())
    tf32 = torch.cuda.get_device_capability() >= (8, 0)
    assert record["tf32_units"] is tf32 and (record["ms_tf32"] is not None) is tf32
    assert record["bf16_units"] is torch.cuda.is_bf16_supported() and record["ms_fp32"] > 0
    assert record["chosen"] == precision.choose(record["ms_fp32"], record["ms_bf16"], record["ms_tf32"])
    assert json.loads((run_dir / "config.json").read_text())["autocast"] == record["chosen"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0),
                    reason="a GPU before compute capability 8.0")
def test_tf32_is_refused_before_sm80(sparse_cache, tmp_path):
    from train.precision import UnavailablePrecision

    with pytest.raises(UnavailablePrecision, match="compute capability >= 8.0"):
        train_sae(None, cfg_for(sparse_cache, tmp_path, device="cuda", autocast="tf32"), progress=False)


# --------------------------------------------------------------------------- evaluation


def test_lm_evaluation_on_cuda_matches_cpu(reference_cache, tmp_path):
    """train eval with the LM on CUDA gives the CPU figures (fp32 compute)."""
    _, run_dir = train_sae(None, cfg_for(reference_cache, tmp_path, arch="topk", device="cpu", batch_size=32,
                                         tokens=32 * 8, checkpoint_every=32 * 8, threshold_batches=1,
                                         dead_tokens_threshold=64),
                           progress=False)
    res = {dev: evaluate_checkpoint(run_dir, device=dev, autocast="none", max_contexts=4, lm_batch_size=2, batches=2,
                                    out=tmp_path / f"{dev}.json")[0] for dev in ("cpu", "cuda")}
    for key in ("ce_clean", "ce_zero_ablation"):
        assert res["cuda"]["lm"][key] == pytest.approx(res["cpu"]["lm"][key], rel=1e-4), key
    a, b = res["cuda"]["encodings"]["inference"], res["cpu"]["encodings"]["inference"]
    assert a["ce_spliced"] == pytest.approx(b["ce_spliced"], rel=1e-4)
    assert a["explained_variance"] == pytest.approx(b["explained_variance"], abs=1e-4)
