"""Run logging: a local metrics.jsonl in the run folder (train.layout), mirrored to wandb when enabled.

wandb never crashes a run: mode "online" without an API key falls back to "offline", and a wandb
failure at start-up downgrades to local logging with a warning. wandb writes its files into the run
folder but prints nothing unless WANDB_SILENT=false asks for its console output (start_wandb).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from train.layout import RunLayout


def resolve_wandb_mode(mode: str) -> str:
    """online -> offline when no API key is configured (env or ~/.netrc)."""
    if mode != "online":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


FINAL = "final/"  # prefix of the after-training results record (train.training.finish_run)


class RunLogger:
    """Appends one JSON object per logged step to `run_dir/metrics.jsonl` and to wandb.

    On resume, records after the resumed step are dropped first, and so is a record of final
    results (a run killed after logging them but before done.json finishes again and logs them
    again), so the file always describes one uninterrupted run.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], mode: str, project: str,
                 group: str | None = None, resume_step: int | None = None):
        self.path = RunLayout(run_dir).metrics
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self.wandb = None
        mode = resolve_wandb_mode(os.environ.get("WANDB_MODE", mode) if mode != "disabled" else mode)
        if mode != "disabled":
            try:
                self.wandb = start_wandb(run_dir, config, mode, project, group)
            except Exception as e:  # noqa: BLE001 - logging must not kill training
                warnings.warn(f"wandb could not start ({e}); logging to {self.path} only")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _kept(line, step)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            import wandb

            payload = {k: (wandb.Histogram(np_histogram=(v["counts"], v["edges"])) if isinstance(v, dict) and "edges" in v else v)
                       for k, v in record.items() if k != "step"}
            self.wandb.log(payload, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"heldout": {"l0": 4}} -> {"heldout/l0": 4}: nested results as flat metric names."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _kept(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line survives a resume at `step` (a line cut short by a kill does not)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return record.get("step", 0) <= step and not any(k.startswith(FINAL) for k in record)


def start_wandb(run_dir: Path, config: dict[str, Any], mode: str, project: str, group: str | None):
    """The wandb run of a run folder (training and `train eval` log to the same one: its id is the
    folder's). Its files go into the run folder as usual; its console output (banners, the history
    and summary printed at the end) is off unless WANDB_SILENT=false asks for it."""
    import wandb

    asked = os.environ.get("WANDB_SILENT")
    os.environ["WANDB_SILENT"] = asked or "true"  # read by wandb.init into the run's settings
    try:
        # create_new: a sweep holds one wandb run per SAE at once ("finish_previous" ended the first
        # SAE's run when the second started, and its next log raised UsageError)
        return wandb.init(project=project, group=group, name=config.get("run_name"), config=config, mode=mode,
                          dir=str(run_dir), id=_wandb_id(run_dir), resume="allow", reinit="create_new")
    finally:
        if asked is None:
            del os.environ["WANDB_SILENT"]


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def density_histogram(fire_counts: torch.Tensor, tokens: int, bins: int = 30) -> dict[str, Any]:
    """Histogram of log10 feature density over `tokens`; dead latents land in the lowest bin.

    fire_counts: [m] number of tokens on which each latent fired.
    """
    density = fire_counts.double().cpu() / max(tokens, 1)
    log_d = torch.log10(density.clamp_min(1e-10))
    counts, edges = torch.histogram(log_d, bins=bins, range=(-10.0, 0.0))
    return {
        "counts": counts.long().tolist(),
        "edges": edges.tolist(),
        "below_1e-5": int((density < 1e-5).sum()),
        "below_1e-6": int((density < 1e-6).sum()),
    }
