"""Random-time kill -9 soak: harvest, training and a sweep are started as CLI processes on tiny
fixtures, killed with SIGKILL at random (seeded, bounded) moments, and restarted the way a user
would (the same `harvest run`; `train resume RUN` / `train resume SWEEP` once something is
committed, else the original command again) until they finish. The result must equal an
uninterrupted run: byte-identical cache files and a passing `harvest verify`, bit-identical final
SAE weights and the same metrics steps. After every kill, every committed shard and checkpoint
must pass its checksums, and no resume may ever meet (fall back from) a damaged checkpoint.

When to kill: each attempt is watched until it starts its real work (the harvest holds its writer
lock; training or a sweep writes into its output folder); it is then killed once its progress
(shards committed, steps logged) reaches a random target between where it is and the end, plus a
random part of one step, so kills spread over the whole job, its last phase (seal,
calibration, final checkpoint) included. One attempt in seven is killed during its start-up
instead. A job that finishes before all its kills were spent is checked, and a new job (a new
round, in a new folder) takes the rest.

CI: SAEFORGE_SOAK_KILLS=2 kills per command (default; about 10-20 s per command). The long soak:

    SAEFORGE_SOAK_KILLS=40 SAEFORGE_SOAK_SEED=$RANDOM python -m pytest -m soak tests/test_soak.py \
        -p no:cacheprovider --timeout 3600 -s

-s prints where each kill landed; a failure message names the seed and every attempt.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from harvest.runner import run_harvest
from shared.cache import Cache
from tests.helpers import HARVEST_CTX, cfg_for, final_weights, harvest_cli_args, harvest_config, write_sweep_spec
from train.checkpoints import list_checkpoints, read_checkpoint
from train.sweep import run_sweep
from train.training import train_sae

KILLS = int(os.environ.get("SAEFORGE_SOAK_KILLS", "2"))
SEED = int(os.environ.get("SAEFORGE_SOAK_SEED", "0"))
ATTEMPT_TIMEOUT = 300  # seconds for one uninterrupted attempt
EARLY = 1 / 7  # chance that an attempt is killed during its start-up

pytestmark = pytest.mark.soak


@dataclass
class Job:
    """One job to soak, in its own folder.

    started(pid, t0_wall): the process has begun its real work (after imports and loading).
    progress(): fraction of the work committed or logged so far, in [0, 1], in steps of 1 / units.
    next_command(): the command a user would run now (python arguments), None when finished.
    after_kill(): checks the on-disk invariants after a kill.
    check_result(): compares the finished job with the uninterrupted reference.
    """

    started: Callable[[int, float], bool]
    progress: Callable[[], float]
    units: int
    next_command: Callable[[], list[str] | None]
    after_kill: Callable[[], None]
    check_result: Callable[[], None]


class Soak:
    def __init__(self, name: str, tmp: Path, unit_seconds: float, make_job: Callable[[Path], Job]):
        self.rng = random.Random(f"{SEED}-{name}")
        self.name, self.tmp, self.unit, self.make_job = name, tmp, max(unit_seconds, 0.02), make_job
        self.startup: float | None = None
        self.history: list[str] = []

    def context(self) -> str:
        return (f"soak {self.name} seed={SEED} kills={KILLS} step={self.unit:.2f}s start-up={self.startup or 0:.2f}s: "
                + " | ".join(self.history))

    def run(self) -> None:
        kills = 0
        for round_ in range(KILLS + 3):
            self.history.append(f"[round {round_}]")
            job = self.make_job(self.tmp / f"round-{round_}")
            kills += self._round(job, KILLS - kills, self.tmp / f"round-{round_}-logs")
            job.check_result()
            if kills >= KILLS:
                return
        raise AssertionError(self.context() + f": only {kills} of {KILLS} kills landed")

    def _round(self, job: Job, budget: int, logs: Path) -> int:
        logs.mkdir(parents=True)
        kills = 0
        for attempt in range(budget + 10):
            cmd = job.next_command()
            if cmd is None:
                self._check_logs(logs)
                return kills
            log = logs / f"attempt-{attempt}.log"
            label = " ".join(cmd[2:4])
            with open(log, "w") as out:
                t0_wall = time.time()
                proc = subprocess.Popen([sys.executable, *cmd], stdout=out, stderr=out, env=_env())
                t0 = time.monotonic()
                if kills >= budget:
                    rc = proc.wait(timeout=ATTEMPT_TIMEOUT)
                    self.history.append(f"{label}: ran to the end (rc {rc})")
                    assert rc == 0, self.context() + "\n" + log.read_text()[-3000:]
                    continue
                if self.startup is not None and self.rng.random() < EARLY:
                    when = self.rng.uniform(0.5, 1.0) * self.startup
                    phase = "in start-up"
                else:
                    self._poll(proc, t0, lambda: job.started(proc.pid, t0_wall))
                    self.startup = time.monotonic() - t0
                    target = self.rng.uniform(_safe(job.progress), 1.0)
                    self._poll_pace(proc, t0, job, target)
                    when = time.monotonic() - t0 + self.rng.uniform(0, self.unit)
                    phase = f"at progress {target:.2f} +"
                try:
                    rc = proc.wait(timeout=max(0.0, when - (time.monotonic() - t0)))
                    self.history.append(f"{label}: finished before its kill at {when:.2f}s (rc {rc})")
                    assert rc == 0, self.context() + "\n" + log.read_text()[-3000:]
                except subprocess.TimeoutExpired:
                    proc.kill()  # SIGKILL
                    proc.wait()
                    kills += 1
                    late = " (the job had already finished)" if job.next_command() is None else ""
                    self.history.append(f"{label}: killed {phase} {when:.2f}s{late}")
                    job.after_kill()
        raise AssertionError(self.context() + ": did not finish")

    def _poll_pace(self, proc: subprocess.Popen, t0: float, job: Job, target: float) -> None:
        """Poll until progress reaches target, measuring this machine's pace (seconds per step)
        between the first and the last step seen."""
        first = None
        while proc.poll() is None and time.monotonic() - t0 < ATTEMPT_TIMEOUT:
            p, now = _safe(job.progress), time.monotonic()
            if first is None or p < first[0]:
                first = (p, now)
            elif p > first[0] + 1.5 / job.units:
                self.unit = (now - first[1]) / ((p - first[0]) * job.units)
            if p >= target:
                return
            time.sleep(0.005)

    @staticmethod
    def _poll(proc: subprocess.Popen, t0: float, done: Callable[[], bool]) -> None:
        while proc.poll() is None and time.monotonic() - t0 < ATTEMPT_TIMEOUT and not done():
            time.sleep(0.01)

    def _check_logs(self, logs: Path) -> None:
        for log in sorted(logs.iterdir()):
            text = log.read_text()
            assert "falling back" not in text and "Traceback" not in text, self.context() + "\n" + text[-3000:]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SAEFORGE_FAULT", None)
    return env


def _safe(progress: Callable[[], float]) -> float:
    try:
        return progress()
    except (OSError, ValueError, KeyError):  # a file being replaced or half-written right now
        return 0.0


def holds_file(path: Path) -> Callable[[int, float], bool]:
    """started(): the process has `path` open (the harvest's writer lock: it is writing shards)."""
    target = os.path.realpath(path)

    def check(pid: int, t0_wall: float) -> bool:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
        return False

    return check


def wrote_under(folder: Path) -> Callable[[int, float], bool]:
    """started(): some file or folder under `folder` was created or changed since the attempt began."""

    def check(pid: int, t0_wall: float) -> bool:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                try:
                    if os.stat(os.path.join(dirpath, name)).st_mtime >= t0_wall:
                        return True
                except OSError:
                    continue
        return False

    return check


def logged_step(run_dir: Path) -> int:
    """The last step in a run's metrics.jsonl (0 if none yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


# --------------------------------------------------------------------------- harvest


def _cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


HARVEST_SHARDS = 20  # 100 contexts of HARVEST_CTX tokens, 5 per shard: room for kills between commits


def test_harvest_survives_random_kills(tmp_path, tiny_llama_dir, tiny_corpus):
    ref = tmp_path / "ref"
    sizes = dict(tokens=HARVEST_CTX * 5 * HARVEST_SHARDS, shard_tokens=HARVEST_CTX * 5)
    t0 = time.monotonic()
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], ref, **sizes), progress=False)
    unit = (time.monotonic() - t0) / HARVEST_SHARDS
    reference = _cache_files(ref)

    def make_job(out: Path) -> Job:
        cmd = ["-m", "harvest", *harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], out,
                                                  "--tokens", str(sizes["tokens"]),
                                                  "--shard-tokens", str(sizes["shard_tokens"]))]

        def after_kill():
            if not (out / "zarr.json").exists():
                return
            cache = Cache.open(out, allow_unsealed=True)
            problems = [p for p in cache.verify() if not p.endswith("missing (no ledger record)")]
            assert problems == [], soak.context()  # every committed shard is whole
            assert not cache.sealed or cache.verify() == [], soak.context()

        def check_result():
            assert _cache_files(out) == reference, soak.context()
            r = CliRunner().invoke(harvest_cli, ["verify", str(out)])
            assert r.exit_code == 0 and f"ok: {HARVEST_SHARDS} shards verified" in r.output, r.output

        return Job(started=holds_file(out / ".writer-rank0.lock"), units=HARVEST_SHARDS,
                   progress=lambda: len(list((out / "ledger").glob("shard-*.json"))) / HARVEST_SHARDS,
                   next_command=lambda: None if (out / "seal.json").exists() else cmd,
                   after_kill=after_kill, check_result=check_result)

    soak = Soak("harvest", tmp_path, unit, make_job)
    soak.run()
    print(soak.context())  # where the kills landed (shown with -s)


# --------------------------------------------------------------------------- training


def _assert_same(a: dict, b: dict, context: str) -> None:
    assert a.keys() == b.keys(), context
    for k in a:
        assert torch.equal(a[k], b[k]), f"{context}: {k} differs"


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_committed_checkpoints(run_dir: Path) -> None:
    for ckpt in list_checkpoints(run_dir):
        read_checkpoint(ckpt)  # raises CheckpointError on a half-written or damaged one


STEPS = 200  # steps of 256 tokens, logged every 5 (40 progress steps), a checkpoint every 25
TRAIN = dict(arch="batchtopk", tokens=256 * STEPS, checkpoint_every=256 * 25)


def test_training_survives_random_kills(sparse_cache, tmp_path):
    t0 = time.monotonic()
    _, ref = train_sae(None, cfg_for(sparse_cache, tmp_path / "ref", **TRAIN), progress=False)
    unit = (time.monotonic() - t0) / (STEPS // 5)

    def make_job(out: Path) -> Job:
        fresh = ["-m", "train", "run", "--store", str(sparse_cache), "--out", str(out), "--quiet", "--arch", "batchtopk",
                 "--k", "4", "--expansion", "4", "--batch-size", "256", "--tokens", str(TRAIN["tokens"]),
                 "--checkpoint-every", str(TRAIN["checkpoint_every"]), "--lr", "3e-3", "--wandb-mode", "disabled",
                 "--set", "log_every=5", "--set", "density_every=10", "--set", "dead_tokens_threshold=2048",
                 "--set", "threshold_batches=4", "--set", "b_dec_init=mean"]

        def run_dirs() -> list[Path]:
            return sorted(out.iterdir()) if out.is_dir() else []

        def next_command():
            if any((d / "done.json").exists() for d in run_dirs()):
                return None
            resumable = [d for d in run_dirs() if (d / "config.json").exists() and list_checkpoints(d)]
            assert len(resumable) <= 1, soak.context()
            # nothing committed yet: `train resume` would say "start the run again with `train run`"
            return ["-m", "train", "resume", str(resumable[0]), "--quiet"] if resumable else fresh

        def after_kill():
            for d in run_dirs():
                _check_committed_checkpoints(d)

        def check_result():
            (done,) = [d for d in run_dirs() if (d / "done.json").exists()]
            _assert_same(final_weights(done), final_weights(ref), soak.context())
            assert _steps(done) == _steps(ref), soak.context()

        return Job(started=wrote_under(out), units=STEPS // 5,
                   progress=lambda: max((logged_step(d) for d in run_dirs()), default=0) / STEPS,
                   next_command=next_command, after_kill=after_kill, check_result=check_result)

    soak = Soak("train", tmp_path, unit, make_job)
    soak.run()
    print(soak.context())


# --------------------------------------------------------------------------- sweep


# The sweeps to soak: the first variants, and the newer ones (Matryoshka with k annealing over the
# first half, Gated, JumpReLU with a target L0 and thresholds set from the first batch) in one sweep.
SWEEP_GRIDS = {
    "topk_batchtopk": ('arch = ["topk", "batchtopk"]\nk = [4]', {}),
    "newer": ('arch = ["matryoshka", "gated", "jumprelu"]\nk = [4]',
              {"k": 4, "k_anneal_tokens": 256 * STEPS // 2, "k_anneal_start": 12, "l1_coeff": 0.5, "l0_coeff": 0.05,
               "target_l0": 4}),
}


def sweep_spec(path: Path, store: Path, out: Path, grid: str = "topk_batchtopk") -> Path:
    text, extra = SWEEP_GRIDS[grid]
    return write_sweep_spec(path, store, out, text, name="soak", tokens=256 * STEPS, checkpoint_every=256 * 25,
                            **extra)


@pytest.mark.parametrize("grid", list(SWEEP_GRIDS))
def test_sweep_survives_random_kills(sparse_cache, tmp_path, grid):
    t0 = time.monotonic()
    ref = run_sweep(sweep_spec(tmp_path / "ref.toml", sparse_cache, tmp_path / "ref", grid), progress=False)
    unit = (time.monotonic() - t0) / (STEPS // 5)

    def members(sweep: Path) -> list[Path]:
        return [sweep / r["run_dir"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]]

    def make_job(out: Path) -> Job:
        out.mkdir()
        spec = sweep_spec(out.with_suffix(".toml"), sparse_cache, out, grid)

        def sweeps() -> list[Path]:
            return [d for d in sorted(out.iterdir()) if (d / "sweep.json").exists()]

        def next_command():
            found = sweeps()
            assert len(found) <= 1, soak.context()
            if not found:  # killed before sweep.json: that folder is not resumable, start again
                return ["-m", "train", "sweep", str(spec), "--quiet"]
            if all((m / "done.json").exists() for m in members(found[0])):
                return None
            return ["-m", "train", "resume", str(found[0]), "--quiet"]

        def progress():
            found = sweeps()
            return min(logged_step(m) for m in members(found[0])) / STEPS if found else 0.0

        def after_kill():
            for s in sweeps():
                for m in members(s):
                    _check_committed_checkpoints(m)

        def check_result():
            (done,) = sweeps()
            for a, b in zip(members(ref), members(done), strict=True):
                assert a.name == b.name, soak.context()
                _assert_same(final_weights(b), final_weights(a), soak.context() + f" ({b.name})")
                assert _steps(b) == _steps(a), soak.context() + f" ({b.name})"

        return Job(started=wrote_under(out), units=STEPS // 5, progress=progress, next_command=next_command,
                   after_kill=after_kill, check_result=check_result)

    soak = Soak("sweep" if grid == "topk_batchtopk" else f"sweep-{grid}", tmp_path, unit, make_job)
    soak.run()
    print(soak.context())
