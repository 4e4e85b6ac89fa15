"""Benchmark: the cost of `train inspect`'s streamed pass against the bare encoder pass over the same rows.

    python pipelines/bench_inspect.py                       # TopK, 24,576 latents, d 768, 65,536 rows
    python pipelines/bench_inspect.py --rows 8192 --d 64 --dict-size 2048   # a quick run

A synthetic float16 cache (shared.synthetic: heavy-tailed norms, contexts of 128, token ids spread
over a 50k vocabulary) and a randomly initialised TopK SAE whose b_dec is the data mean (so that,
as in a trained SAE, the firings spread over the latents). In one process, alternating `--repeats`
times and keeping the best of each:

    bare      read each batch of rows from the cache, convert to float32, scale, encode
    inspect   the same batches, encode, and LatentCollector.update (train inspect's pass)

Reports rows/s of each, their ratios (inspect / bare wall time and CPU time), the peak RSS of each pass (sampled
every ms) and its growth over the RSS at the pass's start, and the collector's state; then the rest of a site build timed once: nearest latents
(decoder cosine, blockwise), token windows, records and the files (written to a temporary folder;
no tokenizer, no LM), with the site's size. `--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `python pipelines/bench_inspect.py`

from pipelines.measure import PeakRSS  # noqa: E402
from shared.cache import Cache  # noqa: E402
from shared.synthetic import SITE, build_synthetic_cache, lognormal_norms, synthetic_spec  # noqa: E402
from train.inspector.build import site_files  # noqa: E402
from train.inspector.collect import LatentCollector  # noqa: E402
from train.inspector.contexts import token_windows  # noqa: E402
from train.inspector.logits import nearest_latents  # noqa: E402
from train.inspector.records import example_rows  # noqa: E402
from train.inspector.site import write_site  # noqa: E402
from train.inspector.stream import batches  # noqa: E402
from train.sae import build_sae


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = ""
    return f"{model or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def make_cache(root: Path, d: int, rows: int, rows_per_shard: int) -> Cache:
    spec = synthetic_spec(d_model=d, rows_per_shard=rows_per_shard, planned_rows=rows, dtype="float16",
                          context_length=128, dataset={"kind": "synthetic"})
    build_synthetic_cache(root, spec, lognormal_norms(d, seed=0),
                          tokens=lambda k, r: ((r * 7919) % 50_000).astype(np.int32))
    return Cache.open(root)


def timed_pass(cache, shards, sae, scale, batch_rows, make_collector=None):
    """(seconds, rows, peak RSS bytes, RSS growth bytes, stats, CPU seconds) of one pass: encode every
    batch and feed a collector (made inside the pass, so its buffers count in the growth) if
    make_collector. CPU seconds: this process's CPU time (all threads), less sensitive than wall time
    to other jobs on a shared machine."""
    peak = PeakRSS()
    peak.start()
    start = peak.peak
    collector = make_collector() if make_collector else None
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    with torch.no_grad():
        for b in batches(cache, SITE, shards, scale=scale, mask=True, before=16, after=4, batch_rows=batch_rows):
            f = sae.encode(b.x)
            if collector is not None:
                collector.update(f, b.rows, b.window)
            rows += len(b.rows)
            del f
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    top = peak.stop()
    return seconds, rows, top, top - start, collector.result() if collector is not None else None, cpu


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768, help="d_in of the synthetic activations.")
    ap.add_argument("--dict-size", type=int, default=24_576, help="Latents of the SAE.")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rows", type=int, default=65_536, help="Cache rows streamed (position-0 rows are skipped).")
    ap.add_argument("--rows-per-shard", type=int, default=16_384)
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="Alternate bare/inspect this often; keep the best.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("--skip-site", action="store_true", help="Time the passes only.")
    ap.add_argument("--json", type=Path, help="Write the figures here.")
    ap.add_argument("--dir", type=Path, help="Parent of the temporary cache and site [default: the system's].")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        cache = make_cache(tmp / "cache", args.d, args.rows, args.rows_per_shard)
        shards = cache.shards
        scale = float(cache.stats(SITE)["norm_scaling_factor"])
        torch.manual_seed(0)
        sae = build_sae("topk", d_in=args.d, d_sae=args.dict_size, k=args.k).eval()
        with torch.no_grad():  # centred on the data, as training initialises it: firings spread over the latents
            sae.b_dec.copy_(torch.tensor(cache.stats(SITE)["mean"], dtype=torch.float32) * scale)
        print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"SAE topk d_in={args.d} d_sae={args.dict_size:,} k={args.k}; {args.rows:,} cache rows (float16, "
              f"contexts of 128, {len(shards)} shards), batches of {args.batch_rows} rows")
        best: dict = {}
        for _ in range(args.repeats):
            for name in ("bare", "inspect"):
                make = (lambda: LatentCollector(args.dict_size, 21, 16, top=args.top)) if name == "inspect" else None
                got = timed_pass(cache, shards, sae, scale, args.batch_rows, make)
                if name not in best or got[0] < best[name][0]:
                    best[name] = got
                del got
        stats = best["inspect"][4]
        (tb, rows, rss_b, grow_b, _, cb), (ti, _, rss_i, grow_i, _, ci) = best["bare"], best["inspect"]
        fired = int((stats.count > 0).sum())
        figures = {"machine": cpu_model(), "latents_fired": fired, "torch_threads": torch.get_num_threads(), "d_in": args.d,
                   "d_sae": args.dict_size, "k": args.k, "rows": rows, "batch_rows": args.batch_rows,
                   "bare_seconds": tb, "bare_tokens_per_s": rows / tb, "bare_peak_rss_mb": rss_b / 2**20,
                   "bare_rss_growth_mb": grow_b / 2**20, "inspect_seconds": ti, "inspect_tokens_per_s": rows / ti,
                   "inspect_peak_rss_mb": rss_i / 2**20, "inspect_rss_growth_mb": grow_i / 2**20,
                   "ratio": ti / tb, "bare_cpu_seconds": cb, "inspect_cpu_seconds": ci, "cpu_ratio": ci / cb,
                   "load_average": os.getloadavg()[0], "collector_state_mb": _state_mb(args.dict_size, args.top)}
        print(f"{'pass':<10}{'seconds':>9}{'CPU s':>8}{'tokens/s':>11}{'peak RSS MiB':>14}{'growth MiB':>12}")
        print(f"{'bare':<10}{tb:>9.2f}{cb:>8.1f}{rows / tb:>11,.0f}{rss_b / 2**20:>14,.0f}{grow_b / 2**20:>12,.0f}")
        print(f"{'inspect':<10}{ti:>9.2f}{ci:>8.1f}{rows / ti:>11,.0f}{rss_i / 2**20:>14,.0f}{grow_i / 2**20:>12,.0f}")
        print(f"inspect / bare: wall time {ti / tb:.3f}, CPU time {ci / cb:.3f} (load average {os.getloadavg()[0]:.1f}); "
              f"collector state {figures['collector_state_mb']:.0f} MiB "
              f"(independent of the rows streamed); {fired:,} latents fired")
        if not args.skip_site:
            t0 = time.perf_counter()
            near = nearest_latents(sae.W_dec.detach() / scale, k=5)
            t_near = time.perf_counter() - t0
            t0 = time.perf_counter()
            windows = token_windows(cache, example_rows(stats), 16, 4)
            meta = {"run_name": "bench", "arch": "topk", "k": args.k, "d_in": args.d, "d_sae": args.dict_size,
                    "site": SITE, "rows": stats.rows_seen, "rows_per_shard": cache.spec.rows_per_shard,
                    "chunk_size": 64, "notes": ["benchmark: token ids, no logit effect"]}
            site = write_site(tmp / "site", site_files(meta, stats, windows, {}, None, near))
            t_site = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
            n_files = sum(1 for p in site.rglob("*") if p.is_file())
            figures.update(near_seconds=t_near, site_seconds=t_site, site_mb=size / 2**20, site_files=n_files)
            print(f"nearest latents {t_near:.1f} s; windows + records + files {t_site:.1f} s; "
                  f"site {size / 2**20:,.0f} MiB in {n_files} files")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


def _state_mb(m: int, top: int, bands: int = 8, per_band: int = 3, window: int = 21, bins: int = 64) -> float:
    """The collector's buffers (collect.py's bound), in MiB."""
    return m * (top * (16 + 4 * window) + bands * per_band * (28 + 4 * window) + bins * 8 + 32) / 2**20


if __name__ == "__main__":
    main()
