"""What a new user hits (issue 18), beyond the one-line refusals of test_cli_errors.py: the README's
own commands, results that looked fine and were not (an empty tokenizer, a corpus shorter than the
budget, contexts beyond the model's positions, a diverging learning rate), advice that must work
end to end (repairing a garbage seal, a full disk before the first checkpoint, an unfinished
harvest), and messages that must be one line (warnings, finished runs)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from shared.cli_common import COUNT
from tests.helpers import HARVEST_CTX, MAX_POS, REPO, SWEEP_BASE, cfg_for, final_weights, harvest_cli_args
from train.checkpoints import list_checkpoints
from train.cli import main as train_cli
from train.config import field_names, get_default_cfg, key_facts, load_toml, parse_set, sweep_shared_keys, update_cfg
from train.sweep import expand_spec
from train.training import train_sae


def invoke(cli, args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
    assert not crashed, f"{args} raised {r.exception!r}"
    assert "Traceback" not in r.output, r.output
    return r


def refused(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output)
    for needle in needles:
        assert needle in r.output, f"{needle!r} not in:\n{r.output}"


def env(**extra) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra}
    e.pop("SAEFORGE_FAULT", None)
    return e



def tiny_train(store, out, *extra):
    return ["run", "--store", store, "--out", out, "--quiet", "--wandb-mode", "disabled", "--tokens", "2560",
            "--batch-size", "256", "--expansion", "4", "--k", "4", "--checkpoint-every", "1280", *extra]


# --------------------------------------------------------------------------- the README's own commands

PAIRS = {"site": ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"), "micro_batch_size": (2048, 1024),
         "d_in": (256, 512), "dict_size": (2048, 4096), "aux_k": (4, 8), "wandb_group": ("a", "b"),
         "run_name": ("a", "b"), "store": ("/spec/acts", "/cli/acts"), "out": ("spec_runs", "cli_runs"),
         "device": ("auto", "cpu"), "k": (32, 16), "lr_decay_start": (0.8, 0.5), "beta1": (0.9, 0.8),
         "beta2": (0.999, 0.99), "k_anneal_start": (128, 64), "target_l0": (32.0, 16.0),
         "jumprelu_init_l0": (32.0, 16.0), "memory_limit_gib": (8.0, 4.0), "in_site": ("mlp_in", "resid_mid"),
         "out_site": ("mlp_out", "resid_mid"), "mask_token_ids": ("default", "0,7"),
         "mask_norm_multiple": (4.0, 8.0), "mask_norm_threshold": (30.0, 60.0)}
TRANSCODER_KEYS = ("in_site", "out_site", "sparsity")  # keys only a transcoder takes: the spec's arch is one


def spec_and_cli_values(key: str):
    """A value for the spec's [base] and a different one for the command line, both valid."""
    if key in PAIRS:
        return PAIRS[key]
    facts, default = key_facts(key), getattr(get_default_cfg(), key)
    if facts.choices is not None:
        return default, next(c for c in facts.choices if c != default)
    if facts.type is bool:
        return default, not default
    if facts.type is int:
        return default, default + (1000 if facts.count else 1)
    if facts.type is float:
        return default, default * 0.5
    return default, "x"


@pytest.mark.parametrize("key", field_names())
def test_the_sweep_command_line_overrides_every_key_of_the_spec(key):
    """`train sweep SPEC --store/--out/--set KEY=...` where [base] sets KEY too: the command line wins
    (it crashed with `update_cfg() got multiple values for keyword argument`)."""
    in_spec, on_cli = spec_and_cli_values(key)
    arch = {"arch": "transcoder"} if key in TRANSCODER_KEYS else {}
    overrides = parse_set([f"{key}={on_cli}"])  # --set gives strings, as --store and --out do
    configs = expand_spec({"base": {key: in_spec, **arch}, "grid": {"l1_coeff": [1.0, 2.0]} if key != "l1_coeff" else {}},
                          overrides)
    assert all(getattr(c, key) == update_cfg(get_default_cfg(), **arch, **{key: on_cli}).__getattribute__(key)
               for c in configs)


def test_a_command_line_key_fixes_what_the_grid_varies():
    spec = {"base": {"k": 8}, "grid": {"arch": ["topk", "batchtopk"], "k": [16, 32]}}
    configs = expand_spec(spec, {"k": "4"})
    assert [(c.arch, c.k) for c in configs] == [("topk", 4), ("batchtopk", 4)]


