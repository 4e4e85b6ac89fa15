"""Where one training step's time goes, in units of the dense forward product it is measured against.

    python pipelines/profile_train_step.py --variant topk --d-in 768 --expansion 8
    python pipelines/profile_train_step.py --variant jumprelu --l0 0.015 --rows 25

Builds our Trainer as pipelines/bench_train_step.py does (same activations, batch, k, settings:
one torch thread, and run it with the bench's environment for large tensors, which this script
sets for itself by re-executing: THP_MEM_ALLOC_ENABLE=1, MALLOC_MMAP_MAX_=0, a huge
MALLOC_TRIM_THRESHOLD_), times --steps steps without the profiler, then profiles --profile-steps
steps with torch.profiler (after one profiled warm-up step) and prints the ops with the most self time per step, each with its
input shapes, ms per step and that time over one dense torch.mm([batch, d_in] x [d_in, width])
timed in the same process ("x mm"). The profiled ms can be inflated by the profiler (its own
allocations make some steps pay fresh pages for large tensors: compare the totals); the
unprofiled step / mm ratio printed first is bench_train_step.py's "step/fwd mm" (under
--autocast bf16 the product is timed in bfloat16, its operands cast beforehand).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
       "OMP_NUM_THREADS": "1"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="topk", help="topk, batchtopk, vanilla, jumprelu, matryoshka, gated")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l0", type=float, default=None, help="vanilla, jumprelu: set this L0 fraction before the warm-up")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--steps", type=int, default=5, help="timed steps without the profiler (median reported)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=20, help="ops listed")
    args = p.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in ENV.items()):  # the allocator settings act at process start
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, **ENV})

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from pipelines.bench_train_step import _make_trainer, _time_floor, make_activations, set_l0

    torch.set_num_threads(1)
    d, B = args.d_in, args.batch_size
    batches = [torch.from_numpy(b.copy()) for b in make_activations(3 * B, d).reshape(3, B, d)]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"arch": args.variant, "expansion": args.expansion, "k": args.k, "batch_size": B, "device": "cpu",
                "tmp": tmp, "autocast": args.autocast}
        cfg, sae, trainer = _make_trainer(spec, d)
        sae.init_b_dec(batches[0], method="mean")
        if args.l0:
            set_l0(sae, batches[0], args.l0)

        def step(i: int) -> None:
            trainer.after_step(trainer.train_step(batches[i % len(batches)]))

        def mm_seconds() -> float:  # in the step's precision: bf16 operands under --autocast bf16
            x, W = batches[0], sae.W_enc.detach()
            if args.autocast == "bf16":
                x, W = x.bfloat16(), W.bfloat16()
            return _time_floor(x, W, "cpu")

        for i in range(3):
            step(i)
        ratios, times, mms = [], [], []
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
            mms.append(mm_seconds())
            ratios.append(times[-1] / mms[-1])
        mm = statistics.median(mms)
        print(f"{args.variant} {d} x {sae.d_sae}, batch {B}, autocast {args.autocast}: step {1e3 * statistics.median(times):.0f} ms, "
              f"dense product {1e3 * mm:.0f} ms, step / product {statistics.median(ratios):.2f} (median of {args.steps})")
        # one profiled warm-up step first: the profiler's own allocations would otherwise make the
        # first recorded step pay fresh pages for its large tensors
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, acc_events=True,
                     schedule=schedule(wait=0, warmup=1, active=args.profile_steps)) as prof:
            for i in range(1 + args.profile_steps):
                step(i)
                prof.step()
    events = sorted((e for e in prof.key_averages(group_by_input_shape=True) if not e.key.startswith("ProfilerStep")),
                    key=lambda e: -e.self_cpu_time_total)
    n = args.profile_steps
    total = sum(e.self_cpu_time_total for e in events) / n / 1e3
    print(f"profiled: {total:.0f} ms of op self time per step ({total / 1e3 / mm:.2f} x mm)")
    print(f"{'op':44s} {'ms/step':>8s} {'x mm':>6s} {'calls':>6s}  input shapes")
    for e in events[:args.rows]:
        ms = e.self_cpu_time_total / n / 1e3
        shapes = ", ".join(str(s) for s in e.input_shapes if s)[:70]
        print(f"{e.key[:44]:44s} {ms:8.1f} {ms / 1e3 / mm:6.2f} {e.count / n:6.1f}  {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
