"""The benchmark/comparison scripts in pipelines/ run end to end on tiny inputs and skip the SAELens
columns cleanly when SAELens is not available (the interpreter given does not exist)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled",
                            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_compare_saelens_skips_cleanly_and_reports_ours(sparse_cache, tmp_path):
    report = tmp_path / "report.json"
    out = _run(["pipelines/compare_saelens.py", str(sparse_cache), "--tokens", "2048", "--batch-size", "256",
                "--expansion", "2", "--k", "4", "--archs", "topk,vanilla", "--saelens-python", str(tmp_path / "none"),
                "--out", str(tmp_path / "runs"), "--json", str(report), "--quiet"], tmp_path)
    assert "skipped: SAELens not installed" in out
    data = json.loads(report.read_text())
    assert set(data["ours"]) == {"topk", "vanilla"} and "saelens" not in data
    topk = data["ours"]["topk"]["eval"]
    assert topk["l0"] == 4 and 0 < topk["explained_variance"] <= 1 and topk["rows"] == data["data"]["heldout_rows"] > 0


def test_bench_train_step_prints_a_table_without_saelens(tmp_path):
    md = tmp_path / "bench.md"
    out = _run(["pipelines/bench_train_step.py", "--variants", "topk,jumprelu", "--d-in", "32", "--expansions", "2",
                "--batch-size", "128", "--k", "4", "--steps", "2", "--warmup", "1", "--data-wait-steps", "2",
                "--saelens-python", str(tmp_path / "none"), "--markdown", str(md)], tmp_path)
    assert "SAELens: skipped" in out and "Data wait" in out
    table = md.read_text()
    assert "| topk | 32 |" in table and "| jumprelu | 32 |" in table and "SAELens columns skipped" in table


def test_bench_train_step_compares_precisions(tmp_path):
    md, js = tmp_path / "precision.md", tmp_path / "precision.json"
    out = _run(["pipelines/bench_train_step.py", "--compare-precision", "--variants", "topk,jumprelu", "--d-in", "32",
                "--expansions", "2", "--batch-size", "128", "--k", "4", "--steps", "2", "--warmup", "1",
                "--markdown", str(md), "--json", str(js)], tmp_path)
    assert "auto would pick" in out and "Data wait" not in out
    rows = json.loads(js.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["topk", "jumprelu"]
    from train.precision import bf16_matrix_units, choose
    has = bf16_matrix_units(torch.device("cpu"))[0]
    for r in rows:
        assert r["raw"]["none"]["precision"] == "fp32" and r["raw"]["bf16"]["precision"] == "bf16"
        assert "tf32" not in r["raw"] and r["tf32_ms"] is None and r["tf32_ratio"] is None  # no TF32 on a CPU
        assert r["ratio"] == pytest.approx(r["bf16_ms"] / r["fp32_ms"])
        assert r["auto"] == (choose(r["fp32_ms"], r["bf16_ms"]) if has else "none")
    table = md.read_text()
    assert "| topk | 32 | 2x (64) |" in table and "tf32 ms/step" in table and "no tf32" in table


def test_bench_train_step_refuses_tf32_off_cuda(tmp_path):
    r = subprocess.run([sys.executable, "pipelines/bench_train_step.py", "--autocast", "tf32", "--device", "cpu",
                        "--no-saelens"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "--autocast tf32 needs CUDA of compute capability >= 8.0" in r.stderr, r.stderr


def test_profile_train_step_lists_the_ops_against_the_dense_product(tmp_path):
    out = _run(["pipelines/profile_train_step.py", "--variant", "jumprelu", "--d-in", "32", "--expansion", "2",
                "--batch-size", "128", "--steps", "2", "--profile-steps", "1", "--l0", "0.2", "--rows", "5"], tmp_path)
    assert float(out.split("step / product ")[1].split()[0]) > 0
    table = out.split("input shapes\n")[1].strip().splitlines()
    assert len(table) == 5 and any(line.startswith("aten::") for line in table)
    ms = [float(line[44:].split()[0]) for line in table]  # ms per step, most first
    assert ms == sorted(ms, reverse=True) and ms[0] > 0


def test_bench_store_prints_ratios_for_mapped_copied_and_cold_windows(tmp_path):
    out = _run(["pipelines/bench_store.py", "--shards", "3", "--rows-per-shard", "2048", "--d-model", "64",
                "--batch-size", "512", "--window-shards", "2", "--rss-window-shards", "1", "--repeats", "1",
                "--cold", "--dir", str(tmp_path)], tmp_path)
    for row in ["store epoch2, copied windows", "store cold epoch1, map", "store cold epoch1, copy",
                "store / random gather, RAM", "windows mapped", "growth while serving"]:
        assert row in out, row
    assert not list(tmp_path.glob("tmp*"))  # the synthetic cache is removed


def test_bench_harvest_sites_mode_prints_the_ratio_to_one_site(tmp_path):
    out = _run(["pipelines/bench_harvest.py", "--sites", "mlp_in,mlp_out", "--layers", "all", "--models", "tiny-llama",
                "--repeats", "1", "--tokens", "512", "--shard-tokens", "256", "--context-length", "64",
                "--assets", str(tmp_path / "assets"), "--dir", str(tmp_path)], tmp_path)
    assert "== machine: " in out and "avx512_bf16" in out
    assert "8 sites (mlp_in,mlp_out at layers all) vs 1 site (resid_pre at layer 3), 512 tokens" in out
    assert "8 sites / 1 site (tiny-llama)" in out and "harvest/forward" in out


def test_bench_transcoder_step_prints_ratios_against_the_sae(tmp_path):
    report = tmp_path / "tc.json"
    out = _run(["pipelines/bench_transcoder_step.py", "--shapes", "sae,skip_transcoder,clt", "--d-in", "16",
                "--layers", "2", "--expansion", "2", "--k", "4", "--batch-size", "64", "--steps", "2", "--warmup", "1",
                "--json", str(report)], tmp_path)
    for shape in ("sae", "skip_transcoder", "clt"):
        assert any(line.split()[:1] == [shape] for line in out.splitlines()), out
    data = json.loads(report.read_text())["results"]
    assert data["clt"]["layers_covered"] == 2 and data["clt"]["latents_per_layer"] == 32
    assert data["clt"]["parameters"] == 2 * (16 * 32 + 32 + 16) + 3 * 32 * 16 + 2 * 16  # clt_memory's P
    assert data["sae"]["tokens_per_s"] > 0 and data["clt"]["memory_estimate_bytes"] > 0