def test_the_readme_sweep_command_runs_with_store_and_out_overriding_the_spec(sparse_cache, tmp_path):
    spec = tmp_path / "spec.toml"
    base = {**SWEEP_BASE, "tokens": "2560", "checkpoint_every": "1280"}
    spec.write_text('name = "readme"\n[base]\nstore = "quickstart_out/acts"\nout = "quickstart_out/sweeps"\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in base.items()) + "[grid]\nk = [2, 4]\n")
    r = invoke(train_cli, ["sweep", spec, "--store", sparse_cache, "--out", tmp_path / "sweeps", "--quiet",
                           "--set", "eval_every=1k", "--set", "tokens=2.56k"])
    assert r.exit_code == 0, r.output
    sweep_dir = Path(r.output.strip().splitlines()[-1])
    assert sweep_dir.parent == tmp_path / "sweeps"
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    assert [rec["config"]["k"] for rec in runs] == [2, 4]
    assert all(rec["config"]["store"] == str(sparse_cache) and rec["config"]["eval_every"] == 1000
               and rec["config"]["tokens"] == 2560 for rec in runs)


COUNT_KEYS = [k for k in field_names() if key_facts(k).count]


def test_the_token_count_keys_are_the_ones_that_count_tokens():
    assert set(COUNT_KEYS) == {"batch_size", "micro_batch_size", "tokens", "dead_tokens_threshold", "lr_warmup_tokens",
                               "sparsity_warmup_tokens", "eval_every", "checkpoint_every",
                               "jumprelu_pre_act_silent_tokens"}


@pytest.mark.parametrize("key", COUNT_KEYS)
def test_every_token_count_key_takes_the_same_spellings_everywhere(key, tmp_path):
    """A flag, --set and a TOML file (a config or a sweep spec) read 20k / 2.5M / 1e6 alike."""
    extra = {"batch_size": 320_000_000} if key == "micro_batch_size" else {}  # divisible by every value below
    for text, n in [("20k", 20_000), ("2.5M", 2_500_000), ("1e6", 10**6), ("4096", 4096), ("1_024", 1024)]:
        assert getattr(update_cfg(get_default_cfg(), **extra, **{key: text}), key) == n, (key, text)  # --set
        toml = tmp_path / "c.toml"
        toml.write_text(f'{key} = "{text}"\n' + "".join(f"{k} = {v}\n" for k, v in extra.items()))
        assert getattr(update_cfg(get_default_cfg(), **load_toml(toml)), key) == n, (key, text)  # --config
        assert getattr(expand_spec({"base": load_toml(toml), "grid": {"k": [4]}})[0], key) == n  # a sweep spec
    assert getattr(update_cfg(get_default_cfg(), **extra, **{key: 1e6}), key) == 10**6  # TOML's float 1e6
    options = {p.name: p for p in train_cli.commands["run"].params}
    if key in options:  # a `train run` flag takes the same spellings
        assert options[key].type is COUNT and options[key].type.convert("2.5M", None, None) == 2_500_000


def test_set_eval_every_1M_as_the_readme_writes_it(sparse_cache, tmp_path):
    assert "--set eval_every=1M" in (REPO / "README.md").read_text()
    r = invoke(train_cli, tiny_train(sparse_cache, tmp_path, "--set", "eval_every=1k"))
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1])
    assert json.loads((run_dir / "config.json").read_text())["eval_every"] == 1000
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/l0" in line]
    assert len(evals) == 2  # at 1024 and 2048 tokens
    assert update_cfg(get_default_cfg(), eval_every="1M").eval_every == 10**6


def test_the_sweep_spec_format_is_in_the_help_and_the_readme():
    help_text = CliRunner().invoke(train_cli, ["sweep", "--help"], terminal_width=200).output
    readme = (REPO / "README.md").read_text()
    for text in (help_text, readme):
        for needle in ("[base]", "[grid]", "name = ", "--set", "devices", "distribute"):
            assert needle in text, needle
        for key in sweep_shared_keys():  # what a grid may not vary, by name
            assert key in text, key


def test_the_readme_makes_a_virtual_environment_before_the_quickstart():
    readme = (REPO / "README.md").read_text()
    setup = readme[readme.index("## Set up"):]
    assert "python3 -m venv .venv && source .venv/bin/activate" in setup
    assert setup.index("python3 -m venv") < setup.index("bash pipelines/quickstart.sh")


def test_the_readmes_sweep_spec_file_reads_as_written():
    from train.sweep import load_spec

    configs = expand_spec(load_spec(REPO / "pipelines/sweeps/smollm2_k.toml"))
    assert {c.tokens for c in configs} == {10**6} and len(configs) > 1


