"""The harvest host-ceiling benchmark (pipelines/bench_harvest.py --synthetic-model): a harvest
whose forward costs nothing, against raw writes of the same bytes, with the launching thread's
host time per batch."""

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_the_free_forward_harvest_writes_the_real_pipelines_cache(tmp_path, tiny_corpus):
    """The free forward replaces only capture: the harvest's own spec, shards and ledger result."""
    from harvest.runner import HarvestConfig
    from pipelines.harvest_ceiling import harvest_round, shard_sources, synthetic_model_folder
    from shared.cache import Cache

    model = synthetic_model_folder(tmp_path / "assets", tiny_corpus["jsonl"], 24)
    cfg = HarvestConfig(model=str(model), dataset=str(tiny_corpus["jsonl"]), out="", layers=[0], tokens=16 * 12,
                        context_length=16, batch_size=5, device="cpu", shard_tokens=16 * 4, autocast="none",
                        space_check=False)
    marks = harvest_round(cfg, 24, tmp_path)
    cache = Cache.open(tmp_path / "cache")
    assert cache.sealed and cache.n_rows == marks["rows"] == 16 * 12 and marks["shards"] == 3
    assert marks["batches"] == 3 and marks["thread_cpu"] > 0 and marks["end"] >= marks["loop_end"] >= marks["start"]
    g = torch.Generator().manual_seed(0)  # what the free forward returns: one fixed tensor per batch
    want = torch.randn(5 * 16, 24, generator=g).half().numpy()
    shard0 = cache.read_acts(cache.spec.site_names[0], 0)
    assert (shard0 == want[:4 * 16]).all()  # shard 0 = contexts 0-3 of batch 0
    assert (cache.read_acts(cache.spec.site_names[0], 1)[:16] == want[4 * 16:5 * 16]).all()  # context 4
    assert not cache.verify()
    sources = shard_sources(tmp_path / "cache", 3)
    assert sum(len(b) for parts in sources for b in parts) == marks["bytes"]


def test_bench_harvest_synthetic_model_mode_prints_the_ratio_and_host_time(tmp_path):
    r = subprocess.run([sys.executable, "pipelines/bench_harvest.py", "--synthetic-model", "--d-model", "32",
                        "--ceiling-tokens", "4096", "--ceiling-batch-size", "4", "--ceiling-shard-tokens", "1024",
                        "--context-length", "64", "--repeats", "2", "--assets", str(tmp_path / "assets"),
                        "--dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== harvest host ceiling: free forward, d_model 32 float16, 4096 tokens" in r.stdout
    assert "launch CPU ms/batch" in r.stdout and "harvest (free forward) / raw write" in r.stdout
    assert "target >= 0.8" in r.stdout and not list(tmp_path.glob("bench-harvest-*"))
    # Bracketed rounds: each harvest over the mean of the raw writes just before and after it, the
    # raw after round r being the raw before round r + 1; the headline is their median.
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["round", "raw", "before"])
    rows = [[float(v) for v in line.split()] for line in lines[head + 1 : head + 3]]
    assert [row[0] for row in rows] == [1, 2] and rows[0][3] == rows[1][1]
    e = 5e-4  # the GB/s figures are printed to 3 decimals: each is within e of the value used
    for _, before, harvest, after, _, ratio, *_ in rows:
        assert (harvest - e) / ((before + after) / 2 + e) - e <= ratio <= (harvest + e) / max((before + after) / 2 - e, 1e-9) + e
    median = float(next(line for line in lines if line.startswith("median bracketed ratio")).split()[3])
    assert abs(median - (rows[0][5] + rows[1][5]) / 2) <= 1e-3
    cpu = next(line for line in lines if line.startswith("CPU seconds per GB"))
    assert float(cpu.split("harvest ")[1].split(",")[0]) > 0 and float(cpu.split("raw write ")[1].split()[0]) > 0
