"""Which sites one harvest captures: `--layer` values and `--site` kinds -> the HookSites of one
forward pass.

- `--layer` values (repeatable): an index (`8`), an inclusive range (`2-5`), a comma list of
  those (`1,3,6-7`) or `all`. `LAYERS` (a click type) parses one value; `layer_selection` merges
  the repeats into a sorted list of distinct indices, or "all". Ranges are checked against the
  model only once it is loaded (`expand_layers`).
- `--site` kinds (repeatable): `site_kinds` puts several in the order a block computes them
  (shared.hook_sites.BLOCK_ORDER), so the cache identity does not depend on the order typed.
- `harvest_sites`: every kind at every layer, layer by layer (blocks.0 sites, then blocks.1 ...);
  `select_sites` does all three for a loaded model.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import click

from shared.hook_sites import BLOCK_ORDER, SITE_KINDS, HookSite, HookSiteError, find_block_list, resolve_sites

ALL = "all"
_ITEM = re.compile(r"^\s*(?:(?P<one>-?\d+)|(?P<lo>\d+)\s*-\s*(?P<hi>\d+))\s*$")


def parse_layer_value(value: str | int) -> tuple[int, ...] | str:
    """One --layer value -> the layer indices it names (in order), or ALL. ValueError (one line)
    for anything else, or a range that runs backwards."""
    if isinstance(value, int):
        return (value,)
    text = str(value).strip()
    if text.lower() == ALL:
        return ALL
    layers: list[int] = []
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(f"{value!r} is not a layer: use an index (8), a range (2-5), a list (1,3) or all")
        if m["one"] is not None:
            layers.append(int(m["one"]))
            continue
        lo, hi = int(m["lo"]), int(m["hi"])
        if lo > hi:
            raise ValueError(f"{value!r}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        layers.extend(range(lo, hi + 1))
    return tuple(layers)


class LayerValue(click.ParamType):
    """A click type for one --layer value (see parse_layer_value)."""

    name = "layers"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) or value == ALL:
            return value
        try:
            return parse_layer_value(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


LAYERS = LayerValue()


def layer_selection(values: Iterable[tuple[int, ...] | str]) -> list[int] | str:
    """Repeated --layer values (parsed) -> "all" if any is all, else the sorted distinct indices."""
    values = list(values)
    if any(v == ALL for v in values):
        return ALL
    return sorted({layer for v in values for layer in v})


def expand_layers(layers: Sequence[int] | str, n_layers: int, model_name: str) -> list[int]:
    """The layer indices of a selection ("all", or indices, kept in the order given, repeats
    dropped) for a model of n_layers blocks; HookSiteError naming --layer and the model's depth."""
    if isinstance(layers, str):
        if layers.strip().lower() != ALL:
            raise HookSiteError(f"--layer {layers!r} is not a layer list or all")
        return list(range(n_layers))
    out: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise HookSiteError(
                f"--layer {layer} is out of range: model {model_name} has {n_layers} layers (0..{n_layers - 1})"
            )
        if layer not in out:
            out.append(layer)
    if not out:
        raise HookSiteError("--layer: no layer given")
    return out


def site_kinds(site: str | Sequence[str]) -> list[str]:
    """The site kinds of a harvest: one kind, or several in block order (repeats dropped);
    HookSiteError naming --site for an unknown kind."""
    kinds = [site] if isinstance(site, str) else list(site)
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise HookSiteError(f"unknown --site {kind!r}; valid kinds: {', '.join(SITE_KINDS)}")
    if not kinds:
        raise HookSiteError("--site: no site kind given")
    return [k for k in BLOCK_ORDER if k in kinds]


def harvest_sites(model, layers: Sequence[int], kinds: Sequence[str]) -> list[HookSite]:
    """Every kind at every layer, layer-major: [(layers[0], kinds[0]), (layers[0], kinds[1]), ...].
    For one kind this is resolve_sites(model, layers, kind)."""
    per_kind = {kind: resolve_sites(model, list(layers), kind) for kind in kinds}
    return [per_kind[kind][i] for i in range(len(layers)) for kind in kinds]


def select_sites(model, layers: Sequence[int] | str, site: str | Sequence[str]) -> list[HookSite]:
    """The HookSites of a harvest's `layers` ("all" or indices) and `site` kind(s) in `model`."""
    kinds = site_kinds(site)
    name = str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)
    return harvest_sites(model, expand_layers(layers, len(find_block_list(model)[1]), name), kinds)


def format_layers(layers: Sequence[int]) -> str:
    """Sorted distinct layers as one --layer value: [0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