def test_train_config_lists_the_keys_it_used_to_miss():
    out = CliRunner().invoke(train_cli, ["config"]).output
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == field_names() and {"beta1", "beta2", "wandb_project", "wandb_group"} <= set(listed)


# --------------------------------------------------------------------------- harvest: silent wrong caches


def without_tokenizer(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    for p in dest.iterdir():
        if "token" in p.name or p.name in ("vocab.json", "merges.txt"):
            p.unlink()
    return dest


@pytest.mark.parametrize("arch", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_a_model_folder_without_tokenizer_files_is_refused(arch, request, tiny_corpus, tmp_path):
    """GPT-2's folder gets an empty tokenizer from transformers (a cache of token id 0 only); Llama's
    fails to build one. Both are refused, naming the folder, before anything is written."""
    model = without_tokenizer(request.getfixturevalue(arch), tmp_path / "model")
    r = invoke(harvest_cli, harvest_cli_args(model, tiny_corpus["jsonl"], tmp_path / "acts"))
    refused(r, str(model), "tokenizer", "tokenizer.json")
    assert not (tmp_path / "acts").exists()


def test_every_harvest_ends_with_a_summary_and_a_short_corpus_says_so(tiny_llama_dir, tiny_corpus, tmp_path):
    r = invoke(harvest_cli, harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], tmp_path / "a"))
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1] == str(tmp_path / "a")  # the last line is still the cache
    assert f"harvested {HARVEST_CTX * 20:,} tokens in 5 of 5 planned shards (sealed)" in r.output and "iB on disk" in r.output
    assert "corpus ran out" not in r.output
    args = harvest_cli_args(tiny_llama_dir, tiny_corpus["jsonl"], tmp_path / "b")
    args[args.index("--tokens") + 1] = "1M"
    r = invoke(harvest_cli, args)
    assert r.exit_code == 0, r.output
    summary = next(line for line in r.output.splitlines() if line.startswith("harvested "))
    assert "planned shards (sealed)" in summary and "of 15625 planned" in summary
    assert "WARNING: the corpus ran out after" in r.output and "short of the 1,000,000 planned" in r.output


def test_many_epochs_over_a_small_cache_are_warned_about_on_one_line(sparse_cache, tmp_path):
    args = tiny_train(sparse_cache, tmp_path, "--tokens", "30k")
    r = subprocess.run([sys.executable, "-m", "train", *map(str, args)], capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "epochs" in line]
    assert warning == [f"warning: tokens=30k is 13 epochs over the 2,240 training rows of {sparse_cache}: each row is "
                       "seen about 13 times; harvest more tokens (harvest run --tokens) or train on fewer (--tokens)"]
    assert "UserWarning" not in r.stderr
    with pytest.warns(UserWarning, match="epochs"):  # the API warns too; a budget under 10 epochs does not
        train_sae(None, cfg_for(sparse_cache, tmp_path / "api", tokens=30_000, checkpoint_every=10**6), progress=False)


@pytest.mark.parametrize("arch", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_contexts_beyond_the_model_positions_are_refused_before_anything_is_written(arch, request, tiny_corpus,
                                                                                   tmp_path):
    """GPT-2 (learned positions) failed with an IndexError, Llama (RoPE) accepted it silently; and the
    failed start left a skeleton that refused the corrected command."""
    model, out = request.getfixturevalue(arch), tmp_path / "acts"
    args = harvest_cli_args(model, tiny_corpus["jsonl"], out)
    too_long = list(args)
    too_long[too_long.index("--context-length") + 1] = str(MAX_POS * 2)
    refused(invoke(harvest_cli, too_long), f"--context-length {MAX_POS * 2} is longer than model",
            f"({MAX_POS} positions); use --context-length {MAX_POS} or less")
    assert not out.exists()
    assert invoke(harvest_cli, args).exit_code == 0  # the corrected command, into the same --out


# --------------------------------------------------------------------------- training: diverging and bad numbers


def test_a_diverging_learning_rate_stops_naming_the_step_and_keeps_the_last_good_checkpoint(sparse_cache, tmp_path):
    cfg = cfg_for(sparse_cache, tmp_path / "ok", arch="topk")  # 40 steps, checkpoints every 10
    r = invoke(train_cli, tiny_train(sparse_cache, tmp_path, "--lr", "1e6"))
    refused(r, "training diverged at step 2: the loss or its gradient norm became NaN or inf",
            "no checkpoint was written", "lower the learning rate (lr=1e+06)")
    assert not list(tmp_path.glob("*/done.json"))

    from train import sae as sae_mod

    original, calls = sae_mod.BaseAutoencoder.forward, {"n": 0}

    def blows_up(self, x, sparsity_coeff_scale=1.0, **kw):  # a finite loss, an infinite gradient from step 23 on
        calls["n"] += 1
        return original(self, x * (1e30 if calls["n"] > 22 else 1.0), sparsity_coeff_scale, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sae_mod.BaseAutoencoder, "forward", blows_up)
        with pytest.raises(Exception, match=r"diverged at step 2[34].*last good checkpoint: .*step-000000020"):
            train_sae(None, cfg, progress=False)
    run_dir = next((tmp_path / "ok").iterdir())
    assert list_checkpoints(run_dir)[-1].name == "step-000000020"
    assert all(torch.isfinite(v.float()).all() for v in final_weights(run_dir).values())


# --------------------------------------------------------------------------- advice that must work end to end


def data_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and "quarantine" not in p.relative_to(root).parts}


