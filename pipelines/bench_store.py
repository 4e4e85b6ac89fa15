"""Benchmark the activation store against plain numpy copies of the same bytes (one run, ratios).

    python pipelines/bench_store.py                       # 16 shards x 65536 rows x d=768 float16 (1.6 GB)
    python pipelines/bench_store.py --shards 8 --rows-per-shard 32768

Builds a synthetic cache in a temporary folder (or --dir), warms the page cache, then prints:

* store: rows served by ActivationStore.next_batch() ([batch, d] of --out-dtype on --device, prefetch on) over
  one full epoch after a warm-up batch; the first epoch also verifies checksums, the second
  (reported as steady state) does not. GB/s counts the cache's storage bytes of the rows served.
* contiguous copy, page cache: np.copyto of consecutive batch-sized slices of each shard's
  memory map into a reused buffer: reading the same files in order with no shuffle.
* contiguous copy, RAM: the same from one in-memory array holding the whole cache (np.copyto),
  and the same rows converted into a reused --out-dtype tensor instead (the store's output).
* random gather, RAM: torch.index_select of random rows of that array into a reused buffer,
  alone and then converted into a reused --out-dtype tensor.
* with --cold: a first epoch (checksums verified) after POSIX_FADV_DONTNEED dropped the cache's files
  from the page cache, windows mapped and copied: reading from the disk.
* peak RSS over window bytes: a child process iterates an epoch of a store whose window is a
  fraction of the cache, sampling its RSS every millisecond; growth = peak - RSS before serving.

Each throughput is the best of --repeats interleaved rounds (timings on shared machines are
noisy: compare ratios from one run). Baselines run in the main thread with --threads torch
threads (default 1, like numpy); the store works in two background threads of one torch thread
each. More torch threads than free cores makes OpenMP ops collapse on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.cache import Cache  # noqa: E402
from shared.cache_storage import numpy_storage_dtype  # noqa: E402
from shared.synthetic import build_synthetic_cache, standard_normal, synthetic_spec  # noqa: E402

SITE = "blocks.8.hook_resid_pre"


def build_cache(path: Path, shards: int, rows: int, d: int, dtype: str) -> None:
    """shards x rows x d synthetic N(0, 1) activations in storage dtype, sealed (shared.synthetic)."""
    spec = synthetic_spec(d_model=d, rows_per_shard=rows, planned_rows=shards * rows, sites=[SITE], dtype=dtype,
                          context_length=128, bos_policy={"policy": "context"})
    build_synthetic_cache(path, spec, standard_normal(d, dtype, seed=0))


def warm_page_cache(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


def open_store(path: Path, args: argparse.Namespace, window_io: str, **kw):
    """The store every timing uses: --batch-size, --window-shards, --out-dtype, --store-threads, --device."""
    import torch

    from train.activation_store import ActivationStore

    return ActivationStore(path, batch_size=args.batch_size, window_shards=args.window_shards, seed=1,
                           dtype=getattr(torch, args.out_dtype), threads=args.store_threads, device=args.device,
                           window_io=window_io, **kw)


def time_store(path: Path, args: argparse.Namespace, window_io: str) -> dict[str, float]:
    """Seconds per batch over epoch 1 (verifying checksums) and epoch 2 of a fresh store."""
    import torch

    out_dtype = getattr(torch, args.out_dtype)
    cuda = args.device.startswith("cuda")
    with open_store(path, args, window_io) as store:
        n_batches = store.rows_per_epoch // args.batch_size
        store.next_batch()  # first window: start-up latency, not throughput
        out = {}
        for name in ("epoch1", "epoch2"):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n_batches):
                x = store.next_batch()
            if cuda:
                torch.cuda.synchronize()  # the last batch has landed on the device
            out[name] = time.perf_counter() - t0
        assert x.dtype == out_dtype and x.shape == (args.batch_size, args.d_model)
    return {k: v / n_batches for k, v in out.items()}  # seconds per batch


def evict_page_cache(path: Path) -> None:
    """Drop the cache's files from the page cache (POSIX_FADV_DONTNEED; clean pages only, no root)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_cold_epoch(path: Path, args: argparse.Namespace, window_io: str) -> float:
    """Seconds per batch over the first epoch of a fresh store after evicting the cache from the
    page cache (start-up included): windows read from the disk."""
    evict_page_cache(path)
    t0 = time.perf_counter()
    with open_store(path, args, window_io) as store:
        n_batches = store.rows_per_epoch // args.batch_size
        for _ in range(n_batches):
            store.next_batch()
    elapsed = time.perf_counter() - t0
    warm_page_cache(path)
    return elapsed / n_batches


