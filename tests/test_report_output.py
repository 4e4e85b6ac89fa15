"""Output a researcher looks at (issue 18): `train report`'s figures (held-out points, no panel
without information, readable ticks, sweep labels by what varies, the frontier), the eval table's
meanings, the export's model-name warning, wandb's silence, and the quickstart, which runs the
commands a user types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from click.testing import CliRunner

from tests.helpers import HARVEST_CTX, REPO, cfg_for, write_sweep_spec
from train.cli import main as train_cli
from train.evaluation import evaluate_checkpoint, format_table
from train.report import read_run, varied_keys, write_report
from train.report_plots import _wrap, log_ticks, plot_run, tokens_label
from train.sweep import run_sweep
from train.training import train_sae


def test_axes_read_as_numbers_people_write():
    assert log_ticks(16, 64, powers_of_two=True) == [16, 32, 64]
    assert log_ticks(16, 32, powers_of_two=True) == [16, 32]
    assert log_ticks(45, 180) == [50, 100]
    assert log_ticks(0.2, 0.9) == [0.2, 0.5]
    assert log_ticks(8.64028, 9.58723) == [8.5, 9.0, 9.5]  # a narrow loss range: round steps, not its end values
    assert log_ticks(0.0101, 0.0109) == [0.01, 0.0102, 0.0104, 0.0106, 0.0108, 0.011]
    note = "CE-loss figures need `train eval SWEEP/RUN` (it writes eval.json); then run `train report` again."
    assert all(line.count("`") % 2 == 0 for line in _wrap(note, 60))  # a command is never cut in two
    assert [tokens_label(v) for v in (0, 500, 100_000, 1_000_000, 1_500_000, 2e9)] == ["0", "500", "100k", "1M", "1.5M",
                                                                                       "2G"]


@pytest.fixture(scope="module")
def short_topk_run(sparse_cache, tmp_path_factory):
    """A TopK run shorter than density_every (no density logged on the way) with held-out
    evaluations every 1024 tokens."""
    cfg = cfg_for(sparse_cache, tmp_path_factory.mktemp("short"), arch="topk", tokens=256 * 12, density_every=500,
                  eval_every=1024, eval_batches=2, checkpoint_every=10**6)
    return train_sae(None, cfg, progress=False)[1]


def test_a_short_topk_run_report_draws_what_carries_information(short_topk_run, tmp_path):
    data = read_run(short_topk_run)
    assert [t for t, _ in data.heldout["explained_variance"]] == [1024, 2048, 3072]  # eval_every, then the end
    assert data.density is not None and "training batches" in data.density[1]  # logged at the end of training
    drawn = plot_run(data, tmp_path / "r.png")
    assert drawn[0] == "training loss" and "held-out" in drawn[1]
    assert not any(title.startswith("L0") for title in drawn)  # TopK: L0 = k throughout, said in the title
    assert drawn[-1].startswith("feature density")
    md = write_report(short_topk_run).read_text()
    caption = md.splitlines()[2]
    assert "feature density" in caption and "L0" not in caption
    assert "`explained_variance`" in md and "higher is better" in md
    assert f"`train eval {short_topk_run}`" in md  # the CE figures need it first
    img = mpimg.imread(short_topk_run / "report.png")
    assert img.shape[1] > 3 * img.shape[0] / 2 and img.std() > 0.01


def test_a_loss_logged_once_is_said_not_drawn(short_topk_run, tmp_path, monkeypatch):
    """A run of under 2 x log_every steps logs its loss once: a panel would hold one dot."""
    from matplotlib.figure import Figure

    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, png, **kw: (drawn.append(fig), save(fig, png, **kw))[1])
    data = read_run(short_topk_run)
    data.train["loss"] = data.train["loss"][:1]
    titles = plot_run(data, tmp_path / "r.png")
    assert "training loss" not in titles and titles[0].startswith("explained variance")
    suptitle = drawn[0]._suptitle.get_text()
    assert f"training loss {data.train['loss'][0][1]:.4g} at" in suptitle and "(logged once)" in suptitle
    ev = drawn[0].axes[0]
    assert ev.get_xlim()[0] == 0 and ev.lines[0].get_marker() == "."  # few points: marked, from token 0


def test_the_density_panel_labels_the_latents_that_never_fired():
    import matplotlib.pyplot as plt

    from train.report_plots import _density

    edges = [-10 + i / 3 for i in range(31)]
    counts = [11] + [0] * 20 + [5, 40, 300, 900, 1500, 800, 100, 2, 0]
    fig, ax = plt.subplots()
    _density(ax, {"edges": edges, "counts": counts, "below_1e-5": 11}, "held-out")
    assert [t.get_text() for t in ax.texts] == ["11 never\nfired"]
    assert ax.get_legend().get_texts()[0].get_text() == "11 latents below 1e-5"
    plt.close(fig)


def test_the_report_uses_train_evals_held_out_density_and_scores(short_topk_run, tmp_path):
    run = tmp_path / short_topk_run.name
    import shutil

    shutil.copytree(short_topk_run, run)
    evaluate_checkpoint(run, skip_lm=True, batches=2)
    data = read_run(run)
    assert data.density[1].startswith("held-out, `train eval`") and data.evaluation["explained_variance"]
    md = write_report(run).read_text()
    assert "`dead_fraction`" in md


def test_a_sweep_report_labels_by_what_varies_and_joins_the_frontier(sparse_cache, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn, save = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, png, **kw: (drawn.__setitem__(Path(png).name, fig),
                                                                   save(fig, png, **kw))[1])
    spec = write_sweep_spec(tmp_path / "s.toml", sparse_cache, tmp_path / "runs", 'arch = ["topk", "batchtopk"]\nk = [2, 4]',
                            tokens=2560, checkpoint_every=10**6)
    sweep = run_sweep(spec, progress=False)
    configs = [r["config"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]]
    assert varied_keys(configs) == ["arch", "k"]
    r = CliRunner().invoke(train_cli, ["report", str(sweep)])
    assert r.exit_code == 0, r.output
    md = (sweep / "report.md").read_text()
    assert "| SAE | arch | k | explained_variance |" in md and "Not evaluated yet: 4 of 4 SAEs" in md
    assert "train eval" in md
    for png in ("curves.png", "frontier.png"):
        img = mpimg.imread(sweep / png)
        assert img.shape[0] > 300 and img.std() > 0.01
    from train.report import describe

    assert [describe(c, ["arch", "k"]) for c in configs] == ["topk k=2", "topk k=4", "batchtopk k=2", "batchtopk k=4"]
    frontier = drawn["frontier.png"].axes[0]  # one line per arch, its points joined along k and labelled
    assert sorted(line.get_label() for line in frontier.lines) == ["batchtopk", "topk"]
    assert all(len(line.get_xdata()) == 2 and list(line.get_xdata()) == sorted(line.get_xdata())
               for line in frontier.lines)
    assert sorted(t.get_text() for t in frontier.texts) == ["k=2", "k=2", "k=4", "k=4"]
    assert any("`train eval" in t.get_text() for t in drawn["frontier.png"].texts)  # the CE panel needs it
    curves = drawn["curves.png"]
    assert [t.get_text() for t in curves.legends[0].get_texts()] == ["topk k=2", "topk k=4", "batchtopk k=2",
                                                                      "batchtopk k=4"]


def test_the_eval_table_says_what_each_figure_means(reference_run, tmp_path):
    res, _ = evaluate_checkpoint(reference_run, skip_lm=True, batches=1, out=tmp_path / "e.json")
    table = format_table(res)
    for title, meaning in [("explained variance", "higher is better, 1 = perfect"), ("L0", "active latents per token"),
                           ("dead latents", "lower is better"), ("cosine similarity", "higher is better")]:
        line = next(line for line in table.splitlines() if line.strip().startswith(title))
        assert meaning in line, line


def test_export_warns_when_the_model_name_would_be_a_local_path(reference_cache, tmp_path):
    cfg = cfg_for(reference_cache, tmp_path / "runs", arch="topk", tokens=256 * 2, batch_size=64,
                  checkpoint_every=10**6)
    _, run_dir = train_sae(None, cfg, progress=False)
    from train.export import export_checkpoint

    with pytest.warns(UserWarning, match="metadata.model_name will be the local path .* pass --model-name"):
        export_checkpoint(run_dir, tmp_path / "e1")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_checkpoint(run_dir, tmp_path / "e2", model_name="org/model")
    assert json.loads((out / "cfg.json").read_text())["metadata"]["model_name"] == "org/model"


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("SAEFORGE_FAULT", None)
    return env


def test_wandb_offline_writes_its_files_and_prints_nothing(sparse_cache, tmp_path):
    pytest.importorskip("wandb")
    env = _env(WANDB_MODE="offline", HOME=str(tmp_path))
    env.pop("WANDB_SILENT", None)
    r = subprocess.run([sys.executable, "-m", "train", "run", "--store", str(sparse_cache), "--out", str(tmp_path),
                        "--quiet", "--tokens", "1280", "--batch-size", "256", "--expansion", "2", "--k", "2",
                        "--wandb-mode", "offline"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wandb:" not in r.stdout + r.stderr, r.stderr
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    assert list(run_dir.glob("wandb/offline-run-*"))


def test_a_sweep_logs_every_sae_to_wandb_offline(sparse_cache, tmp_path):
    """Each SAE of a sweep has its own wandb run at once (the README's spec sets wandb_mode =
    "offline"; the second SAE's run used to finish the first's, whose next log raised UsageError)."""
    pytest.importorskip("wandb")
    spec = write_sweep_spec(tmp_path / "s.toml", sparse_cache, tmp_path / "runs", "k = [2, 4]", tokens=2560,
                            checkpoint_every=10**6, wandb_mode="offline", log_every=1)
    env = _env(WANDB_MODE="offline", HOME=str(tmp_path))
    env.pop("WANDB_SILENT", None)
    r = subprocess.run([sys.executable, "-m", "train", "sweep", str(spec), "--quiet"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wandb:" not in r.stdout + r.stderr, r.stderr
    sweep_dir = Path(r.stdout.strip().splitlines()[-1])
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    assert len(runs) == 2
    for rec in runs:
        assert len(list((sweep_dir / rec["run_dir"]).glob("wandb/offline-run-*"))) == 1, rec["run_dir"]


def test_the_quickstart_runs_the_commands_a_user_types(tiny_llama_dir, tiny_corpus, tmp_path):
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "pipelines.quickstart", "--out", str(out), "--model", str(tiny_llama_dir),
                        "--dataset", str(tiny_corpus["jsonl"]), "--layer", "1", "--tokens", str(HARVEST_CTX * 8),
                        "--shard-tokens", str(HARVEST_CTX * 4), "--context-length", str(HARVEST_CTX),
                        "--train-tokens", "8192", "--k", "4", "--max-contexts", "2"],
                       cwd=REPO, capture_output=True, text=True, env=_env(WANDB_MODE="disabled"), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    printed = [line[2:] for line in r.stdout.splitlines() if line.startswith("$ ")]
    assert [" ".join(c.split()[:2]) for c in printed] == ["harvest run", "train run", "train eval", "train export",
                                                         "train report"]
    assert f"--model {tiny_llama_dir} --dataset {tiny_corpus['jsonl']} --layer 1" in printed[0]
    assert printed[1].startswith(f"train run --store {out / 'acts'} --arch topk --k 4")
    assert "harvested 128 tokens in 2 of 2 planned shards (sealed)" in r.stderr
    assert "done" in r.stdout.splitlines() and (out / "acts" / "seal.json").exists()
    assert list(out.glob("runs/*/report.png")) and list(out.glob("runs/*/eval.json"))
