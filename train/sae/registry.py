"""The registry of SAE architectures: name -> class, in registration order.

`register(name)` is a class decorator; `build_sae(name, **kwargs)` constructs one and
`build_from_cfg(cfg, device)` the one a training config describes. The registry is the list of
architectures: the CLI's --arch choices and the config's validation of `arch` read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.sae.base import BaseAutoencoder

SAE_REGISTRY: dict[str, type[BaseAutoencoder]] = {}


def register(name: str):
    """Class decorator: make an SAE class buildable as build_sae(name, ...); sets cls.arch = name."""

    def deco(cls):
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is already registered to {SAE_REGISTRY[name].__name__}")
        SAE_REGISTRY[name] = cls
        cls.arch = name
        return cls

    return deco


def arch_names() -> tuple[str, ...]:
    """The registered architectures, in registration order."""
    return tuple(SAE_REGISTRY)


def sae_class(arch: str) -> type[BaseAutoencoder]:
    """The class registered as `arch`; ValueError naming the valid ones."""
    if arch not in SAE_REGISTRY:
        raise ValueError(f"unknown SAE architecture {arch!r}; valid names: {', '.join(sorted(SAE_REGISTRY))}")
    return SAE_REGISTRY[arch]


def build_sae(arch: str, **kwargs) -> BaseAutoencoder:
    """Construct a registered SAE, e.g. build_sae("topk", d_in=768, d_sae=24576, k=32)."""
    return sae_class(arch)(**kwargs)


def build_from_cfg(cfg, device: torch.device | str | None = None) -> BaseAutoencoder:
    """The SAE a post-initialised TrainConfig describes (its class's config_args), initialised from cfg.seed."""
    cls = sae_class(cfg.arch)
    return build_sae(cfg.arch, **cls.config_args(cfg), generator=torch.Generator().manual_seed(cfg.seed),
                     device=device)
