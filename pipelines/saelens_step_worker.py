"""Time SAELens' `SAETrainer` steps on pre-generated activations (called by bench_train_step.py).

Runs under an interpreter that has `sae_lens` installed (its own venv; see
requirements-saelens.txt); needs only numpy, torch, psutil-free stdlib and sae_lens, never this
repository.

    /opt/saelens-venv/bin/python pipelines/saelens_step_worker.py --data DIR/acts_768.npy \
        --arch topk --expansion 8 --k 32 --batch-size 4096 --warmup 2 --steps 5 --out DIR/r.json

--data holds [n, batch_size, d] float32 batches (already normalised: normalize_activations is
"none"); they are loaded into memory first and fed to `SAETrainer.fit()` through a plain Python
iterator that cycles over them, so data loading is not timed. The time of step i is the time
from the iterator's hand-over of batch i to the start of the pull for step i + 1 (everything
fit() does per step: forward, backward, clipping, Adam, scheduler, dead-latent bookkeeping,
progress bar); the first --warmup steps are dropped. One extra step is run so that the last
measured step has a closing pull. Inside each pull after a measured step, before the next batch
is handed over (so outside any step's time), one dense torch.mm([batch, d] x [d, d_sae]) is
timed: the floor paired with that step.

Architectures and SAELens defaults: vanilla = StandardTrainingSAE, topk = TopKTrainingSAE,
batchtopk = BatchTopKTrainingSAE, jumprelu = JumpReLUTrainingSAE ("step" L0 loss), matryoshka =
MatryoshkaBatchTopKTrainingSAE (widths d_sae/16, d_sae/4, d_sae), gated = GatedTrainingSAE;
everything not set here is SAELens' default (wandb off, no checkpoints, no autocast).

--dead-fraction f makes the first f * d_sae latents dead: their encoder bias is set to -1e4 (they
never fire) and SAELens' counter n_forward_passes_since_fired is set past dead_feature_window
inside every iterator pull, so that its AuxK loss runs: the same dead set bench_train_step.py
makes in our trainer.

Memory: resident set size (from /proc/self/statm) sampled every millisecond by a thread during
the measured steps; `rss_base` is the RSS after the batches are loaded and before the SAE is
built, so peak - base is the memory the SAE, its optimiser and the step itself added.

Writes JSON: step_s (list), median_step_s, tokens_per_s (batch_size / median step), floors_s
and floor_s (their median), step_over_floor (median of step / its floor), rss_base, rss_peak,
versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs under SAELens' interpreter, as a script
from pipelines.measure import PeakRSS, rss_bytes  # noqa: E402



def build(arch: str, d: int, d_sae: int, k: int, device: str, sparse_topk: bool):
    common = dict(d_in=d, d_sae=d_sae, device=device, normalize_activations="none")
    if arch == "vanilla":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        return StandardTrainingSAE(StandardTrainingSAEConfig(**common))
    if arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, use_sparse_activations=sparse_topk, **common))
    if arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    if arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common))
    if arch == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                            MatryoshkaBatchTopKTrainingSAEConfig)
        widths = [d_sae // 16, d_sae // 4, d_sae]  # as our default matryoshka_widths = 1/16,1/4
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=widths,
                                                                                   **common))
    if arch == "gated":
        from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
        return GatedTrainingSAE(GatedTrainingSAEConfig(**common))
    raise SystemExit(f"unknown arch {arch!r}; use vanilla, topk, batchtopk, jumprelu, matryoshka or gated")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help=".npy of [n, batch_size, d] float32 batches")
    p.add_argument("--arch", required=True)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dead-fraction", type=float, default=0.0)
    p.add_argument("--sparse-topk", action="store_true", help="TopK: SAELens' use_sparse_activations=True")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    arr = np.load(args.data)
    if arr.ndim != 3 or arr.shape[1] != args.batch_size:
        raise SystemExit(f"{args.data}: expected [n, {args.batch_size}, d], got {arr.shape}")
    batches = [torch.from_numpy(b.copy()).to(args.device) for b in arr]
    del arr
    d = batches[0].shape[1]
    d_sae = args.expansion * d
    rss_base = rss_bytes()

    sae = build(args.arch, d, d_sae, args.k, args.device, args.sparse_topk)
    n_steps = args.warmup + args.steps + 1
    tcfg = SAETrainerConfig(total_training_samples=n_steps * args.batch_size,
                            train_batch_size_samples=args.batch_size, lr=4e-4, lr_end=4e-4,
                            device=args.device)
    pulls: list[float] = []  # when each step's batch was handed over
    starts: list[float] = []  # when each pull began (the previous step ended)
    floors: list[float] = []
    sampler = PeakRSS()
    n_dead = int(round(args.dead_fraction * d_sae))
    with torch.no_grad():  # latents that can never fire (the same ones bench_train_step.py kills in ours)
        getattr(sae, "b_gate", sae.b_enc)[:n_dead] = -1e4  # gated: the gate's bias
    trainer: SAETrainer | None = None

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def provider():
        i = 0
        while True:
            sync()
            starts.append(time.perf_counter())
            if len(starts) > args.warmup:  # the floor, right after the step just finished (not timed as a step)
                torch.mm(batches[0], sae.W_enc.detach())
                sync()
            pulls.append(time.perf_counter())
            floors.append(pulls[-1] - starts[-1])
            if len(pulls) == args.warmup + 1:
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                sampler.start()
            elif len(pulls) == n_steps:
                sampler.stop()
            if n_dead and trainer is not None:
                trainer.n_forward_passes_since_fired[:n_dead] = tcfg.dead_feature_window + 1
            yield batches[i % len(batches)]
            i += 1

    trainer = SAETrainer(tcfg, sae, provider())
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in zip(pulls[args.warmup:], starts[args.warmup + 1:])][: args.steps]
    floors = floors[args.warmup + 1:][: args.steps]  # floors[i + 1] was measured right after step i
    med = statistics.median(steps)
    result = {
        "version": sae_lens.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "arch": args.arch, "sae_class": type(sae).__name__, "d_in": d, "d_sae": d_sae, "k": args.k,
        "batch_size": args.batch_size, "step_s": steps, "median_step_s": med, "mean_step_s": sum(steps) / len(steps),
        "tokens_per_s": args.batch_size / med, "floor_s": statistics.median(floors), "floors_s": floors,
        "step_over_floor": statistics.median(t / f for t, f in zip(steps, floors)), "wall_s": wall,
        "rss_base": rss_base, "rss_peak": sampler.peak, "dead_forced": n_dead,
        "cuda_peak": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("arch", "d_in", "d_sae", "median_step_s", "tokens_per_s", "floor_s")}))


if __name__ == "__main__":
    main()
