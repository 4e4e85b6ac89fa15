"""Benchmark the training step of transcoders and of a cross-layer transcoder against the SAE step
at the same widths, in one run on one machine (issue 14):

    python pipelines/bench_transcoder_step.py                        # d 512, 6 layers, 8x, topk k=32
    python pipelines/bench_transcoder_step.py --d-in 768 --layers 12 --expansion 8 --sparsity batchtopk \
        --batch-size 4096 --steps 4 --warmup 2 --markdown bench.md --json bench.json

Shapes, each timed in its own fresh subprocess (`Trainer.train_step` + `Trainer.after_step`, the
whole step, on batches already in memory; median of --steps after --warmup). Each step is timed
in CPU time of its process (time.process_time: with one torch thread, what the step costs
whatever else shares the cores) and in wall time; tok/CPU-s = batch / median CPU time, and the
ratios are of those (wall-clock ratios on a shared 2-core machine swing by 2x with the other
processes' load); with --repeats R every shape runs R times, interleaved, the fastest kept:

    sae               reads and reconstructs one site (the reference: ratio 1)
    transcoder        reads mlp_in of one layer, predicts that layer's mlp_out
    skip_transcoder   the same with the dense skip map W_skip [d, d]
    clt               --layers layers: one encoder per layer, decoders from each layer to every later one

all with --sparsity (topk k, batchtopk k, ...) and m = expansion x d latents per layer. "ratio" is
tok/CPU-s over the SAE's; for the CLT "ratio x L" also counts the L sites each token trains (the CLT
against L SAEs, one per layer, run one after another). "CLT memory" is train.sae.clt.clt_memory's
estimate (16 P + the batch's working set) beside the measured peak resident set of the step
(RSS sampled every millisecond, minus the RSS before the model was built, plus the batch).

Activations: pipelines.bench_train_step.make_activations for each layer's input; each target is a
fixed random linear map of its input plus noise (same scale), float32. Machine settings (--threads,
transparent huge pages, glibc malloc cache) as pipelines/bench_train_step.py, applied to every
subprocess alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.bench_train_step import child_env, make_activations, run_child  # noqa: E402
from pipelines.measure import PeakRSS, rss_bytes  # noqa: E402

SHAPES = ("sae", "transcoder", "skip_transcoder", "clt")


def site_in(l: int) -> str:
    return f"blocks.{l}.ln2.hook_normalized"


def site_out(l: int) -> str:
    return f"blocks.{l}.hook_mlp_out"


def make_batches(n: int, B: int, d: int, layers: int) -> list[dict[str, np.ndarray]]:
    """n batches, each {input site: [B, d], target site: [B, d]} for layers 0..layers-1."""
    rng = np.random.default_rng(1)
    maps = [rng.standard_normal((d, d)).astype(np.float32) / np.float32(np.sqrt(d)) for _ in range(layers)]
    out = []
    for i in range(n):
        batch = {}
        for l in range(layers):
            x = make_activations(B, d, seed=1000 * i + l)
            batch[site_in(l)] = x
            batch[site_out(l)] = x @ maps[l] + 0.1 * rng.standard_normal((B, d)).astype(np.float32)
        out.append(batch)
    return out


def worker(spec: dict) -> dict:
    import torch

    from train.config import get_default_cfg, post_init_cfg, update_cfg
    from train.training import Trainer, build_from_cfg, make_optimizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    shape, L, d, B = spec["shape"], spec["layers"], spec["d_in"], spec["batch_size"]
    data = np.load(spec["data"])
    n = int(data["n"])
    sites = [site_in(l) for l in range(L)] + [site_out(l) for l in range(L)]
    batches = [{s: torch.from_numpy(data[f"{i}:{s}"].copy()) for s in sites} for i in range(n)]
    del data
    base = rss_bytes()
    keys = dict(arch=shape, expansion=spec["expansion"], k=spec["k"], batch_size=B, device=spec["device"],
                wandb_mode="disabled", seed=0, b_dec_init="mean")
    if shape == "sae":
        keys["arch"] = spec["sparsity"]
    else:
        keys["sparsity"] = spec["sparsity"]
        n_cov = L if shape == "clt" else 1
        keys.update(in_site=",".join(site_in(l) for l in range(n_cov)),
                    out_site=",".join(site_out(l) for l in range(n_cov)))
    cfg = post_init_cfg(update_cfg(get_default_cfg(), **keys), d, site_in(0))
    sae = build_from_cfg(cfg, torch.device(spec["device"]))
    trainer = Trainer(cfg, sae, None, make_optimizer(cfg, sae), Path(spec["tmp"]), progress=False)
    x0, y0 = trainer.plan.pair(batches[0])
    if shape == "sae":
        sae.init_b_dec(x0, method="mean")
    else:
        sae.init_b_dec(x0, y0, method="mean")

    def step(i: int) -> None:
        trainer.after_step(trainer.train_step(batches[i % n]))

    for i in range(spec["warmup"]):
        step(i)
    sampler = PeakRSS()
    sampler.start()
    times, cpu = [], []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = sampler.stop()
    med, med_cpu = statistics.median(times), statistics.median(cpu)
    batch_bytes = sum(v.numel() * v.element_size() for v in (x0, y0 if y0 is not None else x0[:0]))
    out = {"shape": shape, "sparsity": spec["sparsity"], "d_in": d, "latents_per_layer": cfg.dict_size,
           "layers_covered": L if shape == "clt" else 1, "batch_size": B, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "step_s": times, "median_step_s": med, "tokens_per_s": B / med,
           "cpu_s": cpu, "median_cpu_s": med_cpu, "tokens_per_cpu_s": B / med_cpu,
           "parameters": sum(p.numel() for p in sae.parameters()), "step_peak_bytes": peak - base + batch_bytes}
    if shape == "clt":
        est = type(sae).training_memory(cfg)
        out.update(memory_estimate_bytes=est.total, memory_formula=est.formula)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(spec["out"]).write_text(json.dumps(worker(spec), indent=1))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--layers", type=int, default=6, help="layers the CLT covers (a model's all)")
    p.add_argument("--expansion", type=int, default=8, help="latents per layer / d_in")
    p.add_argument("--sparsity", default="topk", help="the sparsity rule of every shape (the SAE's arch)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--distinct-batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every shape, interleaved; the fastest median is kept")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per subprocess (0: torch's default)")
    p.add_argument("--thp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--malloc-cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {', '.join(bad)}; valid: {', '.join(SHAPES)}")
    L = args.layers if "clt" in shapes else 1
    with tempfile.TemporaryDirectory(prefix="bench-tc-") as tmp_s:
        tmp = Path(tmp_s)
        batches = make_batches(args.distinct_batches, args.batch_size, args.d_in, L)
        arrays = {f"{i}:{s}": v for i, b in enumerate(batches) for s, v in b.items()}
        np.savez(tmp / "data.npz", n=len(batches), **arrays)
        del arrays
        del batches
        results: dict = {}
        for rep in range(args.repeats):  # interleaved: load drift on a shared machine hits every shape alike
            for shape in shapes:
                spec = {"shape": shape, "layers": L, "d_in": args.d_in, "expansion": args.expansion, "k": args.k,
                        "sparsity": args.sparsity, "batch_size": args.batch_size, "steps": args.steps,
                        "warmup": args.warmup, "threads": args.threads, "device": args.device,
                        "data": str(tmp / "data.npz"), "tmp": str(tmp), "out": str(tmp / f"{shape}.json")}
                (tmp / f"{shape}.spec.json").write_text(json.dumps(spec))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(tmp / f"{shape}.spec.json")]
                r = run_child(cmd, Path(spec["out"]), child_env(args), args.timeout, tmp / f"{shape}.log")
                said = f"{r['tokens_per_s']:.0f} tok/s" if isinstance(r, dict) else r
                print(f"{shape} (repeat {rep + 1}): {said}", file=sys.stderr)
                prev = results.get(shape)
                if isinstance(r, dict):
                    medians = (prev["repeat_medians_s"] if isinstance(prev, dict) else []) + [r["median_cpu_s"]]
                    if not isinstance(prev, dict) or r["median_cpu_s"] < prev["median_cpu_s"]:
                        prev = r
                    results[shape] = {**prev, "repeat_medians_s": medians}  # the fastest repeat's figures
                elif prev is None:
                    results[shape] = r
    ref = results.get("sae")
    head = ["shape", "layers", "latents", "CPU ms", "wall ms", "tok/CPU-s", "tok/s", "ratio", "ratio x L", "peak MiB",
            "estimate MiB"]
    lines = []
    for shape, r in results.items():
        if not isinstance(r, dict):
            lines.append([shape, "-", "-", "error", r] + [""] * 6)
            continue
        ratio = r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"] if isinstance(ref, dict) else None
        Lc = r["layers_covered"]
        lines.append([shape, str(Lc), f"{Lc} x {r['latents_per_layer']}", f"{r['median_cpu_s'] * 1e3:.0f}",
                      f"{r['median_step_s'] * 1e3:.0f}", f"{r['tokens_per_cpu_s']:.0f}",
                      f"{r['tokens_per_s']:.0f}", "-" if ratio is None else f"{ratio:.2f}",
                      "-" if ratio is None else f"{ratio * Lc:.2f}", f"{r['step_peak_bytes'] / 2**20:.0f}",
                      f"{r['memory_estimate_bytes'] / 2**20:.0f}" if "memory_estimate_bytes" in r else ""])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))
    cmdline = "python pipelines/bench_transcoder_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.markdown:
        md = [f"`{cmdline.strip()}`: d {args.d_in}, {args.sparsity} k {args.k}, batch {args.batch_size}, "
              f"median of {args.steps} steps after {args.warmup}, {args.threads} thread(s)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(l) + " |" for l in lines]
        Path(args.markdown).write_text("\n".join(md) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmdline, "results": results}, indent=1))
    return 0 if all(isinstance(r, dict) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
