"""The registry of SAE architectures: name -> class, in registration order.

`register(name)` is a class decorator; `build_sae(name, **kwargs)` constructs one and
`build_from_cfg(cfg, device)` the one a training config describes. The registry is the list of
architectures: the CLI's --arch choices and the config's validation of `arch` read it.

An SAE built here remembers its constructor arguments: `sae_record(sae)` is what a checkpoint
stores (state.json "sae") and `sae_from_record` rebuilds it from that alone (train.runs.load_sae).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.sae.base import BaseAutoencoder

SAE_REGISTRY: dict[str, type[BaseAutoencoder]] = {}


def register(name: str):
    """Class decorator: make an SAE class buildable as build_sae(name, ...); sets cls.arch = name and,
    unless the class sets its own, cls.title (its name for people: the class name without "SAE")."""

    def deco(cls):
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is already registered to {SAE_REGISTRY[name].__name__}")
        SAE_REGISTRY[name] = cls
        cls.arch = name
        if "title" not in cls.__dict__:
            cls.title = cls.__name__.removesuffix("SAE") or cls.__name__
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
    """Construct a registered SAE, e.g. build_sae("topk", d_in=768, d_sae=24576, k=32). It keeps its
    constructor arguments (`init_args`, for sae_record). A shape that composes with a sparsity rule
    (a transcoder: build_sae("transcoder", sparsity="topk", ...)) is built by its `from_args`."""
    cls = sae_class(arch)
    sae = getattr(cls, "from_args", cls)(**kwargs)
    sae.init_args = {k: str(v).removeprefix("torch.") if k == "dtype" else v
                     for k, v in kwargs.items() if k not in _NOT_RECORDED}
    return sae


def build_from_cfg(cfg, device: torch.device | str | None = None) -> BaseAutoencoder:
    """The SAE a post-initialised TrainConfig describes (its class's config_args), initialised from cfg.seed."""
    cls = sae_class(cfg.arch)
    return build_sae(cfg.arch, **cls.config_args(cfg), generator=torch.Generator().manual_seed(cfg.seed),
                     device=device)


# ----- self-describing checkpoints: what rebuilds an SAE without its training config

_NOT_RECORDED = ("generator", "device")  # how it was initialised and where it lives, not what it is


def sae_record(sae: BaseAutoencoder) -> dict | None:
    """{"arch", "args"}: the architecture and constructor arguments (plain JSON) that rebuild `sae`
    (checkpoints keep it in state.json); None for an SAE not built by build_sae."""
    args = getattr(sae, "init_args", None)
    return None if args is None else {"arch": sae.arch, "args": dict(args)}


def sae_from_record(record: dict, device: torch.device | str | None = None) -> BaseAutoencoder:
    """A freshly initialised SAE of a sae_record (load its weights next). The init draws from a
    private generator, so the global RNG is untouched."""
    args = dict(record["args"])
    if "dtype" in args:
        args["dtype"] = getattr(torch, args["dtype"])
    return build_sae(record["arch"], **args, generator=torch.Generator().manual_seed(0), device=device)
