"""A battery of bad CLI and config inputs to `harvest` and `train`: each must stop with a non-zero
exit, no traceback, and a message that names the culprit and what to do.

Cases marked xfail(strict=True) are messages that are wrong or missing in product code today; the
reason names the place. When one is fixed the case XPASSes and fails: drop its mark.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_cli
from harvest.runner import run_harvest
from tests.helpers import HARVEST_CTX, SITE, cfg_for, harvest_config
from train.checkpoints import list_checkpoints
from train.cli import main as train_cli
from train.training import train_sae

# SITE: the sparse cache's site


@dataclass
class Ctx:
    tmp: Path
    model: Path
    corpus: dict
    cache: Path  # a sealed harvest of tiny_llama, layer 1, 4 contexts, 1 shard
    store: Path  # the synthetic sealed cache of tests/test_training.py (6 shards, d_model 16)
    unsealed: Path  # a copy of `store` without its seal
    junk: Path  # a folder that is neither a cache nor a run
    batchtopk_run: Path
    topk_run: Path

    def out(self, name: str) -> Path:
        return self.tmp / "outs" / name

    def harvest(self, out, *extra, layer="1"):
        return ["run", "--model", str(self.model), "--dataset", str(self.corpus["jsonl"]), "--out", str(out),
                "--layer", layer, "--tokens", str(HARVEST_CTX * 4), "--context-length", str(HARVEST_CTX),
                "--batch-size", "4", "--dtype", "float32", "--shard-tokens", str(HARVEST_CTX * 4), "--quiet", *extra]

    def train(self, *extra, store=None):
        return ["run", "--store", str(store or self.store), "--out", str(self.tmp / "runs"), "--quiet",
                "--wandb-mode", "disabled", "--tokens", "2560", *extra]

    def file(self, name: str, text: str) -> str:
        p = self.tmp / "files" / name
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        return str(p)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_llama_dir, tiny_corpus, sparse_cache):
    tmp = tmp_path_factory.mktemp("cli_errors")
    cache = tmp / "cache"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], cache, tokens=HARVEST_CTX * 4,
                               shard_tokens=HARVEST_CTX * 4, batch_size=4), progress=False)
    unsealed = tmp / "unsealed"
    shutil.copytree(sparse_cache, unsealed)
    (unsealed / "seal.json").unlink()
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a cache\n")
    _, btk = train_sae(None, cfg_for(sparse_cache, tmp / "r", arch="batchtopk"), progress=False)
    _, tk = train_sae(None, cfg_for(sparse_cache, tmp / "r", arch="topk", tokens=256 * 10), progress=False)
    return Ctx(tmp, tiny_llama_dir, tiny_corpus, cache, sparse_cache, unsealed, junk, btk, tk)


def _bad_format(c: Ctx) -> str:
    dest = c.tmp / "bad_format"
    if not dest.exists():
        shutil.copytree(c.cache, dest)
        meta = json.loads((dest / "zarr.json").read_text())
        meta["attributes"]["saeforge"]["format_version"] = 99
        (dest / "zarr.json").write_text(json.dumps(meta))
    return str(dest)


def _bad_seal(c: Ctx) -> str:
    dest = c.tmp / "bad_seal"
    if not dest.exists():
        shutil.copytree(c.cache, dest)
        (dest / "seal.json").write_text('{"n_rows": 64, "n_sha')
    return str(dest)


def _run_without_checkpoints(c: Ctx) -> str:
    d = c.tmp / "run_without_checkpoints"
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _export_target_in_use(c: Ctx) -> str:
    d = c.tmp / "export_in_use"
    d.mkdir(exist_ok=True)
    (d / "cfg.json").write_text("{}")
    return str(d)


def _empty_model(c: Ctx) -> str:
    d = c.tmp / "empty_model"
    d.mkdir(exist_ok=True)
    return str(d)


def _garbage_sweep(c: Ctx) -> str:
    d = c.tmp / "garbage_sweep"
    d.mkdir(exist_ok=True)
    (d / "sweep.json").write_text('{"name": "s", "runs": [{"run_d')
    return str(d)


def _with_model(args: list[str], model: str) -> list[str]:
    i = args.index("--model")
    return [*args[: i + 1], model, *args[i + 2:]]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without CUDA")


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


H, T = "harvest", "train"

CASES = [
    # ------------------------------------------------------------------ harvest run
    pytest.param(H, lambda c: c.harvest(c.out("a"), layer="4"),
                 ["layer 4 is out of range: model llama has 4 layers (0..3)"], id="harvest-layer-beyond-depth"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), layer="-1"),
                 ["layer -1 is out of range"], id="harvest-negative-layer"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--layer", "2-5"),
                 ["--layer 4 is out of range: model llama has 4 layers (0..3)"], id="harvest-layer-range-beyond-depth"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), layer="1-x"),
                 ["Invalid value for '--layer': '1-x' is not a layer: use an index (8), a range (2-5), a list (1,3) or all"],
                 id="harvest-layer-not-a-layer"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), layer="3-1"),
                 ["Invalid value for '--layer': '3-1': the range 3-1 runs backwards; write 1-3"], id="harvest-layer-backwards"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--site", "mlp_in", "--site", "hook_z"),
                 ["Invalid value for '--site': 'hook_z' is not one of 'resid_pre'"], id="harvest-unknown-second-site"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--site", "resid_middle"),
                 ["Invalid value for '--site': 'resid_middle' is not one of 'resid_pre'"], id="harvest-unknown-site"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--tokens", "12x"),
                 ["Invalid value for '--tokens': '12x' is not a count (examples: 200000, 200k, 50M)"],
                 id="harvest-bad-tokens-string"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--tokens", "1.5"),
                 ["Invalid value for '--tokens': '1.5' must be a positive whole number"], id="harvest-fractional-tokens"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--shard-tokens", "0"),
                 ["Invalid value for '--shard-tokens': '0' must be a positive whole number"], id="harvest-zero-shard-tokens"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--dtype", "int8"),
                 ["Invalid value for '--dtype': 'int8' is not one of 'float16', 'bfloat16', 'float32'"],
                 id="harvest-dtype-not-allowed"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--context-length", "1"),
                 ["Invalid value for '--context-length': 1 is not in the range x>=2"], id="harvest-context-length-1"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--compression", "lz4"),
                 ["Invalid value for '--compression': 'lz4' is not one of 'none', 'zstd', 'blosc'"],
                 id="harvest-unknown-compression"),
    pytest.param(H, lambda c: [a for a in c.harvest(c.out("a")) if a not in ("--layer", "1")],
                 ["Missing option '--layer'"], id="harvest-missing-layer"),
    pytest.param(H, lambda c: c.harvest(c.cache, layer="2"),
                 ["was harvested with different settings (sites: cache has [{'name': 'blocks.1.hook_resid_pre'",
                  "this run asks [{'name': 'blocks.2.hook_resid_pre'", "use a new --out or rerun with the original settings"],
                 id="harvest-reharvest-different-layer"),
    pytest.param(H, lambda c: c.harvest(c.cache, "--shard-tokens", str(HARVEST_CTX * 2)),
                 ["was harvested with different settings (rows_per_shard: cache has 64, this run asks 32)"],
                 id="harvest-reharvest-different-shard-size"),
    pytest.param(H, lambda c: c.harvest(c.junk),
                 ["junk exists and is not an activation cache; choose an empty --out"], id="harvest-out-not-a-cache"),
    pytest.param(H, lambda c: c.harvest(c.out("a"))[:4] + [c.file("d.csv", "text\nhello\n")] + c.harvest(c.out("a"))[5:],
                 ["d.csv: unsupported file type '.csv'; use one of .txt, .jsonl, .parquet"], id="harvest-dataset-type"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--text-column", "body"),
                 ["corpus.jsonl:1: no column 'body'; available columns: id, text"], id="harvest-missing-text-column"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--device", "banana"), ["banana"], id="harvest-unknown-device"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--context-length", "129"),
                 ["--context-length 129 is longer than model", "supports (128 positions); use --context-length 128 or less"],
                 id="harvest-context-beyond-positions"),
    pytest.param(H, lambda c: _with_model(c.harvest(c.out("a")), _empty_model(c)),
                 ["empty_model': the folder has no config.json, so it is not a Hugging Face model folder",
                  "pass such a folder, a .gguf file or a hub id"], id="harvest-empty-model-folder"),
    pytest.param(H, lambda c: c.harvest(c.out("a"), "--device", "cuda"), ["cuda"], id="harvest-cuda-without-cuda",
                 marks=NO_CUDA),
    # ------------------------------------------------------------------ harvest verify / info
    pytest.param(H, lambda c: ["verify", str(c.junk)],
                 ["junk is not an activation cache (no zarr.json); harvest one first"], id="verify-not-a-cache"),
    pytest.param(H, lambda c: ["verify", str(c.tmp / "nowhere")],
                 ["Invalid value for 'PATH'", "nowhere"], id="verify-missing-path"),
    pytest.param(H, lambda c: ["info", _bad_format(c)],
                 ["cache format version 99 is not supported (this software reads version 1)"], id="info-format-version"),
    pytest.param(H, lambda c: ["verify", _bad_seal(c)], ["seal.json"], id="verify-corrupt-seal"),
    # ------------------------------------------------------------------ train run: config
    pytest.param(T, lambda c: c.train("--set", "dict_sise=64"),
                 ["unknown config key 'dict_sise'; did you mean 'dict_size'?"], id="train-unknown-set-key"),
    pytest.param(T, lambda c: c.train("--set", "k=many"), ["config key 'k' must be int, got 'many'"],
                 id="train-wrong-type-int"),
    pytest.param(T, lambda c: c.train("--set", "normalize=maybe"), ["config key 'normalize' must be bool, got 'maybe'"],
                 id="train-wrong-type-bool"),
    pytest.param(T, lambda c: c.train("--set", "lr"), ["--set 'lr' must look like key=value"], id="train-set-without-equals"),
    pytest.param(T, lambda c: c.train("--autocast", "tf32", "--set", "device=cpu"),
                 ["autocast='tf32' needs a CUDA GPU of compute capability >= 8.0", "this run's device is cpu",
                  "use autocast none, bf16 or auto"], id="train-tf32-on-cpu"),
    pytest.param(T, lambda c: c.train("--k", "64", "--dict-size", "32"), ["k=64 is larger than dict_size=32"],
                 id="train-k-above-dict-size"),
    pytest.param(T, lambda c: c.train("--batch-size", "100", "--set", "micro_batch_size=30"),
                 ["batch_size=100 is not divisible by micro_batch_size=30"], id="train-micro-batch"),
    pytest.param(T, lambda c: c.train("--set", "arch=topkk"),
                 ["arch='topkk' is not one of vanilla, topk, batchtopk, jumprelu, gated, matryoshka, transcoder, skip_transcoder, clt; did you mean 'topk'?"],
                 id="train-arch-typo"),
    pytest.param(T, lambda c: c.train("--lr", "-1"), ["lr=-1.0 must be positive"], id="train-negative-lr"),
    pytest.param(T, lambda c: c.train("--lr", "nan"), ["lr=nan must be a finite number"], id="train-nan-lr"),
    pytest.param(T, lambda c: c.train("--lr", "inf"), ["lr=inf must be a finite number"], id="train-inf-lr"),
    pytest.param(T, lambda c: c.train("--set", "l1_coeff=nan"), ["l1_coeff=nan must be a finite number"],
                 id="train-nan-coefficient"),
    pytest.param(T, lambda c: c.train("--set", "beta2=1"), ["beta2=1.0 must be in [0, 1) (Adam's decay rate)"],
                 id="train-beta-out-of-range"),
    pytest.param(T, lambda c: c.train("--set", "max_grad_norm=0"),
                 ["max_grad_norm=0.0 must be positive (or none to disable clipping)"], id="train-zero-grad-clip"),
    pytest.param(T, lambda c: c.train("--set", "mask_token_ids=0,-1"),
                 ["mask_token_ids='0,-1': '-1' is not a token id (a non-negative integer); use default, none or ids"],
                 id="train-mask-negative-token-id"),
    pytest.param(T, lambda c: c.train("--config", c.file("mask.toml", 'mask_token_ids = [1, 2.5]\n')),
                 ["mask_token_ids='1,2.5': '2.5' is not a token id"], id="train-mask-non-int-token-id"),
    pytest.param(T, lambda c: c.train("--set", "mask_norm_multiple=1"),
                 ["mask_norm_multiple=1.0 must be above 1 (a multiple of the median row norm), or none"],
                 id="train-mask-norm-multiple-not-above-one"),
    pytest.param(T, lambda c: c.train("--set", "mask_norm_multiple=-3"), ["mask_norm_multiple=-3.0 must be above 1"],
                 id="train-mask-norm-multiple-negative"),
    pytest.param(T, lambda c: c.train("--set", "eval_every=often"),
                 ["config key 'eval_every' must be a number of tokens (200000, 200k, 50M, 1e6), got 'often'"],
                 id="train-set-bad-count"),
    pytest.param(T, lambda c: c.train("--config", c.file("count.toml", 'checkpoint_every = "1.5k2"\n')),
                 ["config key 'checkpoint_every' must be a number of tokens", "got '1.5k2'"], id="train-toml-bad-count"),
    pytest.param(T, lambda c: c.train("--out", c.file("out_file", "x")),
                 ["--out", "out_file is a file, not a folder; choose a folder for --out"], id="train-out-is-a-file"),
    pytest.param(T, lambda c: c.train("--out", Path(c.file("out_file", "x")) / "runs"),
                 ["out_file is a file, not a folder; choose a folder for --out"], id="train-out-under-a-file"),
    pytest.param(T, lambda c: c.train("--set", "lr_decay_start=2"), ["lr_decay_start=2.0 must be a fraction in [0, 1]"],
                 id="train-decay-start-fraction"),
    pytest.param(T, lambda c: c.train("--tokens", "ten"), ["'--tokens'", "'ten' is not a count"], id="train-bad-tokens-string"),
    pytest.param(T, lambda c: c.train("--set", "device=tpu"), ["device", "tpu"], id="train-unknown-device"),
    pytest.param(T, lambda c: c.train("--config", c.file("typo.toml", "lr_decay_strat = 0.5\n")),
                 ["unknown config key 'lr_decay_strat'; did you mean 'lr_decay_start'?"], id="train-toml-unknown-key"),
    pytest.param(T, lambda c: c.train("--config", c.file("table.toml", "[sae]\nk = 3\n")),
                 ["table.toml: table [sae] is not a config key; use flat keys"], id="train-toml-table"),
    pytest.param(T, lambda c: c.train("--config", c.file("broken.toml", "lr = \n")),
                 ["broken.toml is not valid TOML: Invalid value (at line 1"], id="train-toml-invalid"),
    pytest.param(T, lambda c: c.train("--config", str(c.tmp / "absent.toml")),
                 ["config file", "absent.toml does not exist"], id="train-toml-missing"),
    # ------------------------------------------------------------------ train run: store
    pytest.param(T, lambda c: [a for a in c.train() if a not in ("--store", str(c.store))],
                 ["no store given: set store (train run --store PATH) to a sealed activation cache"], id="train-no-store"),
    pytest.param(T, lambda c: c.train(store=c.tmp / "nostore"),
                 ["nostore does not exist; pass the folder of an activation cache"], id="train-store-missing"),
    pytest.param(T, lambda c: c.train(store=c.unsealed), ["unsealed is not sealed (harvest unfinished)"],
                 id="train-store-not-sealed"),
    pytest.param(T, lambda c: c.train("--site", "blocks.9.hook_resid_pre"),
                 [f"has no site 'blocks.9.hook_resid_pre'; it holds {SITE}"], id="train-site-not-in-cache"),
    pytest.param(T, lambda c: c.train("--set", "d_in=8"),
                 [f"d_in=8 in the config, but site '{SITE}' of the store has d_model=16"], id="train-d-in-mismatch"),
    pytest.param(T, lambda c: c.train("--set", "heldout_shards=6"),
                 ["holding out 6 of 6 shards leaves no training shard; hold out fewer"], id="train-all-shards-held-out"),
    # ------------------------------------------------------------------ train sweep
    pytest.param(T, lambda c: ["sweep", c.file("bases.toml", "[bases]\nk = 3\n"), "--quiet"],
                 ["bases.toml: unknown top-level key(s) ['bases']; use name, base, grid"], id="sweep-unknown-top-level-key"),
    pytest.param(T, lambda c: ["sweep", c.file("shared.toml", f'[base]\nstore = "{c.store}"\n[grid]\nbatch_size = [1, 2]\n'),
                               "--quiet"],
                 ["grid.batch_size: batch_size is shared by all SAEs of a sweep (one data stream); move it to [base]"],
                 id="sweep-shared-key-in-grid"),
    pytest.param(T, lambda c: ["sweep", c.file("scalar.toml", "[grid]\nk = 3\n"), "--quiet"],
                 ["scalar.toml: grid.k must be a non-empty list"], id="sweep-grid-not-a-list"),
    pytest.param(T, lambda c: ["sweep", c.file("gridkey.toml", "[grid]\nkk = [3]\n"), "--quiet"],
                 ["unknown config key 'kk'; did you mean 'k'?"], id="sweep-grid-unknown-key"),
    pytest.param(T, lambda c: ["sweep", c.file("nostore.toml", "[grid]\nk = [1, 2]\n"), "--quiet"],
                 ["the sweep has no store: set base.store (or --store)"], id="sweep-no-store"),
    pytest.param(T, lambda c: ["sweep", c.file("s.toml", f'[base]\nstore = "{c.store}"\ntokens = 2560\n[grid]\nk = [2, 4]\n'),
                               "--quiet", "--out", c.file("sweep_out", "x")],
                 ["sweep_out is a file, not a folder; choose a folder for --out"], id="sweep-out-is-a-file"),
    pytest.param(T, lambda c: ["sweep", c.file("s.toml", "[grid]\nk = [2, 4]\n"), "--quiet", "--store",
                               str(c.tmp / "nowhere")],
                 ["nowhere does not exist; pass the folder of an activation cache"], id="sweep-store-missing"),
    # ------------------------------------------------------------------ train resume / export / calibrate
    pytest.param(T, lambda c: ["resume", _garbage_sweep(c)],
                 ["sweep.json is not valid JSON", "start the sweep again with `train sweep SPEC`"],
                 id="resume-garbage-sweep-json"),
    pytest.param(T, lambda c: ["resume", str(c.junk)],
                 ["junk is neither a run folder (no config.json) nor a checkpoint folder"], id="resume-not-a-run"),
    pytest.param(T, lambda c: ["resume", _run_without_checkpoints(c)],
                 ["has no loadable checkpoint; start the run again with `train run`"], id="resume-run-without-checkpoints"),
    pytest.param(T, lambda c: ["export", str(list_checkpoints(c.batchtopk_run)[-2]), "--out", str(c.out("export"))],
                 ["step-000000030 is a BatchTopK SAE without a calibrated inference threshold",
                  "Calibrate this one with `train calibrate"], id="export-uncalibrated-batchtopk"),
    pytest.param(T, lambda c: ["export", str(c.topk_run), "--out", _export_target_in_use(c)],
                 ["export_in_use already holds cfg.json; choose another --out or pass --force"], id="export-out-in-use"),
    pytest.param(T, lambda c: ["export", str(c.topk_run), "--out", str(c.out("e")), "--store", str(c.tmp / "nowhere")],
                 ["the run's activation cache", "nowhere' does not exist; pass --store PATH"], id="export-store-missing"),
    pytest.param(T, lambda c: ["export", str(c.topk_run), "--out", c.file("export_file", "x")],
                 ["Invalid value for '--out'", "export_file' is a file"], id="export-out-is-a-file"),
    pytest.param(T, lambda c: ["eval", str(c.topk_run), "--skip-lm", "--out", c.junk],
                 ["Invalid value for '--out'", "junk' is a directory"], id="eval-out-is-a-folder"),
    pytest.param(T, lambda c: ["eval", str(c.topk_run), "--skip-lm", "--out", Path(c.file("eval_file", "x")) / "e.json"],
                 ["eval_file is a file, not a folder; choose a folder for --out"], id="eval-out-under-a-file"),
    pytest.param(T, lambda c: ["export", str(c.topk_run), "--out", str(c.out("hub")), "--push-to-hub", "someone/an-sae"],
                 ["--push-to-hub someone/an-sae: the hub is offline (HF_HUB_OFFLINE is set); the export is complete in",
                  "upload it later with `hf upload someone/an-sae"], id="export-push-to-hub-offline"),
    pytest.param(T, lambda c: ["export", str(c.topk_run), "--out", str(c.out("hub_bad")), "--push-to-hub", "not a/repo"],
                 ["--push-to-hub 'not a/repo' is not a hub repository id"], id="export-push-to-hub-bad-repo-id"),
    pytest.param(T, lambda c: ["calibrate", str(c.topk_run)],
                 ["is a topk SAE; only batchtopk, matryoshka need a threshold calibration"], id="calibrate-topk"),
]


@pytest.mark.parametrize("cli,make_args,needles", CASES)
def test_bad_input_gives_a_clear_error(ctx, cli, make_args, needles):
    group = harvest_cli if cli == H else train_cli
    args = [str(a) for a in make_args(ctx)]
    r = CliRunner().invoke(group, args)
    crashed = r.exception is not None and not isinstance(r.exception, SystemExit)
    assert not crashed, f"{cli} {' '.join(args)} raised {r.exception!r}"
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in r.output, f"{needle!r} not in:\n{r.output}"


def test_unsealed_store_hint_names_an_option_that_exists(ctx):
    r = CliRunner().invoke(train_cli, ctx.train(store=ctx.unsealed))
    assert r.exit_code == 2 and "is not sealed" in r.output
    hinted = re.findall(r"--[a-z][a-z-]+", r.output)
    assert hinted, r.output
    help_text = CliRunner().invoke(train_cli, ["run", "--help"]).output
    for option in hinted:
        assert option in help_text, f"the error suggests {option}, which `train run` does not accept"


def test_allow_unsealed_trains_on_the_committed_shards(ctx):
    r = CliRunner().invoke(train_cli, ctx.train("--allow-unsealed", store=ctx.unsealed))
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["allow_unsealed"] is True and (run_dir / "done.json").exists()


def test_nothing_was_written_by_the_failed_commands(ctx):
    """The failed harvests left no cache behind, and the existing cache is untouched and sealed.
    The export whose upload failed offline is complete; the one with a bad repo id wrote nothing."""
    outs = ctx.tmp / "outs"
    assert not outs.exists() or not list(outs.glob("*/ledger/*.json"))
    if (outs / "hub").exists():
        assert {p.name for p in (outs / "hub").iterdir()} >= {"cfg.json", "sae_weights.safetensors", "README.md"}
    assert not (outs / "hub_bad").exists()
    r = CliRunner().invoke(harvest_cli, ["verify", str(ctx.cache)])
    assert r.exit_code == 0 and "ok: 1 shards verified" in r.output, r.output
