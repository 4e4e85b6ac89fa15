"""What several test modules share, besides the fixtures of tests/conftest.py: deterministic tiny
English text, the settings of the tiny harvests and training runs, the synthetic caches (built
with shared.synthetic) and small readers of what the store serves. Test modules import from here,
never from each other.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from shared.synthetic import (SITE, build_synthetic_cache, indexed_normal, shared_codes, sparse_codes, synthetic_spec,
                              zero_tokens)

REPO = Path(__file__).resolve().parents[1]
SITE2 = "blocks.1.hook_resid_pre"  # the second site of two-site synthetic caches (SITE: blocks.0.hook_resid_pre)

# --------------------------------------------------------------------------- text

SUBJECTS = ["the old sailor", "a young farmer", "my sister", "the tired teacher", "our neighbour",
            "the small dog", "a quiet student", "the king", "her brother", "the baker", "a stranger",
            "the children", "his mother", "the captain", "a clever fox", "the doctor"]
VERBS = ["found", "carried", "painted", "watched", "built", "opened", "remembered", "sold",
         "followed", "cleaned", "described", "wanted", "borrowed", "forgot", "visited", "answered"]
OBJECTS = ["a red boat", "the heavy box", "an empty house", "the long road", "a broken clock",
           "the green garden", "a letter", "the river bank", "an apple tree", "the wooden door",
           "a strange song", "the morning train", "a warm coat", "the market square", "two books"]
TAILS = ["before the rain began", "after a long winter", "near the edge of the town",
         "without saying a word", "while the bells were ringing", "in the middle of the night",
         "because nobody else would", "with great care", "on a cold Tuesday", "for the third time",
         "as the sun went down", "at the end of the summer"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.7:
        s += " " + rng.choice(TAILS)
    return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])


def make_lines(n_lines: int, seed: int = 0) -> list[str]:
    """n_lines documents of 1-4 sentences each, a pure function of (n_lines, seed)."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(n_lines)]


# --------------------------------------------------------------------------- tiny models (tests/conftest.py)

N_LAYERS, D_MODEL, MAX_POS = 4, 32, 128
ARCH_FIXTURES = {"gpt2": "tiny_gpt2_dir", "llama": "tiny_llama_dir", "neox": "tiny_neox_dir", "gemma2": "tiny_gemma2_dir"}

# --------------------------------------------------------------------------- harvest

HARVEST_CTX = 16  # context length of the tiny harvests


def harvest_config(model_dir, corpus, out, **over):
    """The reference harvest (`reference_cache`): layer 1, 20 contexts of 16 tokens, 4 a shard, float32."""
    from harvest.runner import HarvestConfig

    base = dict(
        model=str(model_dir), dataset=str(corpus), out=str(out), layers=[1], tokens=HARVEST_CTX * 20,
        context_length=HARVEST_CTX, batch_size=3, dtype="float32", shard_tokens=HARVEST_CTX * 4,
    )
    base.update(over)
    return HarvestConfig(**base)


def harvest_cli_args(model_dir, corpus, out, *extra):
    """`harvest run` arguments (after `harvest`) for the reference harvest of harvest_config."""
    return ["run", "--model", str(model_dir), "--dataset", str(corpus), "--out", str(out), "--layer", "1",
            "--tokens", str(HARVEST_CTX * 20), "--context-length", str(HARVEST_CTX), "--batch-size", "3",
            "--dtype", "float32", "--shard-tokens", str(HARVEST_CTX * 4), "--quiet", *extra]


def multi_site_harvest() -> bool:
    """Whether `harvest run` captures several site kinds in one pass (HarvestConfig.site a list)."""
    import typing

    from harvest.runner import HarvestConfig

    return typing.get_type_hints(HarvestConfig)["site"] is not str


def harvest_sites(model_dir, corpus, out, kinds, layers, **over) -> Path:
    """One cache of several site kinds of a tiny model at `layers` (harvest_config's other settings):
    one harvest of them all where harvest captures several kinds in one pass, else one harvest per
    kind merged shard by shard into one cache (the harvests read the same contexts: their tokens are
    checked equal), with the first harvest's provenance."""
    import numpy as np

    from harvest.runner import run_harvest
    from shared.cache import Cache, CacheSpec, CacheWriter

    out = Path(out)
    if multi_site_harvest():
        run_harvest(harvest_config(model_dir, corpus, out, layers=list(layers), site=list(kinds), **over), progress=False)
        return out
    parts = []
    for kind in kinds:
        run_harvest(harvest_config(model_dir, corpus, out.with_name(f"{out.name}-{kind}"), layers=list(layers), site=kind,
                                   **over), progress=False)
        parts.append(Cache.open(out.with_name(f"{out.name}-{kind}")))
    first = parts[0].spec
    spec = CacheSpec.from_dict({**first.to_dict(), "sites": [s for c in parts for s in c.spec.to_dict()["sites"]]})
    writer = CacheWriter.create_or_open(out, spec)
    for k in parts[0].shards:
        tokens, positions = parts[0].read_vector("tokens", k), parts[0].read_vector("positions", k)
        for c in parts[1:]:
            assert np.array_equal(c.read_vector("tokens", k), tokens), "the harvests read different contexts"
        acts = {s.name: np.array(c.read_acts(s.name, k)) for c in parts for s in c.spec.sites}
        writer.write_shard(k, acts, tokens, positions)
    writer.seal()
    return out


