"""Our SAE trainers against SAELens' own training classes on identical activations.

    # the activations (offline quickstart: SmolLM2-135M layer 8 on the KJV)
    python -c "from pipelines.offline_assets import *; smollm2_hf_folder('/data/smollm2'); kjv_jsonl('/data/kjv.jsonl')"
    harvest run --model /data/smollm2 --dataset /data/kjv.jsonl --layer 8 --tokens 1048576 \
        --shard-tokens 65536 --context-length 128 --autocast bf16 --out /data/acts-smollm2-l8

    # SAELens in its own venv (it pins its own transformers etc.; see requirements-saelens.txt)
    python -m venv /opt/saelens-venv
    /opt/saelens-venv/bin/pip install torch==2.13.0 && /opt/saelens-venv/bin/pip install -r pipelines/requirements-saelens.txt

    python pipelines/compare_saelens.py /data/acts-smollm2-l8 --saelens-python /opt/saelens-venv/bin/python
    python pipelines/compare_saelens.py /data/acts-smollm2-l8 --archs matryoshka,gated,jumprelu \
        --jumprelu-target 32 --saelens-python /opt/saelens-venv/bin/python
    python pipelines/compare_saelens.py /data/acts-smollm2-l8 --all-variants --no-saelens

What it does
  1. Trains our SAE of each of --archs (default topk; k=32, 8x expansion, batch 4096, 1M tokens,
     last shard held out, dataset-level normalisation, wandb disabled) with
     `train.training.train_sae`; --jumprelu-target T adds our JumpReLU with target_l0 = T.
  2. Exports the exact rows our trainer consumed, in the order it consumed them (our
     ActivationStore with the run's seed, window, held-out and BOS settings, scaled by the same
     normalisation factor), to `train.npy`, and the held-out rows to `heldout.npy` (float32). Every
     arch reads the same rows in the same order.
  3. For each of our archs that SAELens 6.54 has (topk, matryoshka, gated, jumprelu), runs
     `pipelines/saelens_worker.py` under the SAELens interpreter (this one if `sae_lens` imports
     here, else --saelens-python): SAELens' `SAETrainer` trains its class for it
     (TopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE with our prefix widths, GatedTrainingSAE,
     JumpReLUTrainingSAE: with --jumprelu-target its "quadratic" mode at that target, else its
     defaults) from an iterator over train.npy batches, with the same k, width, batch size, token
     budget, lr and lr schedule, and saves its inference form (SAELens' own conversion).
  4. Evaluates every SAE here with one function on the same held-out rows: explained variance
     1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, L0, dead latents = latents that never fired
     on the held-out rows, and for Matryoshka the explained variance of each inner prefix alone
     (its first m_i latents). SAELens' SAEs are evaluated from their saved tensors with an
     independent implementation of SAELens' inference equations (topk, jumprelu, gated).
  Targets printed: ours EV >= SAELens' (the L0s are shown beside) and dead < 5% for each pair; our
  JumpReLU with its defaults at L0 <= 100; with --jumprelu-target T within 20% of T.
  Without SAELens the comparison prints "skipped: SAELens not installed ..." and exits 0 (after
  our table).
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
from shared.cache import Cache  # noqa: E402
from train.activation_store import ActivationStore  # noqa: E402
from train.config import get_default_cfg, update_cfg  # noqa: E402
from train.layout import RunLayout  # noqa: E402
from train.row_mask import RowMask, resolve_row_mask  # noqa: E402
from train.site_pairs import resolve_run_sites  # noqa: E402
from train.training import train_sae  # noqa: E402

WORKER = Path(__file__).resolve().with_name("saelens_worker.py")
SKIP_LINE = "skipped: SAELens not installed (see pipelines/requirements-saelens.txt)"

# Per-variant settings of our runs (on top of the shared ones: k, width, batch, tokens, lr, schedule),
# chosen so that vanilla and gated land near L0 ~ 32-50 at the 1M-token budget on SmolLM2 layer 8
# (activations normalised so that E||x||^2 = d); jumprelu runs with its defaults. Override with
# --set ARCH:KEY=VALUE.
VARIANT_DEFAULTS: dict[str, dict[str, object]] = {
    "vanilla": {"l1_coeff": 1.5},
    "gated": {"l1_coeff": 3.0},  # 1M tokens: L0 37.7, 1.2% dead (l1 5: L0 17.0, 13.5% dead; README)
}
ALL_VARIANTS = ["topk", "vanilla", "batchtopk", "jumprelu", "gated", "matryoshka"]
# Our arch -> SAELens 6.54's training class for it (saelens_worker.py --arch) and its settings there
# (on top of the shared ones); extra worker arguments per arch with --saelens-arg ARCH:ARG.
SAELENS_PEERS = {"topk": "topk", "matryoshka": "matryoshka", "gated": "gated", "jumprelu": "jumprelu"}
SAELENS_VARIANT_ARGS: dict[str, list[str]] = {
    # SAELens' decoder rows start at norm 0.1 and are not renormalised, and its L1 is weighted by
    # them: a coefficient about 10x ours lands at a comparable L0
    "gated": ["--l1", "30"],
}


# --------------------------------------------------------------------------- our trainer


def our_config(args: argparse.Namespace, arch: str, out: Path, **extra):
    """Our TrainConfig for `arch` (a run label "jumprelu_t32" is arch jumprelu with target_l0 32)."""
    if arch.startswith("jumprelu_t"):
        return our_config(args, "jumprelu", out, target_l0=float(arch.removeprefix("jumprelu_t")), **extra)
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


def train_ours(args: argparse.Namespace, label: str, out: Path):
    cfg = our_config(args, label, out)
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
    cache = Cache.open(cfg.store)
    mask = RowMask.from_cfg(resolve_row_mask(resolve_run_sites(cfg, cache.spec), cache))  # the rows train_sae left out
    store = ActivationStore(cache, sites=cfg.site, batch_size=cfg.batch_size, window_shards=cfg.window_shards,
                            seed=cfg.seed, heldout_shards=cfg.heldout_shards, drop_bos=cfg.drop_bos, row_mask=mask,
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


def prefix_metrics(encode, decode, heldout: torch.Tensor, d_sae: int, widths) -> dict:
    """{m_i: heldout_metrics of the first m_i latents alone} for each inner prefix width."""
    out = {}
    for w in widths:
        def enc(x, w=w):
            f = encode(x)
            f[:, w:] = 0
            return f
        out[str(w)] = heldout_metrics(enc, decode, heldout, d_sae)
    return out


def evaluate_ours(sae, heldout: torch.Tensor) -> dict:
    """Our SAE with its inference encoding (the exported one); Matryoshka also prefix by prefix."""
    sae.eval()
    enc = sae.encodings()[0]
    figures = heldout_metrics(lambda x: enc.encode(sae, x), sae.decode, heldout, sae.d_sae)
    widths = getattr(sae, "widths", None)
    if widths:
        figures["prefix"] = prefix_metrics(lambda x: enc.encode(sae, x), sae.decode, heldout, sae.d_sae, widths[:-1])
    return figures


def saelens_encoder(w):
    """SAELens 6's inference equations (written from its TopKSAE / JumpReLUSAE / GatedSAE, not
    from our code), on the tensors the worker saved: x [B, d] -> f [B, m]."""
    t = {n: torch.from_numpy(np.asarray(w[n])) for n in w.files if n not in ("architecture", "k",
                                                                             "apply_b_dec_to_input")}
    arch, k, apply_b_dec = str(w["architecture"]), int(w["k"]), bool(w["apply_b_dec_to_input"])

    def encode(x):
        sae_in = x - t["b_dec"] if apply_b_dec else x
        if arch == "gated":
            gate = (sae_in @ t["W_enc"] + t["b_gate"] > 0).to(x.dtype)
            return gate * (sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]).relu()
        h = sae_in @ t["W_enc"] + t["b_enc"]
        if arch == "jumprelu":
            return h.relu() * (h > t["threshold"]).to(h.dtype)
        if arch == "topk":
            top, idx = h.topk(k, dim=1, sorted=False)
            return torch.zeros_like(h).scatter_(1, idx, top.relu())
        raise SystemExit(f"no inference equations here for SAELens architecture {arch!r}")

    return encode, (lambda f: f @ t["W_dec"] + t["b_dec"]), t["W_enc"].shape[1], arch


def evaluate_saelens_weights(path: Path, heldout: torch.Tensor, widths=None) -> dict:
    """SAELens' SAE from the weights the worker saved (its inference form), prefix by prefix when
    widths (Matryoshka's inner widths) are given."""
    encode, decode, d_sae, arch = saelens_encoder(np.load(path))
    figures = heldout_metrics(encode, decode, heldout, d_sae)
    figures["architecture"] = arch
    if widths:
        figures["prefix"] = prefix_metrics(encode, decode, heldout, d_sae, widths)
    return figures


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


def saelens_args(args: argparse.Namespace, arch: str, widths) -> list[str]:
    """The worker's arguments for our `arch`'s peer: its class, our prefix widths (matryoshka), the
    quadratic target (jumprelu with --jumprelu-target), SAELENS_VARIANT_ARGS and --saelens-arg."""
    out = ["--arch", SAELENS_PEERS[arch], *SAELENS_VARIANT_ARGS.get(arch, [])]
    if arch == "matryoshka":
        out += ["--widths", ",".join(map(str, widths))]
    if arch == "jumprelu" and args.jumprelu_target is not None:
        out += ["--jumprelu-mode", "quadratic", "--target-l0", str(args.jumprelu_target)]
    for item in args.saelens_arg:  # ARG for every peer, ARCH:ARG for one
        only, sep, rest = item.partition(":")
        if not sep or only not in SAELENS_PEERS:
            out.append(item)
        elif only == arch:
            out.append(rest)
    return out


def run_saelens(exe: str, data: Path, args: argparse.Namespace, n_steps: int, threads: int | None, arch: str,
                widths) -> dict:
    """Run saelens_worker.py for `arch`'s peer on the exported rows; its result.json, with the path
    of the weights it saved."""
    weights = data / f"saelens_{arch}.npz"
    cmd = [exe, str(WORKER), "--train", str(data / "train.npy"), "--heldout", str(data / "heldout.npy"),
           "--out", str(data / f"saelens_{arch}.json"), "--weights", str(weights),
           "--k", str(args.k), "--expansion", str(args.expansion), "--batch-size", str(args.batch_size),
           "--steps", str(n_steps), "--lr", str(args.saelens_lr or args.lr), "--seed", str(args.seed),
           "--decay-fraction", str(1 - args.lr_decay_start), *saelens_args(args, arch, widths)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise SystemExit(f"saelens_worker.py --arch {arch} failed; its output is above")
    return {**json.loads((data / f"saelens_{arch}.json").read_text()), "weights": str(weights)}


# --------------------------------------------------------------------------- main


def fmt_row(name: str, r: dict, tps: float | None) -> str:
    rate = f"{tps:>9.0f}" if tps else f"{'-':>9}"
    prefix = "  ".join(f"{w}: {p['explained_variance']:.4f}" for w, p in r.get("prefix", {}).items())
    return (f"{name:<30} {r['explained_variance']:>8.4f} {r['l0']:>7.1f} {100 * r['dead_fraction']:>7.2f}% "
            f"{r['dead']:>6} {rate}  {prefix}")


def verdicts(report: dict, args: argparse.Namespace) -> list[tuple[str, bool]]:
    """The targets (module docstring), each with whether it was met."""
    out = []
    for arch, theirs in report.get("saelens", {}).items():
        ours = report["ours"][f"jumprelu_t{args.jumprelu_target:g}" if arch == "jumprelu" and
                              args.jumprelu_target is not None else arch]["eval"]
        t = theirs["eval"]
        ok = ours["explained_variance"] >= t["explained_variance"] and ours["dead_fraction"] < 0.05
        out.append((f"{arch}: ours EV {ours['explained_variance']:.4f} (L0 {ours['l0']:.1f}) >= SAELens "
                    f"{t['explained_variance']:.4f} (L0 {t['l0']:.1f}) and ours dead {100 * ours['dead_fraction']:.2f}% "
                    "< 5%", ok))
    if "jumprelu" in report["ours"]:
        l0 = report["ours"]["jumprelu"]["eval"]["l0"]
        out.append((f"jumprelu defaults: L0 {l0:.1f} <= 100", l0 <= 100))
    if args.jumprelu_target is not None:
        t = args.jumprelu_target
        l0 = report["ours"][f"jumprelu_t{t:g}"]["eval"]["l0"]
        out.append((f"jumprelu target_l0={t:g}: L0 {l0:.1f} within 20% ({abs(l0 - t) / t:.1%})", abs(l0 - t) <= 0.2 * t))
    return out


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
                   help="extra argument for saelens_worker.py (repeatable): ARG for every SAELens run, ARCH:ARG for "
                        "one, e.g. --saelens-arg=gated:--l1=20")
    p.add_argument("--all-variants", action="store_true", help="train all six of our variants")
    p.add_argument("--archs", default=None, help=f"comma list of our archs to train (default: topk; {', '.join(ALL_VARIANTS)})")
    p.add_argument("--jumprelu-target", type=float, default=None,
                   help="also train our jumprelu with target_l0 = this; SAELens' jumprelu then runs its quadratic mode at it")
    p.add_argument("--saelens-python", default=None, help="interpreter with sae_lens installed (e.g. /opt/saelens-venv/bin/python)")
    p.add_argument("--no-saelens", action="store_true", help="skip the SAELens comparison")
    p.add_argument("--parallel", action="store_true",
                   help="run SAELens beside our runs, one thread each (halves wall time on 2 cores; tok/s then per thread)")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    archs = args.archs.split(",") if args.archs else (ALL_VARIANTS if args.all_variants else ["topk"])
    labels = archs + ([f"jumprelu_t{args.jumprelu_target:g}"] if args.jumprelu_target is not None else [])
    exe = saelens_python(args)
    peers = [a for a in archs if a in SAELENS_PEERS] if exe is not None else []
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
    widths = None
    if "matryoshka" in archs:  # our prefix widths, given to SAELens' Matryoshka too
        from train.sae.matryoshka import prefix_widths
        d_sae = args.expansion * Cache.open(args.cache).spec.d_model
        widths = list(prefix_widths(our_config(args, "matryoshka", out).matryoshka_widths, d_sae))[:-1]
    worker = None
    try:
        # The rows our runs will consume, in their order (a pure function of the cache, seed, window,
        # held-out and BOS settings: the same for every arch), exported before training so SAELens can
        # run beside it.
        t0 = time.perf_counter()
        report["data"] = export_rows(args.cache, our_config(args, "topk", out), n_steps if peers else 0, data)
        report["data"]["export_s"] = time.perf_counter() - t0
        print(f"data: {report['data']}", flush=True)
        heldout = torch.from_numpy(np.load(data / "heldout.npy"))
        saelens_results: dict[str, dict] = {}

        def run_peers():
            for arch in peers:
                saelens_results[arch] = run_saelens(exe, data, args, n_steps, threads, arch, widths)

        if peers and args.parallel:
            import threading
            worker = threading.Thread(target=run_peers, daemon=True)
            worker.start()

        for label in labels:
            sae, run_dir, cfg, done, speed = train_ours(args, label, out)
            ours = evaluate_ours(sae, heldout)
            report["ours"][label] = {"eval": ours, "done_json": done["results"], "run_dir": str(run_dir),
                                     "config": cfg.to_dict(), **speed}
            rows.append((f"ours {label}", ours, speed["tokens_per_s"]))
            print(fmt_row(f"ours {label}", ours, speed["tokens_per_s"]), flush=True)

        if exe is None:
            print(SKIP_LINE)
        else:
            if worker is not None:
                worker.join()
            else:
                run_peers()
            report["saelens"] = {}
            for arch in peers:
                res = saelens_results[arch]
                theirs = evaluate_saelens_weights(Path(res["weights"]), heldout, widths if arch == "matryoshka" else None)
                report["saelens"][arch] = {"eval": theirs, "worker": res}
                rows.append((f"SAELens {res['version']} {arch}", theirs, res.get("tokens_per_s")))

        print()
        print(f"held-out rows: {report['data']['heldout_rows']}  training tokens: {n_steps * args.batch_size} "
              f"({n_steps} steps of {args.batch_size}; training rows per epoch: {report['data']['rows_per_epoch']})"
              + ("  [ours and SAELens ran side by side, one thread each]" if threads else ""))
        print(f"{'SAE':<30} {'EV':>8} {'L0':>7} {'dead':>8} {'#dead':>6} {'tok/s':>9}  prefix EVs")
        for name, r, tps in rows:
            print(fmt_row(name, r, tps))
        report["targets"] = [{"target": text, "met": ok} for text, ok in verdicts(report, args)]
        if report["targets"]:
            print()
            for t in report["targets"]:
                print(f"{'PASS' if t['met'] else 'FAIL'}  {t['target']}")
            report["pass"] = all(t["met"] for t in report["targets"])
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
