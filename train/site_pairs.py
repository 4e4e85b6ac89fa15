"""Which cache sites a run reads and predicts, and how a store batch becomes the model's arguments.

    SAE           reads and predicts `site`                        forward(x)
    transcoder    reads in_site, predicts out_site                 forward(x, target=y), x, y [B, d]
    clt           reads in_site's sites, predicts out_site's       forward(x, target=y), x, y [B, L, d]
                  (one of each per layer, in layer order)          (the layers stacked along dim 1)

`plan_of(cfg)` is that for a resolved config; `resolve_run_sites(cfg, spec)` resolves a new run's
site keys against the cache's sites before its store is opened (a name, or a kind taken at a
layer; defaults: a transcoder reads mlp_in at the layer of the mlp_out it predicts, the lowest layer
the cache has both at; a clt covers every layer the cache has both kinds at); the store then
serves `plan.sites` row-aligned (train.activation_store), each site with its own dataset scaling
(train.scaling folds both at export). A sweep's store serves the union of its runs' sites
(`union_sites`), and each run takes its own from every batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from shared.errors import UserError
from train.config import update_cfg
from train.sae.clt import split_sites
from train.sae.registry import sae_class

DEFAULT_KINDS = ("mlp_in", "mlp_out")  # a transcoder's input and target kinds when none is given


class SiteError(UserError):
    """A run's sites are not in its cache; the message names what the cache has."""


def site_layout(arch: str) -> str:
    """"single" (an SAE), "pair" (a transcoder) or "layers" (a clt)."""
    return getattr(sae_class(arch), "site_layout", "single")


@dataclass(frozen=True)
class SitePlan:
    inputs: tuple[str, ...]  # the sites the encoder(s) read, one per layer
    outputs: tuple[str, ...] | None  # the sites the decoder(s) predict; None: an SAE predicts its input
    stacked: bool = False  # a clt: [B, L, d]

    @property
    def sites(self) -> list[str]:
        """The store sites, inputs first, each once."""
        return list(dict.fromkeys(self.inputs + (self.outputs or ())))

    def pair(self, batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """(x, target) of a store batch (a tensor, or a dict site -> [B, d]); target None for an SAE."""
        if isinstance(batch, Tensor):
            if self.outputs is not None:
                raise ValueError("a transcoder needs a store that serves its input and target sites")
            return batch, None
        if self.outputs is None:
            return batch[self.inputs[0]], None
        if self.stacked:
            return (torch.stack([batch[s] for s in self.inputs], 1), torch.stack([batch[s] for s in self.outputs], 1))
        return batch[self.inputs[0]], batch[self.outputs[0]]


def plan_of(cfg) -> SitePlan:
    """The sites of a resolved config (site, in_site and out_site set)."""
    layout = site_layout(cfg.arch)
    if layout == "single":
        return SitePlan((cfg.site,), None) if cfg.site else SitePlan((), None)
    ins, outs = split_sites(cfg.in_site), split_sites(cfg.out_site)
    if not ins or not outs:
        raise SiteError(f"{cfg.run_name or cfg.arch}: in_site and out_site are not resolved; open the run through "
                        "train.site_pairs.resolve_run_sites")
    return SitePlan(tuple(ins), tuple(outs), stacked=layout == "layers")


def union_sites(plans: Iterable[SitePlan], default: str) -> list[str] | str:
    """What one store serves a group of runs: the site of SAEs that all read it (served as a
    tensor, as for one SAE), else the union of their sites (a dict)."""
    plans = list(plans)
    sites = list(dict.fromkeys(s for p in plans for s in (p.sites or [default])))
    if all(p.outputs is None for p in plans) and len(sites) == 1:
        return sites[0]
    return sites


class EncoderInputs:
    """The encoder inputs of a store's held-out batches, re-iterable (a clt calibrates layer by layer)."""

    def __init__(self, store, plan: SitePlan):
        self.store, self.plan = store, plan

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.store.eval_batches():
            yield self.plan.pair(batch)[0]


# --------------------------------------------------------------------------- resolving a new run's sites


def resolve_run_sites(cfg, spec) -> Any:
    """cfg with its sites named as the cache `spec` has them (SiteError naming the cache's sites):
    an SAE's site defaults to the cache's first; a transcoder's and a clt's in_site / out_site
    become site names, and site its first input (module docstring; a transcoder given `site` and no
    in_site reads that site)."""
    layout = site_layout(cfg.arch)
    names = {r.name: r for r in spec.sites}
    if layout == "single":  # a site the cache lacks is the store's to name (CacheError), as it always was
        return update_cfg(cfg, site=cfg.site or spec.site_names[0])
    at = {(r.kind, r.layer): r.name for r in spec.sites}
    kinds = {r.kind for r in spec.sites}
    have = ", ".join(spec.site_names)

    def parse(value: str, key: str) -> tuple[str | None, list[str] | None]:
        """(kind, None) or (None, site names)."""
        if value in kinds:
            return value, None
        parts = split_sites(value)
        for p in parts or [value]:
            if p not in names:
                raise SiteError(f"{key}={p!r} is neither a site nor a site kind of the cache (its sites: {have}); "
                                f"harvest it (`harvest run --site KIND`) or name one of these")
        if layout == "pair" and len(parts) != 1:
            raise SiteError(f"{key}={value!r} names {len(parts)} sites; a {cfg.arch} reads one and predicts one")
        return None, parts

    def site_at(kind: str, layer: int, key: str) -> str:
        if (kind, layer) not in at:
            raise SiteError(f"{key}={kind!r}: the cache has no {kind} site at layer {layer} (its sites: {have})")
        return at[(kind, layer)]

    k_in, n_in = parse(cfg.in_site or cfg.site or DEFAULT_KINDS[0], "in_site")  # site: the one the latents read
    k_out, n_out = parse(cfg.out_site or DEFAULT_KINDS[1], "out_site")
    if n_in is None and n_out is None:
        layers = sorted({r.layer for r in spec.sites if (k_in, r.layer) in at and (k_out, r.layer) in at})
        if not layers:
            raise SiteError(f"the cache has no layer with both a {k_in} and a {k_out} site (its sites: {have}); "
                            "harvest both kinds at the same layers, or name the sites")
        layers = layers if layout == "layers" else layers[:1]
    else:
        layers = [names[s].layer for s in (n_in if n_in is not None else n_out)]
    ins = n_in if n_in is not None else [site_at(k_in, l, "in_site") for l in layers]
    outs = n_out if n_out is not None else [site_at(k_out, l, "out_site") for l in layers]
    if len(ins) != len(outs):
        raise SiteError(f"in_site names {len(ins)} sites and out_site {len(outs)}: a clt needs one of each per layer")
    return update_cfg(cfg, in_site=",".join(ins), out_site=",".join(outs), site=ins[0])