def rerun(command: str):
    args = shlex.split(command)
    assert args[:2] == ["harvest", "run"], command
    return invoke(harvest_cli, args[1:] + ["--quiet"])


def test_a_garbage_seal_follows_the_printed_advice_back_to_a_usable_cache(reference_cache, tmp_path):
    original = data_files(reference_cache)
    root = tmp_path / "acts"
    shutil.copytree(reference_cache, root)
    (root / "seal.json").write_text('{"n_rows": 32')
    train = tiny_train(root, tmp_path / "runs")
    refused(invoke(train_cli, train), "seal.json is corrupt", f"`harvest verify --repair {root}`")
    r = invoke(harvest_cli, ["verify", root])
    assert r.exit_code == 2 and f"harvest verify --repair {root}" in r.output, r.output
    r = invoke(harvest_cli, ["verify", "--repair", root])
    assert r.exit_code == 1, r.output
    assert "seal.json is corrupt" in r.output and "the rerun only seals it again" in r.output
    assert not (root / "seal.json").exists() and list((root / "ledger/quarantine").rglob("seal.json"))
    assert rerun(r.output.strip().splitlines()[-1].strip()).exit_code == 0
    assert data_files(root) == original  # the very cache, sealed again
    assert invoke(harvest_cli, ["verify", root]).exit_code == 0
    assert invoke(train_cli, train).exit_code == 0


def test_verify_of_an_interrupted_harvest_says_it_is_unfinished_and_how_to_continue(reference_cache, tmp_path):
    original = data_files(reference_cache)
    root = tmp_path / "acts"
    shutil.copytree(reference_cache, root)
    (root / "seal.json").unlink()
    for k in (3, 4):  # as a harvest killed after shard 2 leaves it
        (root / f"ledger/shard-{k:06d}.json").unlink()
    r = invoke(harvest_cli, ["verify", root])
    assert r.exit_code == 1, r.output
    assert "shards 3-4: missing (not harvested yet)" in r.output and "--repair" not in r.output
    assert "ok: 3 shards verified" in r.output
    assert "the harvest is unfinished (3 of 5 planned shards written, not sealed); continue it with:" in r.output
    command = r.output.strip().splitlines()[-1].strip()
    assert rerun(command).exit_code == 0
    assert data_files(root) == original
    assert "ok: 5 shards verified" in invoke(harvest_cli, ["verify", root]).output


def test_a_full_disk_before_the_first_checkpoint_gives_advice_that_works(sparse_cache, tmp_path, fault):
    fault("checkpoint_mid_write@1:enospc")
    args = tiny_train(sparse_cache, tmp_path / "runs")
    r = invoke(train_cli, args)
    refused(r, "disk full", "no checkpoint is committed yet, so there is nothing to resume",
            "start the run again with the same `train run` command")
    assert "train resume" not in r.output
    fault(None)
    assert invoke(train_cli, args).exit_code == 0  # the advice


def test_a_full_disk_before_a_sweeps_first_checkpoint_resumes_from_the_start(sparse_cache, tmp_path, fault):
    spec = tmp_path / "spec.toml"
    spec.write_text("[base]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                         {**SWEEP_BASE, "store": str(sparse_cache), "out": str(tmp_path / "s"),
                                          "tokens": 2560, "checkpoint_every": 1280}.items()) + "[grid]\nk = [2, 4]\n")
    fault("checkpoint_mid_write@1:enospc")
    r = invoke(train_cli, ["sweep", spec, "--quiet"])
    sweep_dir = next((tmp_path / "s").iterdir())
    refused(r, "disk full", "the sweep restarts from the beginning", f"`train resume {sweep_dir}`")
    fault(None)
    assert invoke(train_cli, ["resume", sweep_dir, "--quiet"]).exit_code == 0