def time_contiguous_mmap(cache: Cache, b: int, dst: np.ndarray) -> float:
    t0, n = time.perf_counter(), 0
    for k in cache.shards:
        mm = cache.read_acts(SITE, k)
        for i in range(0, len(mm) - b + 1, b):
            np.copyto(dst, mm[i : i + b])
            n += 1
        del mm
    return (time.perf_counter() - t0) / n


def _torch_view(a: np.ndarray):
    """A torch tensor over numpy storage-dtype data (bfloat16 via its int16 bits)."""
    import torch

    if a.dtype == numpy_storage_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def time_contiguous_ram(arr: np.ndarray, b: int, dst: np.ndarray, convert_to=None) -> float:
    """Consecutive batches: np.copyto into a reused buffer, or converted into a reused `convert_to` tensor."""
    import torch

    src, out = _torch_view(arr), torch.empty(dst.shape, dtype=convert_to or torch.float32)
    n = len(arr) // b
    t0 = time.perf_counter()
    for i in range(n):
        if convert_to is not None:
            out.copy_(src[i * b : (i + 1) * b])
        else:
            np.copyto(dst, arr[i * b : (i + 1) * b])
    return (time.perf_counter() - t0) / n


def time_gather(arr: np.ndarray, b: int, n: int, convert_to=None) -> float:
    """Random rows gathered with torch.index_select into a reused buffer (then into a reused `convert_to` one)."""
    import torch

    src, tmp = _torch_view(arr), _torch_view(np.empty((b, arr.shape[1]), arr.dtype))
    out = torch.empty(b, arr.shape[1], dtype=convert_to or torch.float32)
    rng = np.random.default_rng(0)
    idx = [torch.from_numpy(rng.integers(0, len(arr), b)) for _ in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
        torch.index_select(src, 0, idx[i], out=tmp)
        if convert_to is not None:
            out.copy_(tmp)
    return (time.perf_counter() - t0) / n


def rss_child(path: str, window_shards: int, batch_size: int, window_io: str) -> None:
    """(child process) iterate one epoch; print base RSS, peak RSS and window bytes as JSON."""
    import psutil
    import torch

    from train.activation_store import ActivationStore

    def warm_torch() -> None:  # torch's intra-op thread pool: a one-off cost per calling thread
        torch.index_select(torch.ones(64, 256), 0, torch.arange(64)).mul_(2)

    warm_torch()
    t = threading.Thread(target=warm_torch)
    t.start()
    t.join()
    store = ActivationStore(path, batch_size=batch_size, window_shards=window_shards, seed=0, window_io=window_io)
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(store.rows_per_epoch // batch_size):
        store.next_batch()
    done.set()
    sampler.join()
    print(json.dumps({"base": base, "peak": peak[0], "window_bytes": store.window_bytes}))


def measure_rss(path: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--window-shards", str(args.rss_window_shards),
           "--batch-size", str(args.batch_size), "--window-io", args.window_io]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rows-per-shard", type=int, default=65536)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype the store serves")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--window-shards", type=int, default=4, help="store window for the throughput runs")
    ap.add_argument("--rss-window-shards", type=int, default=2, help="store window for the memory run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the main thread (baselines)")
    ap.add_argument("--store-threads", type=int, default=1,
                    help="torch intra-op threads of each of the store's two background threads (ActivationStore "
                         "threads=; default 1, what training uses so as not to compete with the step)")
    ap.add_argument("--device", default="cpu",
                    help="where the store serves batches (cuda: storage-dtype rows through pinned memory, converted "
                         "on the GPU); the baselines stay CPU copies")
    ap.add_argument("--window-io", default="auto", choices=["auto", "map", "copy"],
                    help="store windows: memory-mapped or copied (auto maps when it can); with auto or map the "
                         "store with copied windows is timed too, as a reference")
    ap.add_argument("--cold", action="store_true",
                    help="also time one first epoch after evicting the cache from the page cache (per window_io)")
    ap.add_argument("--dir", type=Path, default=None, help="build the cache here (default: a temp dir)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, args.window_shards, args.batch_size, args.window_io)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        build_cache(path, args.shards, args.rows_per_shard, args.d_model, args.dtype)
        cache = Cache.open(path)
        itemsize = numpy_storage_dtype(args.dtype).itemsize
        batch_bytes = args.batch_size * args.d_model * itemsize
        cache_bytes = cache.n_rows * args.d_model * itemsize
        import torch

        torch.set_num_threads(args.threads)
        print(f"cache: {args.shards} shards x {args.rows_per_shard} rows x d={args.d_model} {args.dtype} "
              f"= {cache_bytes / 1e9:.2f} GB (built in {time.perf_counter() - t0:.0f} s); "
              f"batch {args.batch_size} rows = {batch_bytes / 1e6:.1f} MB; window {args.window_shards} shards; "
              f"served as {args.out_dtype} on {args.device}; window_io {args.window_io}; torch threads {torch.get_num_threads()}, store threads {args.store_threads}; load average {os.getloadavg()[0]:.1f}")
        warm_page_cache(path)
        arr = np.concatenate([np.asarray(cache.read_acts(SITE, k)) for k in cache.shards])
        dst = np.empty((args.batch_size, args.d_model), dtype=arr.dtype)
        dst.fill(0)
        n_gather = max(8, len(arr) // args.batch_size)
        out_dtype = getattr(torch, args.out_dtype)
        best: dict[str, float] = {}
        mode = open_store(path, args, args.window_io, prefetch=False).window_io
        for _ in range(args.repeats):  # interleaved rounds, best of each
            rounds = {
                **{f"store {k}": v for k, v in time_store(path, args, args.window_io).items()},
                **({"store epoch2, copied windows": time_store(path, args, "copy")["epoch2"]} if mode == "map" else {}),
                "contiguous copy, page cache": time_contiguous_mmap(cache, args.batch_size, dst),
                "contiguous copy, RAM": time_contiguous_ram(arr, args.batch_size, dst),
                f"contiguous copy -> {args.out_dtype}, RAM": time_contiguous_ram(arr, args.batch_size, dst, out_dtype),
                "random gather, RAM": time_gather(arr, args.batch_size, n_gather),
                f"random gather -> {args.out_dtype}, RAM": time_gather(arr, args.batch_size, n_gather, out_dtype),
            }
            for k, v in rounds.items():
                best[k] = min(best.get(k, float("inf")), v)
        del arr
        if args.cold:
            for io in ("map", "copy") if mode == "map" else ("copy",):
                best[f"store cold epoch1, {io}"] = time_cold_epoch(path, args, io)
        gbs = {k: batch_bytes / v / 1e9 for k, v in best.items()}
        print(f"\n{'reader (GB/s of cache bytes served)':36s} {'GB/s':>7s} {'batches/s':>10s}")
        for k, v in best.items():
            print(f"{k:36s} {gbs[k]:7.2f} {1 / v:10.1f}")
        store = gbs["store epoch2"]
        print(f"\nratios (store steady state = epoch 2, windows {'mapped' if mode == 'map' else 'copied'}; epoch 1 also verifies checksums):")
        for k in best:
            if not k.startswith("store"):
                copied = f"; copied windows: {gbs['store epoch2, copied windows'] / gbs[k]:.2f}" if mode == "map" else ""
                print(f"  store / {k:32s} {store / gbs[k]:5.2f}   (epoch 1: {gbs['store epoch1'] / gbs[k]:.2f}{copied})")

        for label, env in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=1MiB", {"MALLOC_MMAP_THRESHOLD_": str(2**20)})):
            r = measure_rss(path, args, env)
            growth = r["peak"] - r["base"]
            print(f"\nmemory ({label}): window {args.rss_window_shards} shards = {r['window_bytes'] / 1e6:.0f} MB, "
                  f"cache {cache_bytes / 1e6:.0f} MB; peak RSS {r['peak'] / 1e6:.0f} MB, growth while serving "
                  f"{growth / 1e6:.0f} MB = {growth / r['window_bytes']:.2f} x window "
                  f"(peak / window = {r['peak'] / r['window_bytes']:.2f})")


if __name__ == "__main__":
    main()
