"""Our SAE trainer against SAELens' TopK trainer on identical activations (issue 4's quality bar).

    # the activations (offline quickstart: SmolLM2-135M layer 8 on the KJV)
    python -c "from pipelines.offline_assets import *; smollm2_hf_folder('/root/.cache/saeforge/smollm2'); kjv_jsonl('/root/.cache/saeforge/kjv.jsonl')"
    harvest run --model /root/.cache/saeforge/smollm2 --dataset /root/.cache/saeforge/kjv.jsonl \
        --layer 8 --tokens 1.2M --out /data/acts-smollm2-l8 --shard-tokens 65536

    # SAELens in its own venv (it pins its own transformers etc.; see requirements-saelens.txt)
    python -m venv /opt/saelens-venv
    /opt/saelens-venv/bin/pip install torch==2.13.0 && /opt/saelens-venv/bin/pip install -r pipelines/requirements-saelens.txt

    python pipelines/compare_saelens.py /data/acts-smollm2-l8 --saelens-python /opt/saelens-venv/bin/python
    python pipelines/compare_saelens.py /data/acts-smollm2-l8 --all-variants --no-saelens

What it does
  1. Trains our TopK SAE (k=32, 8x expansion, batch 4096, 1M tokens, last shard held out,
     dataset-level normalisation, wandb disabled) with `train.training.train_sae`, and reads its
     held-out figures from the run's done.json.
  2. Exports the exact rows our trainer consumed, in the order it consumed them (our
     ActivationStore with the run's seed, window, held-out and BOS settings, scaled by the same
     normalisation factor), to `train.npy`, and the held-out rows to `heldout.npy` (float32).
  3. Runs `pipelines/saelens_worker.py` under the SAELens interpreter (this one if `sae_lens`
     imports here, else --saelens-python): SAELens' `SAETrainer` trains its TopK SAE from an
     iterator over train.npy batches, with the same k, width, batch size, token budget, lr and
     lr schedule; the worker saves the weights.
  4. Evaluates both SAEs here with one function on the same held-out rows: explained variance
     1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, L0, and dead latents = latents that never
     fired on the held-out rows.
  --all-variants also trains (and evaluates the same way) our vanilla, batchtopk and jumprelu.
  Without SAELens the comparison prints "skipped: SAELens not installed ..." and exits 0 (after
  the --all-variants table, if asked for).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.measure import heldout_metrics  # noqa: E402
from train.activation_store import ActivationStore  # noqa: E402
from train.config import get_default_cfg, update_cfg  # noqa: E402
from train.layout import RunLayout  # noqa: E402
from train.training import train_sae  # noqa: E402

WORKER = Path(__file__).resolve().with_name("saelens_worker.py")
SKIP_LINE = "skipped: SAELens not installed (see pipelines/requirements-saelens.txt)"

# Per-variant settings of the --all-variants table (on top of the shared ones: k, width, batch, tokens,
# lr, schedule). Chosen so that vanilla and jumprelu land near L0 ~ 32 at the 1M-token budget on SmolLM2
# layer 8 (activations normalised so that E||x||^2 = d); override with --set ARCH:KEY=VALUE.
# jumprelu: threshold_init 0.5 and lr 2e-3, because log_threshold moves by about lr per Adam step: from
# the default 0.001 it cannot reach a useful threshold in a few hundred steps (L0 stays in the thousands).
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "vanilla": {"l1_coeff": 1.5},
    "jumprelu": {"l0_coeff": 0.5, "threshold_init": 0.5, "lr": 2e-3},
}


# --------------------------------------------------------------------------- our trainer


def our_config(args: argparse.Namespace, arch: str, out: Path, **extra):
    cfg = update_cfg(
        get_default_cfg(), store=str(args.cache), arch=arch, k=args.k, expansion=args.expansion,
        batch_size=args.batch_size, tokens=args.tokens, heldout_shards=args.heldout_shards, normalize=True, drop_bos=True,
        lr=args.lr, lr_decay="linear", lr_decay_start=args.lr_decay_start, seed=args.seed, device=args.device,
        out=str(out), wandb_mode="disabled",
        checkpoint_every=max(args.tokens * 2, 1), log_every=10,
    )
    cfg = update_cfg(cfg, **VARIANT_DEFAULTS.get(arch, {}))
    for item in args.set:  # KEY=VALUE for every arch, ARCH:KEY=VALUE for one
        key, _, value = item.partition("=")
        only, _, key = key.rpartition(":")
        if not only or only == arch:
            cfg = update_cfg(cfg, **{key: value})
    return update_cfg(cfg, **extra) if extra else cfg


def train_ours(args: argparse.Namespace, arch: str, out: Path):
    cfg = our_config(args, arch, out)
    t0 = time.perf_counter()
    sae, run_dir = train_sae(None, cfg, progress=not args.quiet)
    wall = time.perf_counter() - t0
    done = json.loads(RunLayout(run_dir).done.read_text())
    rates = [json.loads(line).get("tokens_per_s") for line in RunLayout(run_dir).metrics.read_text().splitlines()]
    rates = [r for r in rates if r]
    return sae, run_dir, cfg, done, {"wall_s": wall, "tokens_per_s": float(np.median(rates[1:] or rates)) if rates else
                                     done["tokens"] / wall}


# --------------------------------------------------------------------------- identical data for SAELens


def export_rows(cache: Path, cfg, n_batches: int, dest: Path) -> dict:
    """train.npy: the first n_batches training batches our store serves for cfg (what train_sae consumed,
    in order); heldout.npy: the held-out rows in cache order. Both float32, normalised like ours."""
    store = ActivationStore(cfg.store, sites=cfg.site, batch_size=cfg.batch_size, window_shards=cfg.window_shards,
                            seed=cfg.seed, heldout_shards=cfg.heldout_shards, drop_bos=cfg.drop_bos,
                            normalize=cfg.normalize, device="cpu")
    try:
        d = store.d_model
        train = np.lib.format.open_memmap(dest / "train.npy", mode="w+", dtype=np.float32,
                                          shape=(n_batches * cfg.batch_size, d))
        for i in range(n_batches):
            train[i * cfg.batch_size : (i + 1) * cfg.batch_size] = store.next_batch().numpy()
        train.flush()
        del train
        held = torch.cat(list(store.eval_batches())).numpy()
        np.save(dest / "heldout.npy", held)
        return {"train_rows": n_batches * cfg.batch_size, "heldout_rows": int(held.shape[0]),
                "rows_per_epoch": store.rows_per_epoch, "scaling_factor": store.scaling_factors[store.sites[0]],
                "d_in": d}
    finally:
        store.close()


# --------------------------------------------------------------------------- one evaluation for both


def evaluate_ours(sae, heldout: torch.Tensor) -> dict:
    sae.eval()
    return heldout_metrics(sae.encode, sae.decode, heldout, sae.d_sae)


def evaluate_saelens_weights(path: Path, heldout: torch.Tensor) -> dict:
    """TopK (k largest pre-activations, then ReLU) from the weights the worker saved."""
    w = np.load(path)
    W_enc, b_enc, W_dec, b_dec = (torch.from_numpy(w[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    k, apply_b_dec = int(w["k"]), bool(w["apply_b_dec_to_input"])

    def encode(x):
        pre = (x - b_dec if apply_b_dec else x) @ W_enc + b_enc
        top, idx = pre.topk(k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, top.relu())

    return heldout_metrics(encode, lambda f: f @ W_dec + b_dec, heldout, W_enc.shape[1])


# --------------------------------------------------------------------------- SAELens


def saelens_python(args: argparse.Namespace) -> str | None:
    if args.no_saelens:
        return None
    if args.saelens_python:
        exe = shutil.which(args.saelens_python) or args.saelens_python
        if not Path(exe).exists():
            return None
        probe = subprocess.run([exe, "-c", "import sae_lens"], capture_output=True)
        return exe if probe.returncode == 0 else None
    return sys.executable if importlib.util.find_spec("sae_lens") is not None else None


def start_saelens(exe: str, data: Path, args: argparse.Namespace, n_steps: int, threads: int | None) -> subprocess.Popen:
    """Launch saelens_worker.py on the exported rows (returns at once; wait() on the result)."""
    cmd = [exe, str(WORKER), "--train", str(data / "train.npy"), "--heldout", str(data / "heldout.npy"),
           "--out", str(data / "saelens_result.json"), "--weights", str(data / "saelens_weights.npz"),
           "--k", str(args.k), "--expansion", str(args.expansion), "--batch-size", str(args.batch_size),
           "--steps", str(n_steps), "--lr", str(args.saelens_lr or args.lr), "--seed", str(args.seed),
           "--decay-fraction", str(1 - args.lr_decay_start), *args.saelens_arg]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env)


def finish_saelens(proc: subprocess.Popen, data: Path) -> dict:
    if proc.wait() != 0:
        raise SystemExit(f"saelens_worker.py failed (exit {proc.returncode}); its output is above")
    return json.loads((data / "saelens_result.json").read_text())


# --------------------------------------------------------------------------- main


def fmt_row(name: str, r: dict, tps: float | None) -> str:
    rate = f"{tps:>9.0f}" if tps else f"{'-':>9}"
    return (f"{name:<22} {r['explained_variance']:>8.4f} {r['l0']:>7.1f} {100 * r['dead_fraction']:>7.2f}% "
            f"{r['dead']:>6} {rate}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="sealed activation cache (harvest run --out)")
    p.add_argument("--out", type=Path, default=None, help="run folder root (default: a temp dir, removed)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training token budget for every SAE")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--heldout-shards", type=int, default=1, help="last shards of the cache held out (both trainers)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4, help="Adam lr for ours and (unless --saelens-lr) SAELens")
    p.add_argument("--saelens-lr", type=float, default=None)
    p.add_argument("--lr-decay-start", type=float, default=0.8,
                   help="both: lr constant, then linear decay to 0 over the last (1 - this) of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override for our runs (repeatable): KEY=VALUE for all, ARCH:KEY=VALUE for one arch, "
                        "e.g. --set dead_tokens_threshold=200000 --set vanilla:l1_coeff=3")
    p.add_argument("--saelens-arg", action="append", default=[], metavar="ARG",
                   help="extra argument passed through to saelens_worker.py (repeatable)")
    p.add_argument("--all-variants", action="store_true", help="also train our vanilla, batchtopk and jumprelu")
    p.add_argument("--archs", default=None, help="comma list of our archs to train (default: topk, or all four)")
    p.add_argument("--saelens-python", default=None, help="interpreter with sae_lens installed (e.g. /opt/saelens-venv/bin/python)")
    p.add_argument("--no-saelens", action="store_true", help="skip the SAELens comparison")
    p.add_argument("--parallel", action="store_true",
                   help="run SAELens beside our runs, one thread each (halves wall time on 2 cores; tok/s then per thread)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    archs = args.archs.split(",") if args.archs else (["topk", "vanilla", "batchtopk", "jumprelu"] if args.all_variants else ["topk"])
    exe = saelens_python(args)
    if exe is not None and "topk" not in archs:
        raise SystemExit("the SAELens comparison needs our topk run; include topk in --archs or pass --no-saelens")
    threads = 1 if (args.parallel and exe) else None
    if threads:
        torch.set_num_threads(threads)
    tmp_root = Path(tempfile.mkdtemp(prefix="compare_saelens_"))
    data = tmp_root / "data"
    data.mkdir()
    out = args.out or tmp_root / "runs"
    n_steps = math.ceil(args.tokens / args.batch_size)  # both trainers step while tokens < budget
    rows: list[tuple[str, dict, float | None]] = []
    report: dict = {"cache": str(args.cache), "tokens": args.tokens, "steps": n_steps, "batch_size": args.batch_size,
                    "k": args.k, "expansion": args.expansion, "lr": args.lr, "ours": {}}
    proc = None
    try:
        # The rows our topk run will consume, in its order (a pure function of the cache, seed, window,
        # held-out and BOS settings), exported before training so SAELens can run beside it.
        t0 = time.perf_counter()
        report["data"] = export_rows(args.cache, our_config(args, "topk", out), n_steps if exe else 0, data)
        report["data"]["export_s"] = time.perf_counter() - t0
        print(f"data: {report['data']}", flush=True)
        heldout = torch.from_numpy(np.load(data / "heldout.npy"))
        if exe is not None and args.parallel:
            proc = start_saelens(exe, data, args, n_steps, threads)

        for arch in archs:
            sae, run_dir, cfg, done, speed = train_ours(args, arch, out)
            ours = evaluate_ours(sae, heldout)
            report["ours"][arch] = {"eval": ours, "done_json": done["results"], "run_dir": str(run_dir),
                                    "config": cfg.to_dict(), **speed}
            rows.append((f"ours {arch}", ours, speed["tokens_per_s"]))
            print(fmt_row(f"ours {arch}", ours, speed["tokens_per_s"]), flush=True)

        if exe is None:
            print(SKIP_LINE)
        else:
            if proc is None:
                proc = start_saelens(exe, data, args, n_steps, threads)
            res = finish_saelens(proc, data)
            proc = None
            theirs = evaluate_saelens_weights(data / "saelens_weights.npz", heldout)
            report["saelens"] = {"eval": theirs, "worker": res}
            rows.append((f"SAELens {res['version']} topk", theirs, res.get("tokens_per_s")))

        print()
        print(f"held-out rows: {report['data']['heldout_rows']}  training tokens: {n_steps * args.batch_size} "
              f"({n_steps} steps of {args.batch_size}; training rows per epoch: {report['data']['rows_per_epoch']})"
              + ("  [ours and SAELens ran side by side, one thread each]" if threads else ""))
        print(f"{'SAE':<22} {'EV':>8} {'L0':>7} {'dead':>8} {'#dead':>6} {'tok/s':>9}")
        for name, r, tps in rows:
            print(fmt_row(name, r, tps))
        if "saelens" in report:
            ours_ev = report["ours"]["topk"]["eval"]["explained_variance"]
            ours_dead = report["ours"]["topk"]["eval"]["dead_fraction"]
            their_ev = report["saelens"]["eval"]["explained_variance"]
            report["pass"] = ok = ours_ev >= their_ev and ours_dead < 0.05
            print(f"\nbar (ours topk EV >= SAELens EV and dead < 5%): {'PASS' if ok else 'FAIL'} "
                  f"({ours_ev:.4f} vs {their_ev:.4f}, dead {100 * ours_dead:.2f}%)")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
