"""The config and the `train` command line derive from one declaration (train.config.TrainConfig):
choices from the Literal types (arch from the SAE registry), help and shown defaults from the
fields and their docstrings, and the per-key facts (run identity, resumable, shared by a sweep)
from field metadata. Run names stay byte-identical to the ones computed before."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import typing

import pytest
from click.testing import CliRunner

from train.cli import main as train_cli
from train.config import (ConfigError, TrainConfig, config_hash, field_help, field_names, get_default_cfg, key_facts,
                          post_init_cfg, resumable_keys, sweep_shared_keys, update_cfg)
from train.sae import arch_names

SITE = "blocks.3.hook_resid_pre"

# Run names computed with the code before the keys' facts moved into field metadata (commit 1311565).
PINNED_NAMES = [
    ({}, "topk_blocks.3.hook_resid_pre_512_k32_47f9d3a7"),
    ({"arch": "batchtopk", "k": 16, "threshold_kind": "per_feature"}, "batchtopk_blocks.3.hook_resid_pre_512_k16_3e1b9112"),
    ({"arch": "vanilla", "l1_coeff": 3.0, "lr_decay": "cosine"}, "vanilla_blocks.3.hook_resid_pre_512_l1_3_379d3572"),
    ({"arch": "jumprelu", "jumprelu_sparsity": "tanh", "b_dec_init": "mean", "l0_coeff": 0.5},
     "jumprelu_blocks.3.hook_resid_pre_512_l0_0.5_7b6e8efe"),
    ({"autocast": "bf16", "expansion": 4}, "topk_blocks.3.hook_resid_pre_256_k32_bd927fc5"),
    ({"allow_unsealed": True, "tokens": 20_000_000, "max_grad_norm": None, "micro_batch_size": 1024},
     "topk_blocks.3.hook_resid_pre_512_k32_f54cf5b2"),
    ({"device": "cpu", "store_io": "copy", "wandb_mode": "disabled", "compile": True, "out": "elsewhere", "log_every": 3,
      "store": "/data/acts", "seed": 7, "dict_size": 1000, "aux_k": 12}, "topk_blocks.3.hook_resid_pre_1000_k32_8f6d0f43"),
]


def named(**changes) -> TrainConfig:
    return post_init_cfg(update_cfg(get_default_cfg(), **changes), d_in=64, site=SITE)


@pytest.mark.parametrize("changes,name", PINNED_NAMES, ids=[n for _, n in PINNED_NAMES])
def test_run_names_are_the_ones_computed_before(changes, name):
    assert named(**changes).run_name == name


# Keys added after legacy_config_hash was written (issue 13's variants), at their defaults: they did not
# exist then, so the hash it computed did not see them.
ADDED_LATER = ("k_anneal_tokens", "k_anneal_start", "matryoshka_widths", "target_l0", "jumprelu_init_l0",
               "jumprelu_pre_act_coeff", "jumprelu_freq_coeff", "jumprelu_freq_max", "jumprelu_threshold_lr_scale",
               "jumprelu_pre_act_silent_tokens",
               "mask_token_ids", "mask_norm_multiple", "mask_norm_threshold")  # the row mask: issue 13


def legacy_config_hash(cfg: TrainConfig) -> str:
    """config_hash as it was written before (the hand-kept list of keys left out), kept here to
    compare the declared facts against."""
    skip = {"run_name", "out", "wandb_mode", "wandb_project", "wandb_group", "log_every", "device", "eval_every",
            "eval_batches", "compile", "deterministic", "sparse_kernels", "store_threads", "store_io",
            "memory_limit_gib", "sparse_fraction"}  # added later (issues 14, 15): how a run computes
    defaults = get_default_cfg().to_dict()
    skip |= {k for k in ADDED_LATER if getattr(cfg, k) == defaults[k]}
    data = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    if data.pop("autocast") != "none":
        data["autocast"] = cfg.autocast
    if data.pop("allow_unsealed"):
        data["allow_unsealed"] = True
    for key in ("in_site", "out_site", "sparsity"):  # transcoder keys, added later (issue 14): hashed when set
        if data.pop(key) is not None:
            data[key] = getattr(cfg, key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def random_config(rng: random.Random) -> TrainConfig:
    """A valid config with a random subset of keys changed from their defaults."""
    pick = {
        "arch": lambda: rng.choice(arch_names()[:4]), "k": lambda: rng.choice([4, 16, 32]),
        "expansion": lambda: rng.choice([2, 4, 8]), "lr": lambda: rng.choice([1e-3, 4e-4, 3e-5]),
        "batch_size": lambda: rng.choice([256, 4096]), "tokens": lambda: rng.choice([10**5, 10**7, 123_456]),
        "seed": lambda: rng.randrange(100), "lr_decay": lambda: rng.choice(["none", "linear", "cosine"]),
        "b_dec_init": lambda: rng.choice(["geometric_median", "mean", "zeros"]),
        "threshold_kind": lambda: rng.choice(["global", "per_feature"]),
        "jumprelu_sparsity": lambda: rng.choice(["l0", "tanh"]), "autocast": lambda: rng.choice(["none", "bf16"]),
        "allow_unsealed": lambda: rng.random() < 0.5, "store_io": lambda: rng.choice(["auto", "map", "copy"]),
        "wandb_mode": lambda: rng.choice(["online", "offline", "disabled"]), "device": lambda: rng.choice(["cpu", "auto"]),
        "store_threads": lambda: rng.choice([1, 2]), "compile": lambda: rng.random() < 0.5,
        "deterministic": lambda: rng.random() < 0.5, "sparse_kernels": lambda: rng.random() < 0.5,
        "eval_every": lambda: rng.choice([0, 10**6]), "eval_batches": lambda: rng.choice([1, 10]),
        "out": lambda: rng.choice(["runs", "/tmp/x"]), "log_every": lambda: rng.choice([1, 10]),
        "wandb_project": lambda: rng.choice(["saeforge", "p"]), "wandb_group": lambda: rng.choice([None, "g"]),
        "store": lambda: rng.choice(["", "/data/acts"]), "normalize": lambda: rng.random() < 0.5,
        "drop_bos": lambda: rng.random() < 0.5, "max_grad_norm": lambda: rng.choice([None, 1.0, 0.5]),
        "heldout_shards": lambda: rng.choice([1, 2]), "keep_checkpoints": lambda: rng.choice([2, 3]),
        "checkpoint_every": lambda: rng.choice([10**6, 5 * 10**6]), "l1_coeff": lambda: rng.choice([1.0, 5.0]),
        "l0_coeff": lambda: rng.choice([0.5, 1.0]), "lr_warmup_tokens": lambda: rng.choice([0, 1000]),
        "density_every": lambda: rng.choice([100, 500]), "beta1": lambda: rng.choice([0.9, 0.8]),
        "k_anneal_tokens": lambda: rng.choice([0, 1000]), "matryoshka_widths": lambda: rng.choice(["1/16,1/4", "0.5"]),
        "jumprelu_pre_act_coeff": lambda: rng.choice([0.0, 3e-6]),
    }
    keys = rng.sample(sorted(pick), rng.randrange(len(pick)))
    return named(**{k: pick[k]() for k in keys})


def test_the_declared_identity_hashes_every_config_as_the_hand_kept_list_did():
    rng = random.Random(17)
    for _ in range(300):
        cfg = random_config(rng)
        assert config_hash(cfg) == legacy_config_hash(cfg), cfg


def test_the_declared_facts_are_the_lists_they_replaced():
    assert resumable_keys() == {"tokens", "wandb_mode", "wandb_project", "wandb_group", "log_every", "device",
                                "checkpoint_every", "store_threads", "store_io", "keep_checkpoints",
                                "memory_limit_gib"}  # train.training; memory_limit_gib added by issue 14
    # site left this list with issue 14: a sweep's store serves the union of its runs' sites
    assert sweep_shared_keys() == {"store", "batch_size", "tokens", "window_shards", "heldout_shards",
                                   "normalize", "drop_bos", "seed", "checkpoint_every", "out",
                                   "mask_token_ids", "mask_norm_multiple", "mask_norm_threshold"}  # train.sweep; the row mask: issue 13
    not_identity = {k for k in field_names() if key_facts(k).identity is False}
    assert not_identity == {"run_name", "out", "wandb_mode", "wandb_project", "wandb_group", "log_every", "device",
                            "eval_every", "eval_batches", "compile", "deterministic", "sparse_kernels", "sparse_fraction", "store_threads",
                            "store_io", "memory_limit_gib", "sparse_fraction"}
    assert {k for k in field_names() if key_facts(k).identity == "when_set"} == {"autocast", "allow_unsealed",
                                                                              *ADDED_LATER, "in_site", "out_site",
                                                                              "sparsity"}


def test_every_key_has_help():
    help_ = field_help()
    missing = [k for k in field_names() if not help_.get(k)]
    assert not missing, f"give these TrainConfig fields a docstring: {missing}"


def test_train_config_lists_every_key_with_its_default_and_help():
    r = CliRunner().invoke(train_cli, ["config"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert [line.split()[0] for line in lines] == field_names()
    defaults, help_ = get_default_cfg().to_dict(), field_help()
    for key, line in zip(field_names(), lines):
        assert line.startswith(f"{key:24s} {defaults[key]!r:>14}  {help_[key]}"), line
        facts = key_facts(key)
        assert ("resume may change it" in line) == facts.resumable, line
        assert ("one value for every SAE of a sweep" in line) == facts.sweep_shared, line
        assert ("not in the run name" in line) == (facts.identity is False), line


LITERAL_KEYS = [k for k in field_names() if typing.get_origin(typing.get_type_hints(TrainConfig)[k]) is typing.Literal]


def test_the_choice_keys_are_typed_literals():
    assert set(LITERAL_KEYS) == {"store_io", "jumprelu_sparsity", "b_dec_init", "lr_decay", "autocast", "threshold_kind",
                                 "wandb_mode"}
    assert key_facts("arch").choices == arch_names()  # the registry's, variants register themselves


@pytest.mark.parametrize("key", [*LITERAL_KEYS, "arch"])
def test_each_choice_key_takes_its_choices_and_refuses_the_rest(key):
    choices = key_facts(key).choices
    for value in choices:
        assert getattr(update_cfg(get_default_cfg(), **{key: value}), key) == value
    bad = choices[0] + "x"
    hint = f"; did you mean {choices[0]!r}?"
    with pytest.raises(ConfigError) as e:
        update_cfg(get_default_cfg(), **{key: bad})
    assert str(e.value) == f"{key}={bad!r} is not one of {', '.join(choices)}{hint}"
    with pytest.raises(ConfigError, match=f"^config key {key!r} must be str, got 3$"):
        update_cfg(get_default_cfg(), **{key: 3})


def test_a_new_variant_is_a_choice_of_arch(monkeypatch):
    from train.sae import SAE_REGISTRY

    monkeypatch.setitem(SAE_REGISTRY, "toy_choice", SAE_REGISTRY["topk"])
    assert "toy_choice" in key_facts("arch").choices
    assert update_cfg(get_default_cfg(), arch="toy_choice").arch == "toy_choice"


def test_train_autocast_speaks_the_shared_vocabulary():
    assert update_cfg(get_default_cfg(), autocast="bfloat16").autocast == "bf16"  # the harvest's older spelling
    assert named(autocast="bfloat16", expansion=4).run_name == PINNED_NAMES[4][1]
    # auto is accepted here and resolved to none, tf32 or bf16 when the run is created (train.precision,
    # tests/test_precision.py); tf32 is training's own value (TF32 matmuls on CUDA >= sm_80)
    assert update_cfg(get_default_cfg(), autocast="auto").autocast == "auto"
    assert update_cfg(get_default_cfg(), autocast="tf32").autocast == "tf32"
    with pytest.raises(ConfigError, match=r"^autocast='fp32' is not one of none, tf32, bf16, auto"):
        update_cfg(get_default_cfg(), autocast="fp32")


# --------------------------------------------------------------------------- `train run` options

RUN_OPTIONS = {"store": None, "site": None, "arch": "topk", "k": "32", "dict_size": None, "expansion": "8",
               "lr": "0.0004", "batch_size": "4096", "tokens": "10M", "seed": "0", "out": "runs",
               "checkpoint_every": "5M", "allow_unsealed": None, "wandb_mode": "offline"}


def run_options() -> dict[str, object]:
    import click

    cmd = train_cli.commands["run"]
    return {p.name: p for p in cmd.params if isinstance(p, click.Option) and p.name in RUN_OPTIONS}


def test_run_options_take_help_choices_and_defaults_from_the_config():
    import click

    options, help_, defaults = run_options(), field_help(), get_default_cfg()
    assert set(options) == set(RUN_OPTIONS)
    given = train_cli.commands["run"].make_context("run", ["--quiet"]).params
    assert all(given[key] is None for key in RUN_OPTIONS), given  # a --config file yields only to options given
    for key, shown in RUN_OPTIONS.items():
        opt = options[key]
        assert opt.opts == ["--" + key.replace("_", "-")], opt.opts
        assert opt.help.startswith(help_[key]), (key, opt.help)
        if shown is None:
            assert "[default:" not in opt.help, opt.help
        else:
            assert opt.help.endswith(f"[default: {shown}]"), opt.help
            assert str(getattr(defaults, key)) == shown or opt.type.convert(shown, None, None) == getattr(defaults, key)
        choices = key_facts(key).choices
        if choices is not None:
            assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == choices, key


def test_calibrate_and_resume_choices_come_from_the_config():
    calibrate = {p.name: p for p in train_cli.commands["calibrate"].params}
    assert tuple(calibrate["kind"].type.choices) == key_facts("threshold_kind").choices
    for command in ("resume", "eval"):
        params = {p.name: p for p in train_cli.commands[command].params}
        assert tuple(params["wandb_mode"].type.choices) == key_facts("wandb_mode").choices


def test_run_help_shows_the_derived_defaults():
    out = CliRunner().invoke(train_cli, ["run", "--help"], terminal_width=400).output
    for needle in [f"--arch [{'|'.join(arch_names())}]", "--arch [vanilla|topk|batchtopk|jumprelu|", "[default: topk]", "[default: 10M]", "[default: 4096]",
                   "--wandb-mode [online|offline|disabled]", "--tokens COUNT", "--checkpoint-every COUNT"]:
        assert needle in out, needle
    assert re.search(r"--allow-unsealed\s+Train on the shards", out), out


def test_sweep_grid_refuses_every_shared_key():
    from train.sweep import expand_spec

    for key in sorted(sweep_shared_keys()):
        value = dataclasses.asdict(get_default_cfg())[key]
        with pytest.raises(ConfigError, match=f"^grid.{key}: {key} is shared by all SAEs of a sweep"):
            expand_spec({"grid": {key: [value]}})
    assert len(expand_spec({"grid": {"k": [4, 8], "lr": [1e-3]}})) == 2  # the others vary
