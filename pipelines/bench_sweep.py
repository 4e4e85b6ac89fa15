"""Benchmark: one N-SAE sweep (each batch read once for all SAEs) against N separate runs.

    python -m pipelines.bench_sweep                 # N = 4 and 8, small synthetic cache
    python -m pipelines.bench_sweep --n 4 --d 576 --tokens 200000

Prints, for each N, the wall time of the sweep, of the N separate runs of the same SAEs (same
configs, same data), and their ratio (< 1: the sweep is faster). Both include store start-up, b_dec
initialisation, checkpoints and the final held-out evaluation; wandb is disabled.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from shared.synthetic import build_synthetic_cache, lognormal_norms, synthetic_spec, zero_tokens
from train.config import get_default_cfg, update_cfg
from train.sweep import run_sweep
from train.training import train_sae

SITE = "blocks.0.hook_resid_pre"


def synthetic_cache(root: Path, d: int, rows_per_shard: int, shards: int, seed: int = 0) -> Path:
    """float16 activations with heavy-tailed norms around a shared mean (shared.synthetic.lognormal_norms)."""
    spec = synthetic_spec(d_model=d, rows_per_shard=rows_per_shard, planned_rows=rows_per_shard * shards,
                          sites=[SITE], dtype="float16", context_length=128, dataset={"kind": "synthetic"})
    return build_synthetic_cache(root, spec, lognormal_norms(d, seed), tokens=zero_tokens)


def grid_for(n: int) -> dict[str, list]:
    """n SAEs: TopK/BatchTopK x k values."""
    ks = [8, 16, 32, 64][: max(1, n // 2)]
    return {"arch": ["topk", "batchtopk"], "k": ks}


def write_spec(path: Path, store: Path, out: Path, base: dict, grid: dict) -> Path:
    def fmt(v):
        return f'"{v}"' if isinstance(v, str) else repr(v)

    lines = ['name = "bench"', "[base]", f'store = "{store}"', f'out = "{out}"']
    lines += [f"{k} = {fmt(v)}" for k, v in base.items()]
    lines += ["[grid]"] + [f"{k} = [{', '.join(fmt(x) for x in v)}]" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8], help="Sweep sizes (SAEs per sweep).")
    ap.add_argument("--d", type=int, default=256, help="d_in of the synthetic activations.")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=40_960, help="Training tokens per SAE.")
    ap.add_argument("--rows-per-shard", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="Alternate sweep/separate this often; keep the best.")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = synthetic_cache(tmp / "cache", args.d, args.rows_per_shard, args.shards)
        base = dict(batch_size=args.batch_size, tokens=args.tokens, expansion=args.expansion,
                    checkpoint_every=args.tokens // 2, wandb_mode="disabled", heldout_shards=1, b_dec_init="mean",
                    threshold_batches=4, log_every=10)
        print(f"synthetic cache: d={args.d}, {args.shards} shards x {args.rows_per_shard} rows; "
              f"width {args.expansion}x, batch {args.batch_size}, {args.tokens:,} tokens per SAE")
        print(f"{'N':>3} {'sweep s':>9} {'separate s':>11} {'sweep/separate':>15}")
        for n in args.n:
            grid = grid_for(n)
            spec = write_spec(tmp / f"spec{n}.toml", store, tmp / f"sweep{n}", base, grid)
            t_sweep = t_sep = float("inf")
            for _ in range(args.repeats):  # alternate, keep the best of each: the machine is shared
                t0 = time.perf_counter()
                run_sweep(spec, progress=False)
                t_sweep = min(t_sweep, time.perf_counter() - t0)
                t0 = time.perf_counter()
                for arch in grid["arch"]:
                    for k in grid["k"]:
                        cfg = update_cfg(get_default_cfg(), store=str(store), out=str(tmp / f"sep{n}"), arch=arch,
                                         k=k, **base)
                        train_sae(None, cfg, progress=False)
                t_sep = min(t_sep, time.perf_counter() - t0)
            n_saes = len(grid["arch"]) * len(grid["k"])
            print(f"{n_saes:>3} {t_sweep:>9.1f} {t_sep:>11.1f} {t_sweep / t_sep:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