def cache_bytes(root: Path) -> dict[str, bytes]:
    """Every data and ledger file of a cache (locks and metadata timestamps aside)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name != "seal.json"
    }


# --------------------------------------------------------------------------- the sparse cache and training runs on it

SPARSE_D, SPARSE_ATOMS, SPARSE_CTX, SPARSE_ROWS_PER_SHARD, SPARSE_SHARDS = 16, 48, 8, 512, 6


def build_sparse_cache(root):
    """The `sparse_cache` fixture's cache at root: 6 shards x 512 rows of x = sparse codes @ a
    random 48 x 16 dictionary (+ small noise), float32, site SITE, contexts of 8. SAEs can learn it."""
    spec = synthetic_spec(d_model=SPARSE_D, rows_per_shard=SPARSE_ROWS_PER_SHARD,
                          planned_rows=SPARSE_ROWS_PER_SHARD * SPARSE_SHARDS, context_length=SPARSE_CTX,
                          dataset={"kind": "synthetic"})
    return build_synthetic_cache(root, spec, sparse_codes(SPARSE_D, SPARSE_ATOMS, seed=0), tokens=zero_tokens)


def transcoder_sites(n_layers: int = 2) -> list[str]:
    """mlp_in and mlp_out of layers 0..n_layers-1 (TransformerLens names), in layer order."""
    return [s for layer in range(n_layers) for s in (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")]


def build_transcoder_cache(root, n_layers: int = 2):
    """The `transcoder_cache` fixture's cache at root: build_sparse_cache's layout (6 x 512 rows,
    d 16, contexts of 8) with sites mlp_in and mlp_out at layers 0..n_layers-1, all driven by the
    same sparse codes (shared.synthetic.shared_codes): every site predicts every other."""
    sites = transcoder_sites(n_layers)
    spec = synthetic_spec(d_model=SPARSE_D, rows_per_shard=SPARSE_ROWS_PER_SHARD,
                          planned_rows=SPARSE_ROWS_PER_SHARD * SPARSE_SHARDS, context_length=SPARSE_CTX, sites=sites,
                          dataset={"kind": "synthetic"})
    return build_synthetic_cache(root, spec, shared_codes(SPARSE_D, SPARSE_ATOMS, sites, seed=1), tokens=zero_tokens)


def cfg_for(store, out, **over):
    """The tiny training run: topk k=4, 4x, batches of 256, 40 steps, checkpoints every 10."""
    from train.config import get_default_cfg, update_cfg

    base = dict(store=str(store), out=str(out), batch_size=256, tokens=256 * 40, expansion=4, k=4,
                checkpoint_every=256 * 10, log_every=5, density_every=10, wandb_mode="disabled",
                lr=3e-3, dead_tokens_threshold=2048, threshold_batches=4, b_dec_init="mean")
    base.update(over)
    return update_cfg(get_default_cfg(), **base)


def train_cli_args(store, out, arch="batchtopk", extra=()):
    """`train run` arguments (after `train`) for cfg_for's run (the `reference_run` with batchtopk)."""
    return ["run", "--store", str(store), "--out", str(out), "--quiet", "--arch", arch, "--k", "4", "--expansion", "4",
            "--batch-size", "256", "--tokens", str(256 * 40), "--checkpoint-every", str(256 * 10), "--lr", "3e-3",
            "--wandb-mode", "disabled", "--set", "log_every=5", "--set", "density_every=10",
            "--set", "dead_tokens_threshold=2048", "--set", "threshold_batches=4", "--set", "b_dec_init=mean", *extra]


def train_cli_run(store, out, fault=None, arch="batchtopk", extra=()):
    """train_cli_args run as `python -m train` in a subprocess, SAEFORGE_FAULT=fault if given."""
    env = dict(os.environ)
    if fault:
        env["SAEFORGE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "train", *train_cli_args(store, out, arch, extra)], env=env,
                          capture_output=True, text=True)


