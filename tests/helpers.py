"""Deterministic tiny English text for offline tests (no downloads)."""

from __future__ import annotations

import json
import random

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


# Base keys of the tiny sweeps in the tests (the settings of tests/test_training.py's cfg_for).
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
