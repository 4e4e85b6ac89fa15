"""Benchmark one training step: ours against SAELens' SAETrainer and against a dense matmul floor.

    python pipelines/bench_train_step.py                                   # the default grid (below)
    python pipelines/bench_train_step.py --variants topk,batchtopk --d-in 768 --expansions 8,32 \
        --steps 5 --warmup 2 --markdown bench.md --json bench.json
    python pipelines/bench_train_step.py --no-saelens                      # our side only
    python pipelines/bench_train_step.py --compare-precision --no-saelens  # ours in fp32, tf32 (CUDA) and bf16

For every (variant, d_in, expansion) of the grid, on the same machine in one run, with the same
activations (pre-generated, see `make_activations`), batch --batch-size (4096) and k (32 for
topk / batchtopk):

1. speedup = our tokens/s / SAELens tokens/s. Ours: `Trainer.train_step` + `Trainer.after_step`
   (the whole step: forward, backward, decoder-gradient projection, clipping, Adam, decoder
   renormalisation, dead-latent and density counters, logging every cfg.log_every steps) on
   batches already in memory (no store: the step, not data loading). SAELens: `SAETrainer.fit()`
   fed from a Python iterator over the same batches in memory (pipelines/saelens_step_worker.py,
   run by the SAELens interpreter); a step is the time between two iterator pulls. Median over
   --steps steps after --warmup steps, each side in a fresh subprocess; SAELens' defaults
   otherwise (wandb off). The column is skipped, with the reason printed, where SAELens is absent.
   Targets: >= 2.0 (topk, batchtopk), >= 1.2 (vanilla, jumprelu).
   "speedup/floor" is the same ratio with each side's step divided by the matmul floor measured in
   its own process: it cancels load drift between the two subprocesses on a shared machine.
2. step/fwd mm = median over the measured steps of (step time / time of one dense
   torch.mm([batch, d_in] x [d_in, width]) run right after that step in the same process). Pairing
   each step with its own product cancels the slow drift of a shared machine's load. Target <= 1.3
   (topk, batchtopk, on the CPU); <= 2.5 (vanilla, jumprelu, on the CPU, sparse kernels, at L0 <= 2%
   of the width: --l0 sets such an L0 before the warm-up; the "L0 (% width)" column is the
   measured steps' median, and --compare-dense measures each variant with sparse_kernels=false too,
   in the same run). step/floor = median step / the computed floor: the step's FLOPs
   and bytes (pipelines/step_floor.py, printed as GFLOP and MB) over the GEMM rate (in the step's
   precision) and the memory bandwidth measured in the same process after its steps.
3. mem ratio = peak memory of a step / (weights + Adam state + one batch), the denominator counted
   from tensor sizes. CPU: resident set size sampled every millisecond by a thread during the
   measured steps in a fresh subprocess; peak = max RSS - RSS before the SAE was built (the
   batches were already loaded) + one batch. CUDA: torch.cuda.max_memory_allocated during the
   steps - memory_allocated before the SAE was built + one batch. The CPU figure includes what the
   allocator and MKL keep resident (freed heap blocks, GEMM packing buffers), so it is an upper
   bound on tensor memory; SAELens' ratio (same method, same denominator) is shown beside it.
4. data wait: a realistic run, our ActivationStore (prefetch threads, float16 cache built with
   shared.synthetic, normalisation on) feeding Trainer.train_step + after_step; the
   fraction of the wall time spent inside store.next_batch(). Target < 5%.

--compare-precision (issue 15): every variant of the grid, ours only, once with autocast none,
once with tf32 (on CUDA of compute capability >= 8.0 only) and once with bf16, each in a fresh
subprocess, one after the other: median ms per step of each, the ratios to fp32, and what
autocast=auto would pick from these figures (train.precision.choose: bf16 counts only on a device
with bf16 matrix units; the fastest of tf32 and bf16 when under its margin of fp32's step, else
none). SAELens and the data-wait run are skipped in this mode. --autocast tf32 (CUDA >= sm_80)
measures the step table in tf32: the floor's GEMM rate is then timed with TF32 matmuls, as the
step's own products run (train.precision.step_precision).

Activations (`make_activations`): anisotropic Gaussian directions (random rotation, power-law
spectrum), log-normal norms with a Student-t tail, plus a shared mean offset, then scaled so
that E||x||^2 = d (what our store's normalisation does), float32.

Machine settings, applied to every subprocess alike: --threads torch intra-op threads (default
1: on a shared 2-core machine more OpenMP threads than free cores make sorts and reductions
collapse, e.g. a 131k-element sort takes 400 ms with 2 threads under load and 6 ms with 1),
--thp (default on) sets THP_MEM_ALLOC_ENABLE=1 so torch's CPU allocator backs large tensors
with transparent huge pages (without it every fresh 100 MB activation tensor costs ~120 ms of
page faults on this VM, for both trainers and the floor alike), and --malloc-cache (default on)
makes glibc keep freed blocks instead of unmapping them, which removes the remaining page faults
(step times then stop jumping by +0.5 s every few steps). Medians are reported; "best" columns
use each side's fastest step (timeit's convention on a shared machine).

Defaults (finish in about 10 minutes on the 2-core development machine, without other load):
variants topk,batchtopk,vanilla,jumprelu; d_in 576,768; expansion 8; steps 4; warm-up 3; a
12-step data-wait run. matryoshka (prefixes m/16, m/4, m; SAELens' MatryoshkaBatchTopKTrainingSAE
with the same widths) and gated (SAELens' GatedTrainingSAE) are measured with --variants. The 32x widths take about 4x longer per step: add them with
--expansions 8,32 (or run them alone with fewer steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.measure import PeakRSS, rss_bytes  # noqa: E402
from pipelines.step_floor import CopyProbe, floor_seconds, step_cost  # noqa: E402

SAELENS_WORKER = Path(__file__).resolve().with_name("saelens_step_worker.py")
VARIANTS = ("topk", "batchtopk", "vanilla", "jumprelu", "matryoshka", "gated")
DEFAULT_VARIANTS = ("topk", "batchtopk", "vanilla", "jumprelu")  # the grid's default; add the others with --variants
TARGET_SPEEDUP = {"topk": 2.0, "batchtopk": 2.0, "vanilla": 1.2, "jumprelu": 1.2}
TARGET_FLOOR = {"topk": 1.3, "batchtopk": 1.3}  # step / one dense forward product (issue 15, CPU)
TARGET_FLOOR_LOW_L0 = {"vanilla": 2.5, "jumprelu": 2.5}  # the same, at L0 <= LOW_L0 of the width, sparse kernels
LOW_L0 = 0.02
TARGET_WAIT = 0.05
SITE = "blocks.8.hook_resid_pre"


# --------------------------------------------------------------------------- activations


def make_activations(n_rows: int, d: int, seed: int = 0) -> np.ndarray:
    """[n_rows, d] float32 with a heavy-tailed norm distribution, a shared offset, E||x||^2 = d.

    x = mu + r * u: u a unit direction of an anisotropic Gaussian (random rotation, standard
    deviations (i + 1)^-0.5 along its axes), r = sqrt(d) * lognormal(0, 0.5) * |t_3| / E|t_3|
    (a Student-t factor with 3 degrees of freedom gives the long tail of the rare huge-norm
    tokens), mu a fixed direction of norm 0.8 sqrt(d).
    """
    rng = np.random.default_rng(seed * 7919 + d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = (np.arange(d) + 1.0) ** -0.5
    basis = (q * scales).astype(np.float32)  # columns: axes scaled by their std
    mu = rng.standard_normal(d).astype(np.float32)
    mu *= 0.8 * np.sqrt(d) / np.linalg.norm(mu)
    out = np.empty((n_rows, d), dtype=np.float32)
    for s in range(0, n_rows, 16384):
        n = min(16384, n_rows - s)
        g = rng.standard_normal((n, d), dtype=np.float32) @ basis.T
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        t = np.abs(rng.standard_t(3, size=(n, 1))) / 1.1  # E|t_3| = 2 sqrt(3) / pi ~ 1.1
        r = np.sqrt(d) * rng.lognormal(0.0, 0.5, size=(n, 1)) * np.minimum(t, 50.0)
        out[s : s + n] = mu + (g * r).astype(np.float32)
    out *= np.float32(np.sqrt(d / np.mean(np.sum(out.astype(np.float64) ** 2, axis=1))))
    return out


# --------------------------------------------------------------------------- helpers (workers)


def _make_trainer(spec: dict, d: int):
    import torch

    from train.config import get_default_cfg, post_init_cfg, update_cfg
    from train.training import Trainer, build_from_cfg, make_optimizer

    cfg = update_cfg(get_default_cfg(), arch=spec["arch"], expansion=spec["expansion"], k=spec["k"],
                     batch_size=spec["batch_size"], device=spec["device"], wandb_mode="disabled", seed=0,
                     b_dec_init="mean", autocast=spec.get("autocast", "none"), compile=spec.get("compile", False),
                     deterministic=spec.get("deterministic", True), sparse_kernels=spec.get("sparse_kernels", True))
    cfg = post_init_cfg(cfg, d, SITE)
    device = torch.device(spec["device"])
    sae = build_from_cfg(cfg, device)
    trainer = Trainer(cfg, sae, None, make_optimizer(cfg, sae), Path(spec["tmp"]), progress=False)
    return cfg, sae, trainer


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_floor(x, W, device: str) -> float:
    """Seconds of one dense torch.mm(x, W) [B, d] x [d, m] into a fresh output (as the forward's own)."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    torch.mm(x, W)
    _sync(device)
    return time.perf_counter() - t0


def worker_ours(spec: dict) -> dict:
    """Our Trainer's step on in-memory batches; floor; peak memory. Runs in a fresh subprocess."""
    import torch

    from train.precision import step_precision

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    arr = np.load(spec["data"])
    batches = [torch.from_numpy(b.copy()).to(device) for b in arr]
    del arr
    d, B = batches[0].shape[1], spec["batch_size"]
    # for the computed floor (pipelines/step_floor.py), made before the memory baseline: the GEMM
    # rate in the step's precision and the bandwidth of a large copy, timed right after every
    # measured step (the fastest kept)
    precision = spec.get("autocast", "none")
    bf16 = precision == "bf16"
    m_width = spec["expansion"] * d
    x_mm, W_mm = (torch.randn(B, d, device=device, dtype=torch.bfloat16),
                  torch.randn(d, m_width, device=device, dtype=torch.bfloat16)) if bf16 else (None, None)
    probe = CopyProbe(torch.device(device))
    _sync(device)
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()

    cfg, sae, trainer = _make_trainer(spec, d)
    sae.init_b_dec(batches[0], method="mean")
    n_dead = int(round(spec["dead_fraction"] * sae.d_sae))
    with torch.no_grad():  # latents that can never fire, so that they stay dead through the step's own update
        sae.b_enc[:n_dead] = -1e4
    if spec.get("l0_fraction"):
        set_l0(sae, batches[0], spec["l0_fraction"])

    def step(i: int) -> dict:
        if n_dead:
            sae.tokens_since_fired[:n_dead] = cfg.dead_tokens_threshold + 1
        parts = trainer.train_step(batches[i % len(batches)])
        trainer.after_step(parts)
        return parts

    for i in range(spec["warmup"]):
        step(i)
    _time_floor(batches[0], sae.W_enc.detach(), device)
    sampler = PeakRSS()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        sampler.start()
    def gemm_s() -> float:
        """One product [B, d] x [d, width] in the step's precision: bf16 operands, TF32 or exact float32."""
        if bf16:
            return _time_floor(x_mm, W_mm, device)
        with step_precision(cfg):
            return _time_floor(batches[0], sae.W_enc.detach(), device)

    gemm_s()
    times, floors, mms, copies = [], [], [], []
    l0s, selected = [], []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        l0 = step(i)["l0"]  # read on the host after the timing
        _sync(device)
        times.append(time.perf_counter() - t0)
        l0s.append(l0)
        selected.append(selected_per_token(sae, batches[i % len(batches)]))
        floors.append(_time_floor(batches[0], sae.W_enc.detach(), device))  # right after: same machine state
        mms.append(gemm_s() if precision != "none" else floors[-1])
        copies.append(probe.seconds())
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    rate, bandwidth = 2.0 * B * d * sae.d_sae / min(mms), 2.0 * (256 << 20) / min(copies)
    l0s = [float(v) for v in l0s]
    took = [s for s in selected if s is not None]
    cost = step_cost(spec["arch"], B, d, sae.d_sae, spec["k"], sparse_kernels=cfg.sparse_kernels, n_dead=n_dead,
                     act_bytes=2 if bf16 else 4, selected=statistics.median(took) if took else None)
    roof_s, bound = floor_seconds(cost, rate, bandwidth)

    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    adam = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    batch_bytes = batches[0].numel() * batches[0].element_size()
    step_peak = peak - base + batch_bytes
    med, floor = statistics.median(times), statistics.median(floors)
    return {"arch": spec["arch"], "d_in": d, "d_sae": sae.d_sae, "k": spec["k"], "batch_size": B,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "step_s": times, "median_step_s": med, "tokens_per_s": B / med, "floor_s": floor, "floors_s": floors,
            "step_over_floor": statistics.median(t / f for t, f in zip(times, floors)), "weights_bytes": params, "adam_bytes": adam, "batch_bytes": batch_bytes,
            "step_peak_bytes": step_peak, "mem_ratio": step_peak / (params + adam + batch_bytes),
            "mem_method": "cuda max_memory_allocated" if cuda else "RSS sampled every 1 ms",
            "dead_forced": n_dead, "dead_latents_end": int(sae.dead_mask().sum()),
            "precision": {"none": "fp32"}.get(precision, precision), "flops": cost.flops, "bytes": cost.bytes,
            "gemm_flops_per_s": rate, "bandwidth_bytes_per_s": bandwidth, "roof_s": roof_s, "roof_bound": bound,
            "step_over_roof": med / roof_s, "l0": statistics.median(l0s), "l0_fraction": statistics.median(l0s) / sae.d_sae,
            "selected_steps": len(took), "selected_per_token": statistics.median(took) if took else None,
            "kernels": "sparse" if cfg.sparse_kernels else "dense"}


def set_l0(sae, x, fraction: float) -> None:
    """Make each latent fire on about `fraction` of the rows x [B, d] (mean L0 = fraction x width):
    vanilla's b_enc is lowered by, and jumprelu's threshold set to, the midpoint of each latent's
    k-th and (k+1)-th largest pre-activation, k = round(B fraction) (jumprelu's init_from_sample)."""
    import torch

    if sae.arch == "jumprelu":
        sae.init_l0 = fraction * sae.d_sae
        sae.init_from_sample(x)
        return
    if sae.arch != "vanilla":
        raise ValueError(f"--l0 sets vanilla's and jumprelu's L0, not {sae.arch}'s")
    with torch.no_grad():
        z = sae.pre_acts(x)
        k = min(max(1, round(x.shape[0] * fraction)), x.shape[0] - 1)
        top = z.topk(k + 1, dim=0).values
        sae.b_enc.sub_((top[k - 1] + top[k]) / 2)


def selected_per_token(sae, x) -> float | None:
    """A threshold rule's selected entries per token on x [B, d] when its step would take the
    selected-entries path (train.sae.base), else None."""
    import torch

    if not getattr(sae, "selects_active", False):
        return None
    with torch.no_grad():
        sel = sae._select_active(x, sae.b_dec, sae.pre_acts(x))
    return None if sel is None else sel[1].rows.numel() / x.shape[0]


def worker_datawait(spec: dict) -> dict:
    """A realistic run: ActivationStore over a float16 cache feeding Trainer.train_step."""
    import torch

    from shared.synthetic import build_synthetic_cache, synthetic_spec
    from train.activation_store import ActivationStore

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    d, B, rows = spec["d_in"], spec["batch_size"], spec["rows_per_shard"]
    path = Path(spec["tmp"]) / "cache"
    cspec = synthetic_spec(d_model=d, rows_per_shard=rows, planned_rows=spec["shards"] * rows, sites=[SITE],
                           dtype="float16", context_length=128)

    def acts(s: int, g: np.ndarray) -> np.ndarray:  # un-normalised scale; the store rescales
        return (make_activations(len(g), d, seed=100 + s) * np.float32(3.0)).astype(np.float16)

    t0 = time.perf_counter()  # tokens: the context index, positions: the position in it
    build_synthetic_cache(path, cspec, acts, tokens=lambda s, g: (g // 128).astype(np.int32))
    build_s = time.perf_counter() - t0

    store = ActivationStore(path, batch_size=B, window_shards=spec["window_shards"], seed=0, normalize=True,
                            device=spec["device"])
    try:
        cfg, sae, trainer = _make_trainer(spec, d)
        sae.init_b_dec(store.next_batch(), method="mean")
        store.seek(0)
        waits, totals = [], []
        for i in range(spec["warmup"] + spec["steps"]):
            _sync(spec["device"])
            t0 = time.perf_counter()
            x = store.next_batch()
            t1 = time.perf_counter()
            trainer.after_step(trainer.train_step(x))
            _sync(spec["device"])
            t2 = time.perf_counter()
            if i >= spec["warmup"]:
                waits.append(t1 - t0)
                totals.append(t2 - t0)
    finally:
        store.close()
    return {"arch": spec["arch"], "d_in": d, "d_sae": sae.d_sae, "batch_size": B, "cache_build_s": build_s,
            "shards": spec["shards"], "rows_per_shard": rows, "window_shards": spec["window_shards"],
            "wait_s": waits, "step_s": totals, "wait_fraction": sum(waits) / sum(totals),
            "max_wait_s": max(waits), "tokens_per_s": B * len(totals) / sum(totals)}


def worker_main(mode: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = {"ours": worker_ours, "datawait": worker_datawait}[mode](spec)
    Path(spec["out"]).write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- driver


def saelens_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """(interpreter, reason it is absent)."""
    if args.no_saelens:
        return None, "--no-saelens given"
    candidates = [args.saelens_python] if args.saelens_python else []
    if importlib.util.find_spec("sae_lens") is not None:
        candidates.append(sys.executable)
    if not args.saelens_python:
        candidates.append("/opt/saelens-venv/bin/python")
    for exe in candidates:
        exe = shutil.which(exe) or exe
        if Path(exe).exists() and subprocess.run([exe, "-c", "import sae_lens"], capture_output=True).returncode == 0:
            return exe, ""
    tried = ", ".join(candidates) or "none"
    return None, f"SAELens not importable (tried: {tried}); install it per pipelines/requirements-saelens.txt"


def child_env(args: argparse.Namespace) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    else:
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    if args.malloc_cache:  # glibc keeps freed blocks (no mmap/munmap per large tensor): no page faults after warm-up
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_child(cmd: list[str], out: Path, env: dict, timeout: float, log: Path) -> dict | str:
    """Run a worker; its JSON result, or a one-line reason it failed."""
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        return f"exit {proc.returncode}: {tail[0][:200]}"
    return json.loads(out.read_text())


def run_ours(args, mode: str, spec: dict, tmp: Path, name: str) -> dict | str:
    spec = {**spec, "out": str(tmp / f"{name}.json"), "tmp": str(tmp)}
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, str(spec_path)]
    return run_child(cmd, Path(spec["out"]), child_env(args), args.timeout, tmp / f"{name}.log")


def run_saelens(args, exe: str, data: Path, arch: str, expansion: int, tmp: Path, name: str) -> dict | str:
    out = tmp / f"{name}.json"
    cmd = [exe, str(SAELENS_WORKER), "--data", str(data), "--arch", arch, "--expansion", str(expansion),
           "--k", str(args.k), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--device", args.device, "--out", str(out),
           "--dead-fraction", str(args.dead_fraction)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.saelens_sparse_topk:
        cmd += ["--sparse-topk"]
    return run_child(cmd, out, child_env(args), args.timeout, tmp / f"{name}.log")


def _mark(value: float | None, target: float | None, higher_is_better: bool) -> str:
    if value is None or target is None:
        return ""
    ok = value >= target if higher_is_better else value <= target
    return " ok" if ok else " MISS"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def build_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        ours, theirs = r["ours"], r["saelens"]
        row = {"variant": r.get("label", r["arch"]), "arch": r["arch"], "d_in": r["d_in"],
               "width": f"{r['expansion']}x ({r['expansion'] * r['d_in']})"}
        if isinstance(ours, dict):
            row.update(l0=ours.get("l0"), l0_fraction=ours.get("l0_fraction"), kernels=ours.get("kernels"),
                       selected=ours.get("selected_per_token"))
            row.update(ours_ms=ours["median_step_s"] * 1e3, ours_tps=ours["tokens_per_s"],
                       floor_ms=ours["floor_s"] * 1e3, step_floor=ours["step_over_floor"],
                       step_floor_best=min(ours["step_s"]) / min(ours["floors_s"]), mem=ours["mem_ratio"],
                       mem_mb=ours["step_peak_bytes"] / 2**20, gflop=ours["flops"] / 1e9, mb=ours["bytes"] / 1e6,
                       gemm_gflops=ours["gemm_flops_per_s"] / 1e9, gbps=ours["bandwidth_bytes_per_s"] / 1e9,
                       roof_ms=ours["roof_s"] * 1e3, roof_bound=ours["roof_bound"], step_roof=ours["step_over_roof"],
                       precision=ours["precision"])
        else:
            row["ours_error"] = ours
        if isinstance(theirs, dict):
            row.update(sl_ms=theirs["median_step_s"] * 1e3, sl_tps=theirs["tokens_per_s"])
            if isinstance(ours, dict):
                row["speedup"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                row["speedup_best"] = min(theirs["step_s"]) / min(ours["step_s"])
                row["speedup_norm"] = theirs["step_over_floor"] / ours["step_over_floor"]
                row["sl_mem"] = (theirs["rss_peak"] - theirs["rss_base"] + ours["batch_bytes"]) / (
                    ours["weights_bytes"] + ours["adam_bytes"] + ours["batch_bytes"])
        else:
            row["sl_error"] = theirs
        rows.append(row)
    return rows


HEAD = ["variant", "d_in", "width", "L0 (% width)", "ours tok/s", "SAELens tok/s", "speedup", "best", "/floor", "fwd mm ms",
        "step/fwd mm", "best", "GFLOP", "MB", "GEMM GFLOP/s", "GB/s", "floor ms", "step/floor", "mem ratio (SAELens)"]


def table_lines(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        v = r.get("arch", r["variant"])
        sp = r.get("speedup")
        floor_target = TARGET_FLOOR.get(v)
        if v in TARGET_FLOOR_LOW_L0 and r.get("kernels") == "sparse" and (r.get("l0_fraction") or 1) <= LOW_L0:
            floor_target = TARGET_FLOOR_LOW_L0[v]
        l0 = "-" if r.get("l0") is None else f"{r['l0']:.1f} ({100 * r['l0_fraction']:.2f}%)"
        out.append([
            r["variant"], str(r["d_in"]), r["width"], l0,
            _fmt(r.get("ours_tps"), ".0f") if "ours_error" not in r else "error",
            _fmt(r.get("sl_tps"), ".0f") if "sl_error" not in r else "skipped",
            _fmt(sp, ".2f") + _mark(sp, TARGET_SPEEDUP.get(v), True),
            _fmt(r.get("speedup_best"), ".2f") + _mark(r.get("speedup_best"), TARGET_SPEEDUP.get(v), True),
            _fmt(r.get("speedup_norm"), ".2f") + _mark(r.get("speedup_norm"), TARGET_SPEEDUP.get(v), True),
            _fmt(r.get("floor_ms"), ".0f"),
            _fmt(r.get("step_floor"), ".2f") + _mark(r.get("step_floor"), floor_target, False),
            _fmt(r.get("step_floor_best"), ".2f") + _mark(r.get("step_floor_best"), floor_target, False),
            _fmt(r.get("gflop"), ".1f"), _fmt(r.get("mb"), ".0f"),
            _fmt(r.get("gemm_gflops"), ".1f") + (f" {r['precision']}" if "precision" in r else ""),
            _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("roof_ms"), ".1f") + (f" ({r['roof_bound']})" if "roof_bound" in r else ""),
            _fmt(r.get("step_roof"), ".2f"),
            _fmt(r.get("mem"), ".2f") + (f" ({r['sl_mem']:.2f})" if "sl_mem" in r else ""),
        ])
    return out


def print_table(lines: list[list[str]]) -> None:
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(HEAD)]
    print("  ".join(h.rjust(w) for h, w in zip(HEAD, widths)))
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


def markdown(lines: list[list[str]], header: str, notes: list[str]) -> str:
    md = [header, "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(l) + " |" for l in lines]
    return "\n".join(md + [""] + notes) + "\n"


PRECISION_HEAD = ["variant", "d_in", "width", "fp32 ms/step", "tf32 ms/step", "bf16 ms/step", "tf32/fp32", "bf16/fp32",
                  "fp32 best", "tf32 best", "bf16 best", "auto would pick"]


def compare_precision(args, data: dict, tmp: Path, variants: list[str], d_ins: list[int],
                      expansions: list[int]) -> tuple[list[dict], list[list[str]], str]:
    """Ours in fp32, tf32 (where the device has it) and bf16 for every grid point (fresh
    subprocesses); rows, table lines and the device's units as train.precision reads them (in this
    process)."""
    import torch

    from train.precision import bf16_matrix_units, choose, tf32_matrix_units

    has, units = bf16_matrix_units(torch.device(args.device))
    tf32, _ = tf32_matrix_units(torch.device(args.device))
    modes = ("none", *(("tf32",) if tf32 else ()), "bf16")
    rows, lines = [], []
    for d in d_ins:
        for e in expansions:
            for v in variants:
                name = f"{v}_{d}_{e}x"
                res = {}
                for mode in modes:
                    spec = {"arch": v, "expansion": e, "k": args.k, "batch_size": args.batch_size, "steps": args.steps,
                            "warmup": args.warmup, "threads": args.threads, "device": args.device,
                            "dead_fraction": args.dead_fraction, "data": str(data[d]), "autocast": mode,
                            "compile": args.compile, "deterministic": not args.nondeterministic,
                            "sparse_kernels": not args.dense}
                    res[mode] = run_ours(args, "ours", spec, tmp, f"ours_{name}_{mode}")
                ok = all(isinstance(r, dict) for r in res.values())
                row = {"variant": v, "d_in": d, "expansion": e, "raw": res}
                if ok:
                    ms = {m: res[m]["median_step_s"] * 1e3 for m in modes}
                    best = {m: min(res[m]["step_s"]) * 1e3 for m in modes}
                    row.update(fp32_ms=ms["none"], tf32_ms=ms.get("tf32"), bf16_ms=ms["bf16"],
                               ratio=ms["bf16"] / ms["none"],
                               tf32_ratio=ms["tf32"] / ms["none"] if tf32 else None,
                               fp32_best_ms=best["none"], tf32_best_ms=best.get("tf32"), bf16_best_ms=best["bf16"],
                               auto=choose(ms["none"], ms["bf16"] if has else None, ms.get("tf32")))
                rows.append(row)

                def cell(key: str, spec: str = ".0f") -> str:
                    return "-" if row.get(key) is None else format(row[key], spec)
                line = [v, str(d), f"{e}x ({e * d})"] + (
                    [cell("fp32_ms"), cell("tf32_ms"), cell("bf16_ms"), cell("tf32_ratio", ".2f"), cell("ratio", ".2f"),
                     cell("fp32_best_ms"), cell("tf32_best_ms"), cell("bf16_best_ms"), row["auto"]] if ok else
                    ["error" if isinstance(res.get(m), str) else "" for m in ("none", "tf32", "bf16")] + ["-"] * 6)
                lines.append(line)
                print(f"  {name}: " + (", ".join(f"{m if m != 'none' else 'fp32'} {ms[m]:.0f} ms/step" for m in modes)
                                       + f", auto would pick {row['auto']}" if ok else f"failed: {res}"), flush=True)
    units = units if has else f"{units} (no bf16 matrix units: bf16 does not count for auto)"
    return rows, lines, units + (", tf32 timed (compute capability >= 8.0)" if tf32 else ", no tf32")


def _print_rows(head: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--d-in", default="576,768", help="comma list of input widths")
    p.add_argument("--expansions", default="8", help="comma list of width / d_in (e.g. 8,32)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="topk / batchtopk")
    p.add_argument("--steps", type=int, default=4, help="measured steps per config and side (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    p.add_argument("--distinct-batches", type=int, default=4, help="pre-generated batches, cycled")
    p.add_argument("--dead-fraction", type=float, default=0.0,
                   help="make this fraction of latents dead on both sides (encoder bias -1e4, so they never fire, "
                        "and dead counters past the threshold before every step), so that AuxK runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in every subprocess (0: torch's default)")
    p.add_argument("--thp", action=argparse.BooleanOptionalAction, default=True,
                   help="THP_MEM_ALLOC_ENABLE=1 in every subprocess (huge pages for large CPU tensors)")
    p.add_argument("--malloc-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="MALLOC_MMAP_MAX_=0 and a huge MALLOC_TRIM_THRESHOLD_ in every subprocess: freed tensors "
                        "are reused instead of unmapped, so large allocations stop page-faulting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=("none", "tf32", "bf16"), default="none",
                   help="our trainer's autocast setting (train config key autocast); SAELens runs as it defaults")
    p.add_argument("--compare-precision", action="store_true",
                   help="ours only, each variant in fp32, tf32 (CUDA >= sm_80) and bf16: ms/step of each, the "
                        "ratios and what autocast=auto would pick (SAELens and the data-wait run skipped)")
    p.add_argument("--compile", action="store_true", help="our trainer with torch.compile (config key compile)")
    p.add_argument("--dense", action="store_true",
                   help="our TopK/BatchTopK through the dense reference path, Vanilla/JumpReLU never through "
                        "their selected entries (config key sparse_kernels=false)")
    p.add_argument("--compare-dense", action="store_true",
                   help="measure every variant twice in the run, sparse kernels and then dense (sparse_kernels=false)")
    p.add_argument("--l0", type=float, default=0.0,
                   help="vanilla, jumprelu: before the warm-up, set each latent's encoder bias (vanilla) or "
                        "threshold (jumprelu) from the first batch so that it fires on this fraction of the "
                        "tokens (mean L0 = this x width; e.g. 0.015); 0: the variants' own init")
    p.add_argument("--nondeterministic", action="store_true",
                   help="our trainer with deterministic=false (CUDA: atomic adds allowed; no effect on CPU)")
    p.add_argument("--saelens-python", default=None,
                   help="interpreter with sae_lens (default: this one, else /opt/saelens-venv/bin/python)")
    p.add_argument("--no-saelens", action="store_true")
    p.add_argument("--saelens-sparse-topk", action="store_true", help="SAELens TopK with use_sparse_activations=True")
    p.add_argument("--data-wait-steps", type=int, default=12, help="steps of the realistic store-fed run (0 skips it)")
    p.add_argument("--data-wait-variant", default="topk")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    p.add_argument("--json", type=Path, default=None, help="write every measurement here")
    p.add_argument("--keep", type=Path, default=None, help="keep data and worker logs in this folder")
    args = p.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    d_ins = [int(v) for v in args.d_in.split(",")]
    expansions = [int(v) for v in args.expansions.split(",")]
    if args.autocast == "tf32":
        import torch

        from train.precision import tf32_matrix_units
        has, units = tf32_matrix_units(torch.device(args.device))
        if not has:
            p.error(f"--autocast tf32 needs CUDA of compute capability >= 8.0; --device {args.device}: {units}")
    exe, why = saelens_python(args) if not args.compare_precision else (None, "--compare-precision")
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    tmp.mkdir(parents=True, exist_ok=True)
    cmdline = "python pipelines/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Training-step benchmark: batch {args.batch_size}, k {args.k}, {args.steps} measured steps after "
              f"{args.warmup} warm-up (medians), threads {args.threads or 'default'}, THP "
              f"{'on' if args.thp else 'off'}, malloc cache {'on' if args.malloc_cache else 'off'}, device "
              f"{args.device}, dead fraction forced {args.dead_fraction}, ours: autocast {args.autocast}, compile "
              f"{'on' if args.compile else 'off'}, deterministic {'off' if args.nondeterministic else 'on'}, "
              f"kernels {'sparse and dense' if args.compare_dense else 'dense' if args.dense else 'sparse'}"
              + (f", L0 set to {args.l0:g} of the width (vanilla, jumprelu)" if args.l0 else ""))
    print(header, flush=True)
    print("SAELens: " + (exe if exe else f"skipped: {why}"), flush=True)
    t_start = time.perf_counter()
    results = []
    try:
        data = {}
        for d in d_ins:
            data[d] = tmp / f"acts_{d}.npy"
            x = make_activations(args.distinct_batches * args.batch_size, d)
            np.save(data[d], x.reshape(args.distinct_batches, args.batch_size, d))
        if args.compare_precision:
            return _precision_report(args, cmdline, data, tmp, variants, d_ins, expansions, t_start)
        for d in d_ins:
            for e in expansions:
                for v, sparse in [(v, s) for v in variants for s in ((True, False) if args.compare_dense else (not args.dense,))]:
                    label = v if sparse or not args.compare_dense else f"{v} (dense)"
                    name = f"{v}_{d}_{e}x" + ("" if sparse or not args.compare_dense else "_dense")
                    spec = {"arch": v, "expansion": e, "k": args.k, "batch_size": args.batch_size, "steps": args.steps,
                            "warmup": args.warmup, "threads": args.threads, "device": args.device,
                            "dead_fraction": args.dead_fraction, "data": str(data[d]), "autocast": args.autocast,
                            "compile": args.compile, "deterministic": not args.nondeterministic, "sparse_kernels": sparse,
                            "l0_fraction": args.l0 if v in ("vanilla", "jumprelu") else 0.0}
                    ours = run_ours(args, "ours", spec, tmp, f"ours_{name}")
                    theirs = run_saelens(args, exe, data[d], v, e, tmp, f"saelens_{name}") if exe else why
                    results.append({"arch": v, "label": label, "d_in": d, "expansion": e, "ours": ours, "saelens": theirs})
                    row = build_rows(results[-1:])[0]
                    print(f"  {name}: L0 {_fmt(row.get('l0'), '.1f')}, ours {_fmt(row.get('ours_ms'), '.0f')} ms/step "
                          f"(fwd mm {_fmt(row.get('floor_ms'), '.0f')} ms, x{_fmt(row.get('step_floor'), '.2f')}; "
                          f"floor {_fmt(row.get('roof_ms'), '.1f')} ms, x{_fmt(row.get('step_roof'), '.2f')}), "
                          f"SAELens {_fmt(row.get('sl_ms'), '.0f')} ms/step, speedup {_fmt(row.get('speedup'), '.2f')}"
                          + (f"  [ours: {ours}]" if isinstance(ours, str) else "")
                          + (f"  [SAELens: {theirs}]" if exe and isinstance(theirs, str) else ""), flush=True)
        wait = None
        if args.data_wait_steps > 0:
            d = d_ins[-1]
            spec = {"arch": args.data_wait_variant, "expansion": expansions[0], "k": args.k, "d_in": d,
                    "batch_size": args.batch_size, "steps": args.data_wait_steps, "warmup": 2, "threads": args.threads,
                    "device": args.device, "rows_per_shard": 16384, "window_shards": 2,
                    "shards": max(2, -(-(args.data_wait_steps + 3) * args.batch_size // 16384))}
            wait = run_ours(args, "datawait", spec, tmp, "datawait")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = build_rows(results)
    lines = table_lines(rows)
    print()
    print_table(lines)
    mem_method = next((r["ours"]["mem_method"] for r in results if isinstance(r["ours"], dict)), "n/a")
    notes = [f"Command: `{cmdline}`", "",
             "Targets: speedup >= 2.0 (topk, batchtopk), >= 1.2 (vanilla, jumprelu); step/fwd mm <= 1.3 (topk, "
             "batchtopk), <= 2.5 (vanilla, jumprelu at L0 <= 2% of the width, sparse kernels); data wait < 5%. 'MISS' marks a missed target. speedup = our tokens/s over SAELens' "
             "(median steps); best: the fastest step of each side; /floor: each side's median step over its own "
             "process's dense forward matmul (cancels load drift between the two subprocesses). step/fwd mm: our "
             "median step over the median time of one dense [batch, d_in] x [d_in, width] product run after each "
             "step; best: fastest step over fastest product.",
             "GFLOP, MB: the step's matrix-product FLOPs and lower-bound memory traffic (pipelines/step_floor.py); "
             "GEMM GFLOP/s (in the step's precision) and GB/s (a 256 MiB tensor copy, read + write) measured in the "
             "same process after its steps; floor = max(FLOPs / GEMM rate, bytes / bandwidth), in parentheses the "
             "bound that sets it; step/floor = median step / floor.",
             f"mem ratio: peak step memory / (weights + Adam state + one batch); method: {mem_method} (SAELens in "
             "parentheses, same method and denominator)."]
    if not exe:
        notes.append(f"SAELens columns skipped: {why}.")
    if wait is not None:
        if isinstance(wait, dict):
            line = (f"Data wait ({wait['arch']}, d_in {wait['d_in']}, width {wait['d_sae']}, ActivationStore over a "
                    f"float16 cache of {wait['shards']} x {wait['rows_per_shard']} rows, window "
                    f"{wait['window_shards']} shards): {100 * wait['wait_fraction']:.2f}% of wall time in "
                    f"next_batch() over {len(wait['step_s'])} steps (max wait {1e3 * wait['max_wait_s']:.1f} ms)"
                    f"{_mark(wait['wait_fraction'], TARGET_WAIT, False)}.")
        else:
            line = f"Data wait run failed: {wait}"
        print(line)
        notes.append(line)
    notes.append(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.")
    print(notes[-1])
    if args.markdown:
        args.markdown.write_text(markdown(lines, header, notes))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "command": cmdline, "rows": rows, "raw": results,
                                         "data_wait": wait, "saelens": exe or why}, indent=1, default=str))
    return 0


def _precision_report(args, cmdline: str, data: dict, tmp: Path, variants, d_ins, expansions, t_start: float) -> int:
    """--compare-precision: the table, printed, and as Markdown / JSON when asked."""
    rows, lines, units = compare_precision(args, data, tmp, variants, d_ins, expansions)
    header = (f"Precision comparison (ours, autocast none vs tf32 vs bf16): batch {args.batch_size}, k {args.k}, {args.steps} "
              f"measured steps after {args.warmup} warm-up (medians), threads {args.threads or 'default'}, device "
              f"{args.device}: {units}")
    print()
    print(header)
    _print_rows(PRECISION_HEAD, lines)
    notes = [f"Command: `{cmdline}`", f"Total benchmark time: {time.perf_counter() - t_start:.0f} s."]
    print(notes[-1])
    if args.markdown:
        md = [header, "", "| " + " | ".join(PRECISION_HEAD) + " |", "|" + "---|" * len(PRECISION_HEAD)]
        args.markdown.write_text("\n".join(md + ["| " + " | ".join(l) + " |" for l in lines] + [""] + notes) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "command": cmdline, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