def kill9_and_resume(store, tmp_path, arch: str, over: dict) -> tuple[Path, Path]:
    """A reference run of cfg_for(arch, **over), and the same run from the CLI killed with -9 after
    optimizer step 17, then `train resume`d: (resumed run folder, reference run folder)."""
    import signal

    from train.training import train_sae

    _, ref = train_sae(None, cfg_for(store, tmp_path / "ref", arch=arch, **over), progress=False)
    extra = [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
    first = train_cli_run(store, tmp_path / "cli", "after_optimizer_step@17", arch=arch, extra=extra)
    assert first.returncode == -signal.SIGKILL, first.stderr
    run_dir = next((tmp_path / "cli").iterdir())
    r = subprocess.run([sys.executable, "-m", "train", "resume", str(run_dir), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return run_dir, ref


def harvest_killed_then_rerun(args: list[str], fault: str, between=None) -> None:
    """Run the harvest command `args` with SAEFORGE_FAULT=fault (it must die by SIGKILL), call
    between() if given, then run it again to completion."""
    import signal

    env = dict(os.environ, SAEFORGE_FAULT=fault)
    first = subprocess.run(args, env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr
    if between is not None:
        between()
    env.pop("SAEFORGE_FAULT")
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr


def not_sealed(cache: Path) -> None:
    """Assert that the cache folder has no seal (an interrupted harvest)."""
    assert not (cache / "seal.json").exists(), cache


def final_weights(run_dir: Path) -> dict:
    """The tensors of a run's newest checkpoint (sae.safetensors)."""
    from safetensors.torch import load_file

    from train.checkpoints import list_checkpoints

    return load_file(str(list_checkpoints(run_dir)[-1] / "sae.safetensors"))


# --------------------------------------------------------------------------- store caches: rows that say who they are


def build_cache(path, n_rows=100, rps=16, ctx=4, d=8, dtype="float32", sites=(SITE,), shards=None, seal=True,
                compression="none"):
    """A cache whose row i has x[0] = i, x[1] = site index, the rest N(0, 1) (shared.synthetic.
    indexed_normal); tokens = row index, positions = row % ctx. Last shard short."""
    spec = synthetic_spec(d_model=d, rows_per_shard=rps, planned_rows=n_rows, sites=sites, dtype=dtype,
                          context_length=ctx, model={"id": "tiny"}, bos_policy={"policy": "context", "bos_id": 1},
                          compression=compression)
    return build_synthetic_cache(path, spec, indexed_normal(d, sites), shards=shards, seal=seal)


def rows_of(batch):
    """The global row indices of a batch of build_cache rows (column 0)."""
    import torch

    return batch[:, 0].to(torch.int64).tolist()


def stream(store, n_batches):
    import torch

    return torch.cat([store.next_batch() for _ in range(n_batches)])


def damaged_copy(src, dst, shard, how):
    """A copy of cache src at dst with the SITE chunk of `shard` truncated, missing or with a flipped bit."""
    shutil.copytree(src, dst)
    chunk = Path(dst) / f"acts/{SITE}/c/{shard}/0"
    data = bytearray(chunk.read_bytes())
    if how == "truncate":
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "missing":
        chunk.unlink()
    else:
        data[40] ^= 0x10
        chunk.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------- sweeps

# Base keys of the tiny sweeps in the tests (the settings of cfg_for above).
SWEEP_BASE = {"batch_size": 256, "tokens": 10240, "expansion": 4, "checkpoint_every": 2560, "log_every": 5,
              "density_every": 10, "wandb_mode": "disabled", "lr": 3e-3, "dead_tokens_threshold": 2048,
              "threshold_batches": 4, "b_dec_init": "mean"}


def write_sweep_spec(path, store, out, grid: str, name: str = "t", top: str = "", **base):
    """A sweep spec TOML at `path`: SWEEP_BASE updated by `base`, store and out, the `grid` table body
    as given, and `top` (extra top-level lines). Returns path."""
    keys = {"store": str(store), "out": str(out), **SWEEP_BASE, **base}
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]  # JSON scalars are valid TOML
    path.write_text(f'name = "{name}"\n{top}\n[base]\n' + "\n".join(lines) + f"\n[grid]\n{grid}\n")
    return path


def sae_step(sae, opt, x, *args, **kwargs):
    """One plain training step of `sae` on rows x (forward with *args/**kwargs, backward, the
    decoder-gradient projection, opt.step(), unit-norm decoder rows); returns the SAEOutput."""
    out = sae(x, *args, **kwargs)
    opt.zero_grad()
    out.loss.backward()
    sae.remove_parallel_decoder_grad()
    opt.step()
    sae.make_decoder_unit_norm()
    return out
