"""Mixed precision: one vocabulary for harvest (the LM's forward), train (the SAE's matrix
products) and eval (the LM's forward), so that a setting reads the same everywhere.

    none  float32 compute
    bf16  bfloat16 autocast (torch.autocast(device, dtype=torch.bfloat16))
    auto  what the caller defines as its default: harvest bf16 on CUDA and float32 on the CPU;
          eval as the cache was harvested (bf16 on CUDA when its compute dtype was bfloat16);
          training measures once, when a run is created, and records none, tf32 or bf16 in the run's
          config (train.precision), so that what a run computes does not depend on where it resumes.

Training's key also takes tf32 (float32 tensors, TF32 tensor-core matrix products on CUDA >= sm_80,
train.precision); the LM's forward in harvest and eval takes this vocabulary only.

`bfloat16`, the spelling harvest and eval used before, is accepted as an alias of bf16, so that
older command lines and scripts keep working.
"""

from __future__ import annotations

import torch

from shared.errors import UserError

AUTOCAST = ("none", "bf16", "auto")
AUTOCAST_ALIASES = {"bfloat16": "bf16"}


class AutocastError(UserError, ValueError):
    """An autocast setting outside the vocabulary."""


def canonical_autocast(choice: str) -> str:
    """`choice` in the vocabulary's own spelling (an alias becomes its name); AutocastError if unknown."""
    name = AUTOCAST_ALIASES.get(choice, choice)
    if name not in AUTOCAST:
        raise AutocastError(f"autocast={choice!r} is not one of {', '.join(AUTOCAST)}")
    return name


def autocast_dtype(choice: str, auto: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of `choice` (None: no autocast); `auto` is what "auto" means to the caller."""
    choice = canonical_autocast(choice)
    if choice == "auto":
        return auto
    return torch.bfloat16 if choice == "bf16" else None
