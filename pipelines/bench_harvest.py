"""Benchmark harvest overhead in one run: harvest vs forward-only, cache writes vs raw disk writes.

    python pipelines/bench_harvest.py                      # CPU (+ CUDA when available); ~3 min on 2 idle cores
    python pipelines/bench_harvest.py --tokens 32768 --repeats 3 --skip-write
    python pipelines/bench_harvest.py --skip-harvest --write-shards 16 --d-model 768

1. Harvest throughput over forward-only throughput (target >= 0.95), SmolLM2-135M on the KJV
   corpus (both offline assets from `pipelines.offline_assets`, cached under --assets), on CPU and,
   when torch.cuda.is_available(), on CUDA.

   * forward-only: the same checkpoint, freshly loaded with `shared.models.load_model` each
     round as harvest does (not timed), run by `shared.hook_sites.capture` on the same packed
     contexts (the first --tokens of the stream, stacked into batches of --batch-size before
     timing), same site and layer (so the forward stops at the same block), under
     inference_mode and the same autocast; nothing is stored. Time: first batch to the last
     (CUDA synchronised at both ends). One warm-up batch runs before any timing.
   * harvest: the full `harvest.runner.run_harvest` into a fresh cache in a temp folder. Time:
     from entry into the shard loop (`harvest.runner._harvest_shards`: model, corpus and cache
     metadata are ready, nothing tokenised yet) to the return of `CacheWriter.seal`, taken by
     wrapping those two functions for the duration of the call. It therefore includes
     tokenisation, the device->host copy and storage conversion, the writer thread (statistics,
     zarr write, fsyncs, checksums, ledger) and the final unoverlapped shard write, but not model
     loading or cache creation (printed separately as "setup").

   Rounds are interleaved (forward, harvest; then harvest, forward; ...); the summary uses the
   best round of each and also the median of the per-round ratios. Also printed, per harvest:
   the time spent inside capture() over the harvest window ("in-run ratio"), which needs no
   second run and so does not move when other work on a shared machine comes and goes between
   runs (it cannot see the forward itself being slowed by the writer thread).

2. Cache write throughput with a synthetic source over raw sequential writes to the same folder
   (target >= 0.8). Each round writes --write-shards shards of --rows-per-shard x --d-model
   random float16 activations (plus the int32 tokens and positions) through
   `CacheWriter.write_shard` (statistics, zarr chunk writes, file + directory fsyncs, checksums,
   write-once ledger record), and the same number of bytes as one plain file per shard (open,
   write, fsync, close), alternating the two per shard so both see the same load. Cache creation
   and the seal are not timed. Best of --repeats rounds. The CPU seconds of this process (all
   threads, user + system) per shard are printed for both: on a machine whose cores are taken by
   other work, wall time follows CPU time.

3. With --sites (e.g. `--sites mlp_in,mlp_out --layers all --models smollm2-random,tiny-llama`):
   harvest throughput of every --sites kind at every --layers layer in one pass (what transcoder
   training harvests) over the throughput of one --site at one --layer (clamped to the model's
   depth), per model, on the CPU, rounds interleaved in one run; plus that multi-site forward with
   nothing stored, so the storage share shows. Models from `pipelines.bench_models` (the real
   SmolLM2 when installed, else a random-weights model of its configuration, and the tests' tiny
   shapes); the machine (CPU model, cores, bf16/AMX flags) is printed first.

4. With --synthetic-model: the host-side ceiling, a harvest driven by a model whose forward
   costs nothing against the raw sequential write with fsync of the same bytes to the same disk
   (target >= 0.8), each harvest against the mean of the raw writes just before and after it (the
   disk's speed drifts), and the launching thread's CPU time per batch (pipelines/harvest_ceiling.py).

5. With --whole-process: `harvest run` against a plain-transformers harvest of the same model,
   layer and tokens (pipelines/plain_harvest.py), each a fresh process timed from spawn to exit
   (pipelines/harvest_whole_process.py; with --autocast bf16 the issue-15 AMX target >= 0.95).

Timings on shared machines are noisy: compare the ratios from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import harvest.runner as runner  # noqa: E402
from harvest.runner import HarvestConfig, autocast_dtype, default_batch_size, run_harvest  # noqa: E402
from pipelines.offline_assets import kjv_jsonl, smollm2_hf_folder  # noqa: E402
from shared.autocast import AUTOCAST, AUTOCAST_ALIASES  # noqa: E402
from shared.cache import Cache, CacheWriter  # noqa: E402
from shared.cache_stats import shard_statistics  # noqa: E402
from shared.cache_storage import numpy_storage_dtype  # noqa: E402
from shared.durable import fsync_path  # noqa: E402
from shared.synthetic import synthetic_spec  # noqa: E402
from harvest.selection import layer_selection, parse_layer_value, select_sites, site_kinds  # noqa: E402
from shared.hook_sites import capture  # noqa: E402
from shared.models import load_model  # noqa: E402
from shared.tokens import load_documents, pack_contexts  # noqa: E402

HARVEST_TARGET = 0.95
WRITE_TARGET = 0.8


# --------------------------------------------------------------------------- harvest vs forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def harvest_timer(time_capture: bool):
    """Record perf_counter at entry into the shard loop ("start") and after the seal ("end"), and,
    with time_capture (CPU only), the seconds spent inside capture() ("capture"). On CUDA the
    forward is asynchronous and timing it would need a sync per batch, which would stop harvest's
    overlap of batch i+1's forward with batch i's copy: there "capture" stays NaN."""
    marks: dict[str, float] = {"capture": 0.0 if time_capture else math.nan}
    orig_shards, orig_seal, orig_capture = runner._harvest_shards, CacheWriter.seal, runner.capture

    def shards(*args, **kwargs):
        marks["start"] = time.perf_counter()
        return orig_shards(*args, **kwargs)

    def seal(self, *args, **kwargs):
        out = orig_seal(self, *args, **kwargs)
        marks["end"] = time.perf_counter()
        return out

    def timed_capture(model, sites, input_ids, *args, **kwargs):
        t0 = time.perf_counter()
        out = orig_capture(model, sites, input_ids, *args, **kwargs)
        marks["capture"] += time.perf_counter() - t0
        return out

    runner._harvest_shards, CacheWriter.seal = shards, seal
    if time_capture:
        runner.capture = timed_capture
    try:
        yield marks
    finally:
        runner._harvest_shards, CacheWriter.seal, runner.capture = orig_shards, orig_seal, orig_capture


def time_harvest(cfg: HarvestConfig, work: Path) -> dict[str, float]:
    """Seconds of one fresh harvest: "window" (first batch to seal), "capture" (forward inside
    it) and "setup" (run_harvest call to the first batch: model load, corpus, cache creation)."""
    out = Path(tempfile.mkdtemp(prefix="harvest-", dir=work)) / "cache"
    cfg = HarvestConfig(**{**vars(cfg), "out": str(out)})
    try:
        with harvest_timer(time_capture=torch.device(cfg.device).type == "cpu") as marks:
            t0 = time.perf_counter()
            run_harvest(cfg, progress=False)
        n_rows = Cache.open(out).n_rows
        want = -(-cfg.tokens // cfg.context_length) * cfg.context_length
        if n_rows != want:
            raise SystemExit(f"error: harvest wrote {n_rows} rows, expected {want} (corpus too short?)")
        return {"window": marks["end"] - marks["start"], "capture": marks["capture"], "setup": marks["start"] - t0}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def time_forward(cfg: HarvestConfig, batches: list[np.ndarray], device: torch.device, compute) -> float:
    """Seconds to run capture() over the batches on a freshly loaded model (as harvest loads its
    own), storing nothing. Loading is not timed; on CUDA the token ids are pinned beforehand and
    copied without blocking (as harvest does), so the device queue never drains between batches."""
    model = load_model(cfg.model, device=str(device)).model
    sites = select_sites(model, cfg.layers, cfg.site)
    autocast = torch.autocast(device.type, dtype=compute) if compute else nullcontext()
    host = [torch.from_numpy(b.astype(np.int64)) for b in batches]
    if device.type == "cuda":
        host = [h.pin_memory() for h in host]
    _sync(device)
    t0 = time.perf_counter()
    for h in host:
        ids = h.to(device, non_blocking=True)
        with torch.inference_mode(), autocast:
            captured = capture(model, sites, ids)
        del captured
    _sync(device)
    return time.perf_counter() - t0


def packed_batches(cfg: HarvestConfig) -> tuple[list[np.ndarray], int]:
    """The first cfg.tokens of the stream (whole contexts) as batches [batch_size, T]; and their token count."""
    tokenizer = load_model(cfg.model, device="cpu").tokenizer
    ctx = cfg.context_length
    n_contexts = -(-cfg.tokens // ctx)
    contexts = []
    for tokens in pack_contexts(load_documents(cfg.dataset), tokenizer, ctx, cfg.bos):
        contexts.append(tokens)
        if len(contexts) == n_contexts:
            break
    if len(contexts) < n_contexts:
        raise SystemExit(f"error: {cfg.dataset} holds only {len(contexts) * ctx} tokens; ask for fewer with --tokens")
    return [np.stack(contexts[i : i + cfg.batch_size]) for i in range(0, n_contexts, cfg.batch_size)], n_contexts * ctx


def bench_harvest(device: torch.device, cfg: HarvestConfig, repeats: int, work: Path) -> tuple[float, float]:
    """Print harvest vs forward-only for one device; returns (ratio of the best rounds, median in-run ratio)."""
    compute = autocast_dtype(cfg, device)
    batches, n_tokens = packed_batches(cfg)
    ctx, n_contexts = cfg.context_length, n_tokens // cfg.context_length
    time_forward(cfg, batches[:1], device, compute)  # process warm-up (kernels, allocator), shared by both
    print(f"\n== {device.type}: SmolLM2-135M {cfg.site} layer {cfg.layers[0]}, {n_tokens} tokens "
          f"({n_contexts} contexts of {ctx}), batch {cfg.batch_size}, autocast "
          f"{str(compute).replace('torch.', '') if compute else 'none (fp32)'}, storage {cfg.dtype}, "
          f"shards of {min(-(-cfg.shard_tokens // ctx) * ctx, n_tokens)} rows, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'round':>5s} {'forward tok/s':>14s} {'harvest tok/s':>14s} {'ratio':>6s}   "
          f"{'forward in harvest tok/s':>24s} {'in-run ratio':>12s} {'setup s':>8s}")
    fwd, hv, ratios, in_run = [], [], [], []
    for r in range(repeats):
        for what in ("forward", "harvest") if r % 2 == 0 else ("harvest", "forward"):
            if what == "forward":
                fwd.append(n_tokens / time_forward(cfg, batches, device, compute))
            else:
                h = time_harvest(cfg, work)
                hv.append(n_tokens / h["window"])
                in_run.append(h["capture"] / h["window"])
        ratios.append(hv[-1] / fwd[-1])
        print(f"{r + 1:5d} {fwd[-1]:14,.0f} {hv[-1]:14,.0f} {ratios[-1]:6.3f}   "
              f"{n_tokens / h['capture']:24,.0f} {in_run[-1]:12.3f} {h['setup']:8.1f}")
    ratio = best_of_rounds("forward-only", fwd, "harvest", hv, ratios, HARVEST_TARGET, "{:,.0f} tok/s")
    if device.type == "cuda":
        print("in-run ratio: not measured on CUDA (timing each forward would need a sync per batch)")
        return ratio, math.nan
    print(f"in-run ratio (time inside capture() / harvest window, same run, so immune to load drifting "
          f"between runs; blind to the forward itself being slowed by the writer): best {max(in_run):.3f}, "
          f"median {statistics.median(in_run):.3f}")
    return ratio, statistics.median(in_run)


def best_of_rounds(base_name: str, base: list[float], name: str, rates: list[float], ratios: list[float],
                   target: float, unit: str) -> float:
    """Print and return the ratio of the best rounds (max rate over max baseline rate), with the median
    per-round ratio and the verdict against target; unit formats a rate, e.g. "{:.3f} GB/s"."""
    ratio = max(rates) / max(base)
    verdict = "meets" if ratio >= target else "MISSES"
    print(f"best: {base_name} {unit.format(max(base))}, {name} {unit.format(max(rates))} -> ratio {ratio:.3f} "
          f"(median per-round ratio {statistics.median(ratios):.3f}); {verdict} the target {target}")
    return ratio


# --------------------------------------------------------------------------- many sites vs one site


def bench_sites(args: argparse.Namespace, work: Path) -> dict[str, tuple[float, float | None, str]]:
    """Mode 3 (module docstring): per model, multi-site harvest tok/s over one-site harvest tok/s."""
    from transformers import AutoConfig

    from pipelines.bench_models import bench_corpus, bench_model, cpu_description, smollm2_available

    print(f"\n== machine: {cpu_description()}; torch threads {torch.get_num_threads()}")
    corpus = bench_corpus(args.assets)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [("smollm2" if smollm2_available() else "smollm2-random") if m == "auto" else m for m in names]
    kinds, layers = site_kinds(args.sites.split(",")), layer_selection([parse_layer_value(args.layers)])
    results = {}
    for name in names:
        model_dir = bench_model(name, args.assets, corpus)
        n_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
        one = HarvestConfig(model=str(model_dir), dataset=str(corpus), out="", layers=[min(args.layer, n_layers - 1)],
                            site=args.site, tokens=args.tokens, context_length=args.context_length,
                            batch_size=args.batch_size, dtype=args.dtype, device="cpu", shard_tokens=args.shard_tokens,
                            autocast=args.autocast)
        multi = dataclasses.replace(one, layers=layers, site=kinds)
        n_sites = len(kinds) * (n_layers if layers == "all" else len(layers))
        batches, n_tokens = packed_batches(one)
        compute = autocast_dtype(one, torch.device("cpu"))
        time_forward(multi, batches[:1], torch.device("cpu"), compute)  # warm-up
        print(f"\n== {name} ({n_layers} layers): {n_sites} sites ({','.join(kinds)} at layers {args.layers}) vs 1 site "
              f"({args.site} at layer {one.layers[0]}), {n_tokens} tokens, batch {one.batch_size}, storage {one.dtype}, "
              f"shards of {min(-(-one.shard_tokens // one.context_length) * one.context_length, n_tokens)} rows, "
              f"autocast {str(compute).replace('torch.', '') if compute else 'none (fp32)'}")
        print(f"{'round':>5s} {'1-site tok/s':>13s} {'multi tok/s':>12s} {'ratio':>6s} {'multi fwd-only tok/s':>21s} "
              f"{'harvest/fwd':>11s}")
        rates: dict[str, list[float]] = {"one": [], "multi": [], "forward": []}
        for r in range(args.repeats):
            for what in ("one", "multi", "forward") if r % 2 == 0 else ("forward", "multi", "one"):
                if what == "forward":
                    rates[what].append(n_tokens / time_forward(multi, batches, torch.device("cpu"), compute))
                else:
                    rates[what].append(n_tokens / time_harvest(one if what == "one" else multi, work)["window"])
            print(f"{r + 1:5d} {rates['one'][-1]:13,.0f} {rates['multi'][-1]:12,.0f} "
                  f"{rates['multi'][-1] / rates['one'][-1]:6.3f} {rates['forward'][-1]:21,.0f} "
                  f"{rates['multi'][-1] / rates['forward'][-1]:11.3f}")
        ratio = max(rates["multi"]) / max(rates["one"])
        storage = max(rates["multi"]) / max(rates["forward"])
        print(f"best: 1 site {max(rates['one']):,.0f} tok/s, {n_sites} sites {max(rates['multi']):,.0f} tok/s "
              f"({max(rates['multi']) * n_sites:,.0f} site-rows/s) -> ratio {ratio:.3f}; multi-site harvest / its "
              f"forward alone {storage:.3f}")
        results[f"{n_sites} sites / 1 site ({name})"] = (ratio, None, f"harvest/forward {storage:.3f}")
    return results


# --------------------------------------------------------------------------- cache vs raw writes

SITE = "blocks.8.hook_resid_pre"


def write_round(work: Path, acts: list[np.ndarray], n_shards: int, tokens, positions) -> dict[str, float]:
    """Seconds and bytes for n_shards written both ways, alternating per shard (cache first on odd
    shards) so that both see the same disk and machine load: write_shard into a fresh cache, and
    one plain file per shard holding the same bytes (open, write, fsync, close)."""
    rows, d = acts[0].shape
    spec = synthetic_spec(d_model=d, rows_per_shard=rows, planned_rows=n_shards * rows, sites=[SITE], dtype="float16",
                          context_length=128, bos_policy={"policy": "context"})
    root, raw = work / "cache", work / "raw"
    out = {"cache": 0.0, "raw": 0.0, "raw_bytes": 0, "cache_cpu": 0.0, "raw_cpu": 0.0}
    try:
        writer = CacheWriter.create_or_open(root, spec)  # metadata: not timed
        raw.mkdir()
        for k in range(n_shards):
            a = acts[k % len(acts)]
            for what in ("raw", "cache") if k % 2 == 0 else ("cache", "raw"):
                t0, c0 = time.perf_counter(), time.process_time()
                if what == "cache":
                    writer.write_shard(k, {SITE: a}, tokens, positions)
                else:
                    with open(raw / f"shard-{k}", "wb", buffering=0) as f:
                        for part in (a, tokens, positions):
                            out["raw_bytes"] += f.write(memoryview(part).cast("B"))
                        os.fsync(f.fileno())
                out[what] += time.perf_counter() - t0
                out[what + "_cpu"] += time.process_time() - c0
        ledger = Cache.open(root, allow_unsealed=True).ledger
        out["cache_bytes"] = sum(sum(r.sizes.values()) for r in ledger.values())
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(raw, ignore_errors=True)
        fsync_path(work)


def bench_writes(args: argparse.Namespace, work: Path) -> float:
    rows, d, n = args.rows_per_shard, args.d_model, args.write_shards
    rng = np.random.default_rng(0)
    storage = numpy_storage_dtype("float16")
    acts = [rng.standard_normal((rows, d), dtype=np.float32).astype(storage) for _ in range(min(n, 3))]
    tokens = rng.integers(0, 49152, rows, dtype=np.int32)
    positions = np.tile(np.arange(128, dtype=np.int32), -(-rows // 128))[:rows]
    shard_mb = (acts[0].nbytes + tokens.nbytes + positions.nbytes) / 1e6
    print(f"\n== cache writes: {n} shards x {rows} rows x d={d} float16 (+ int32 tokens, positions) = "
          f"{n * shard_mb / 1e3:.2f} GB per round, in {work}")
    print(f"{'round':>5s} {'raw GB/s':>9s} {'cache GB/s':>11s} {'ratio':>6s}   "
          f"{'raw CPU ms/shard':>16s} {'cache CPU ms/shard':>18s}")
    shard_statistics(acts[0][:256])  # one-off torch start-up in this process, not per-shard work
    raw, cache, ratios = [], [], []
    for r in range(args.repeats):
        t = write_round(work, acts, n, tokens, positions)
        raw.append(t["raw_bytes"] / t["raw"] / 1e9)
        cache.append(t["cache_bytes"] / t["cache"] / 1e9)
        ratios.append(cache[-1] / raw[-1])
        print(f"{r + 1:5d} {raw[-1]:9.3f} {cache[-1]:11.3f} {ratios[-1]:6.3f}   "
              f"{t['raw_cpu'] / n * 1e3:16.0f} {t['cache_cpu'] / n * 1e3:18.0f}")
    return best_of_rounds("raw", raw, "cache", cache, ratios, WRITE_TARGET, "{:.3f} GB/s")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring for what is timed and how.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--assets", type=Path, default=Path.home() / ".cache" / "saeforge",
                    help="where the SmolLM2 HF folder (smollm2/) and the KJV corpus (kjv.jsonl) are cached")
    ap.add_argument("--dir", type=Path, default=None, help="work folder for caches and raw files (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per measurement (best is reported)")
    g = ap.add_argument_group("harvest vs forward-only")
    g.add_argument("--devices", default="auto", help="comma list of cpu,cuda; auto = cpu, plus cuda when available")
    g.add_argument("--layer", type=int, default=8, help="the one layer (also the one-site baseline of --sites)")
    g.add_argument("--site", default="resid_pre", help="the one site kind (also the one-site baseline of --sites)")
    g.add_argument("--tokens", type=int, default=None, help="tokens per CPU run (default 65536; 8192 with --sites)")
    g.add_argument("--batch-size", type=int, default=8, help="contexts per forward pass (CPU)")
    g.add_argument("--shard-tokens", type=int, default=None, help="rows per shard, CPU (default 16384; 4096 with --sites)")
    g.add_argument("--cuda-tokens", type=int, default=983_040,
                   help="tokens per CUDA run (the KJV corpus holds about 1.0M at context 128)")
    g.add_argument("--cuda-batch-size", type=int, default=None,
                   help="contexts per forward pass (CUDA; default: harvest's own, 8192 tokens' worth)")
    g.add_argument("--cuda-shard-tokens", type=int, default=65536, help="rows per shard (CUDA)")
    g.add_argument("--context-length", type=int, default=128)
    g.add_argument("--autocast", default="auto", choices=[*AUTOCAST, *AUTOCAST_ALIASES],
                   help="auto = bf16 on CUDA, fp32 on CPU (the harvest default); bfloat16 = bf16")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype")
    m = ap.add_argument_group("many sites vs one site (mode 3: runs instead of the other two)")
    m.add_argument("--sites", default=None, help="comma list of site kinds harvested at every --layers layer, e.g. mlp_in,mlp_out")
    m.add_argument("--layers", default="all", help="layers of --sites: all, a range (2-5) or a list (1,3)")
    m.add_argument("--models", default="auto,tiny-llama",
                   help="comma list of smollm2, smollm2-random, tiny-llama, tiny-gpt2; auto = smollm2 when installed, "
                        "else smollm2-random")
    w = ap.add_argument_group("cache writes vs raw writes")
    w.add_argument("--write-shards", type=int, default=8)
    w.add_argument("--rows-per-shard", type=int, default=65536)
    w.add_argument("--d-model", type=int, default=576)
    c = ap.add_argument_group("host ceiling (mode 4: runs instead of the others)")
    c.add_argument("--synthetic-model", action="store_true", help="harvest with a free forward vs raw writes")
    c.add_argument("--ceiling-tokens", type=int, default=262_144)
    c.add_argument("--ceiling-batch-size", type=int, default=64, help="contexts per batch (64 x 128: a GPU's 8192 tokens)")
    c.add_argument("--ceiling-shard-tokens", type=int, default=65_536)
    p = ap.add_argument_group("whole process vs plain transformers (mode 5: runs instead of the others)")
    p.add_argument("--whole-process", action="store_true",
                   help="harvest run vs pipelines/plain_harvest.py, fresh processes, same --tokens/--layer/--batch-size")
    p.add_argument("--whole-process-threads", type=int, default=1, help="OMP_NUM_THREADS of both children")
    ap.add_argument("--skip-harvest", action="store_true")
    ap.add_argument("--skip-write", action="store_true")
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 8192 if args.sites else 65536
    if args.shard_tokens is None:
        args.shard_tokens = 4096 if args.sites else 16384

    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-harvest-", dir=args.dir) as tmp:
        work = Path(tmp)
        results = {}
        if args.synthetic_model:
            from pipelines.harvest_ceiling import CEILING_TARGET, bench_ceiling

            results["harvest (free forward) / raw write"] = (bench_ceiling(args, work), CEILING_TARGET,
                                                            "median bracketed ratio, not best rounds")
        elif args.whole_process:
            from pipelines.harvest_whole_process import WHOLE_PROCESS_TARGET, bench_whole_process

            model_dir = smollm2_hf_folder(args.assets / "smollm2")
            corpus = kjv_jsonl(args.assets / "kjv.jsonl")
            results["harvest run / plain transformers"] = (
                bench_whole_process(args, work, str(model_dir), str(corpus)), WHOLE_PROCESS_TARGET, "whole process")
        elif args.sites:
            results.update(bench_sites(args, work))
        elif not args.skip_harvest:
            model_dir = smollm2_hf_folder(args.assets / "smollm2")
            corpus = kjv_jsonl(args.assets / "kjv.jsonl")
            for dev in devices:
                cuda = dev.startswith("cuda")
                cfg = HarvestConfig(
                    model=str(model_dir), dataset=str(corpus), out="", layers=[args.layer], site=args.site,
                    tokens=args.cuda_tokens if cuda else args.tokens, context_length=args.context_length,
                    batch_size=(args.cuda_batch_size or default_batch_size(torch.device(dev), args.context_length))
                    if cuda else args.batch_size, dtype=args.dtype, device=dev,
                    shard_tokens=args.cuda_shard_tokens if cuda else args.shard_tokens, autocast=args.autocast,
                )
                ratio, in_run = bench_harvest(torch.device(dev), cfg, args.repeats, work)
                results[f"harvest / forward-only ({dev})"] = (ratio, HARVEST_TARGET, f"in-run ratio {in_run:.3f}")
        if not args.skip_write and not args.sites and not args.synthetic_model and not args.whole_process:
            results["cache write / raw write"] = (bench_writes(args, work), WRITE_TARGET, "")
    print("\nsummary (ratio of best rounds unless noted):")
    for k, (v, target, note) in results.items():
        verdict = "" if target is None else f"target >= {target}  {'ok' if v >= target else 'MISSED':6s}"
        print(f"  {k:36s} {v:6.3f}  {verdict}  {note}")


if __name__ == "__main__":
    main()