def test_resuming_a_finished_run_or_sweep_says_it_is_complete(sparse_cache, tmp_path):
    r = invoke(train_cli, tiny_train(sparse_cache, tmp_path))
    run_dir = Path(r.output.strip().splitlines()[-1])
    before = data_files(run_dir)
    r = invoke(train_cli, ["resume", run_dir, "--quiet"])
    assert r.exit_code == 0 and f"{run_dir} is already complete (2,560 tokens trained" in r.output, r.output
    assert "pass --tokens with more than 2560" in r.output and data_files(run_dir) == before
    r = invoke(train_cli, ["resume", run_dir, "--quiet", "--tokens", "3840"])  # a larger budget trains on
    assert r.exit_code == 0 and json.loads((run_dir / "done.json").read_text())["tokens"] == 3840
    spec = tmp_path / "spec.toml"
    spec.write_text("[base]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                         {**SWEEP_BASE, "store": str(sparse_cache), "out": str(tmp_path / "s"),
                                          "tokens": 1280}.items()) + "[grid]\nk = [2, 4]\n")
    sweep_dir = Path(invoke(train_cli, ["sweep", spec, "--quiet"]).output.strip().splitlines()[-1])
    r = invoke(train_cli, ["resume", sweep_dir, "--quiet"])
    assert r.exit_code == 0 and f"sweep {sweep_dir} is already complete (all 2 SAEs finished)" in r.output


# --------------------------------------------------------------------------- tracebacks turned into one line


@pytest.fixture
def unwritable(monkeypatch, tmp_path):
    """A folder where creating anything fails with PermissionError (as without write permission;
    simulated, since the tests may run as root)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if locked in Path(self).absolute().parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    return locked


def test_an_unwritable_out_folder_is_one_line(sparse_cache, unwritable, reference_run):
    r = invoke(train_cli, tiny_train(sparse_cache, unwritable / "runs"))
    refused(r, f"--out {unwritable / 'runs'}: cannot create the folder (Permission denied); choose a writable --out")
    r = invoke(train_cli, ["export", reference_run, "--out", unwritable / "export"])
    refused(r, "cannot create the folder (Permission denied); choose a writable --out")


def test_a_missing_store_says_it_does_not_exist(tmp_path):
    r = invoke(train_cli, tiny_train(tmp_path / "no_such_cache", tmp_path / "runs"))
    refused(r, f"{tmp_path / 'no_such_cache'} does not exist")
    assert "zarr.json" not in r.output


def test_warnings_are_one_line(reference_run, tmp_path):
    """The damaged-checkpoint fallback, as the command line prints it: `warning: ...`, no source line."""
    run_dir = tmp_path / reference_run.name
    shutil.copytree(reference_run, run_dir)
    (run_dir / "done.json").unlink()
    (list_checkpoints(run_dir)[-1] / "state.json").write_text("{")
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True,
                       text=True, env=env())
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "falling back" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint "), r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr


def test_both_commands_format_warnings_as_one_line():
    import warnings

    for cli, args in ((train_cli, ["config"]), (harvest_cli, ["info", "--help"])):
        warnings.formatwarning = warnings._formatwarning_orig  # as Python starts
        assert invoke(cli, args).exit_code == 0
        assert warnings.formatwarning("checkpoint X fails; falling back", UserWarning, "f.py", 171) == \
            "warning: checkpoint X fails; falling back\n"


def test_the_eval_config_mismatch_warning_is_one_line(reference_cache, tiny_llama_dir, tmp_path):
    """`train eval --model` with the harvested model's tokenizer and shapes but another config: one
    `warning:` line naming the model, no source line."""
    other = tmp_path / "other_model"
    shutil.copytree(tiny_llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10
    (other / "config.json").write_text(json.dumps(config))
    _, run_dir = train_sae(None, cfg_for(reference_cache, tmp_path / "runs", arch="topk", tokens=256 * 2, batch_size=64,
                                         checkpoint_every=10**6), progress=False)
    r = subprocess.run([sys.executable, "-m", "train", "eval", str(run_dir), "--model", str(other), "--batches", "1",
                        "--max-contexts", "2"], capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "config hash" in line]
    assert lines == [f"warning: model {str(other)!r} has a different config hash from the harvested model; CE figures "
                     "may not describe the model the SAE was trained on"], r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr
