"""The LM with its MLP outputs replaced by a transcoder's (or a CLT's) predictions: the hooks
behind `train eval`'s replacement CE (train.transcoder_eval, through train.lm_figures.lm_losses).

In one forward of the LM on a batch of contexts [B, T], `Replacement.attach(lm)`:

- captures each covered layer's input site (a HookSite: a module's input, forward pre-hook, or
  its output, forward hook; mlp_in is the pre-MLP norm's output, resid_mid that norm's input)
  and encodes it at once: f_l = encode(s_in_l x_l), the latents of that layer;
- replaces each target site (shared.hook_sites.splice; mlp_out: what the MLP adds to the
  residual stream) with the prediction from the latents captured *in the same forward*:
  a transcoder's y_hat = decode(f, s_in x) / s_out; a CLT's y_hat_t = (b_dec_t + sum_{l <= t}
  f_l W_dec_l[:, t - l]) / s_out_t, every covered MLP at once, so layer t's input (and its
  latents) already carry the replacements of the layers before it;
- touches the positions `where` names only (train.row_mask.positions_of: an int start, or the
  run's SplicePositions): a masked position (position 0 under drop_bos, a masked token id, a
  norm outlier), which the model never trained on, keeps its clean activations everywhere, as
  train eval's SAE splice does.

`ZeroAblation(out_sites, where)` zeroes every covered target site at the same positions (the
"MLP zero-ablated" baseline). A target reached before its input in the forward (an input site
that the block computes after the target) is refused with EvalError. The model computes in
float32 with autocast off, whatever the LM's compute dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from shared.hook_sites import HookSite, splice
from train.errors import EvalError
from train.row_mask import SplicePositions, positions_of, register_read
from train.sae.base import Encoding


class Predictor:
    """A transcoder's or CLT's predictions of its targets from the inputs of one forward, in raw units.

    s_in, s_out: the dataset scaling of each layer's input and target site (train.scaling)."""

    def __init__(self, sae, encoding: Encoding, s_in: list[float], s_out: list[float]):
        self.sae, self.encoding, self.s_in, self.s_out = sae, encoding, s_in, s_out
        self.clt = hasattr(sae, "sources")
        self.latents: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}

    def clear(self) -> None:
        self.latents.clear()
        self.inputs.clear()

    def on_input(self, layer: int, rows: Tensor) -> None:
        """Layer `layer`'s input rows [N, d] (raw, float32): encode them."""
        x = rows * self.s_in[layer]
        model = self.sae.sources[layer] if self.clt else self.sae
        self.inputs[layer], self.latents[layer] = x, self.encoding.encode(model, x)

    def output(self, t: int) -> Tensor:
        """Target t's prediction [N, d] in raw units, from the latents of layers 0..t (all captured)."""
        if self.clt:
            return self.sae.decode_target(self.latents, t) / self.s_out[t]
        return self.sae.decode(self.latents[0], self.inputs[0]) / self.s_out[0]


class Replacement:
    """The lm_losses intervention "replaced" (module docstring): in_sites[l] and out_sites[l] are
    covered layer l's input and target HookSites."""

    def __init__(self, predictor: Predictor, in_sites: list[HookSite], out_sites: list[HookSite],
                 where: int | SplicePositions):
        self.predictor, self.in_sites, self.out_sites, self.where = predictor, in_sites, out_sites, where
        self._seen: set[int] = set()

    def _new_forward(self, *_) -> None:
        self._seen.clear()
        self.predictor.clear()

    def _capture(self, layer: int):
        def fn(a: Tensor) -> None:
            m = positions_of(self.where, a)
            with torch.autocast(a.device.type, enabled=False):
                self.predictor.on_input(layer, a[m].float())
            self._seen.add(layer)

        return fn

    def _replace(self, t: int):
        def fn(a: Tensor) -> Tensor:
            missing = [l for l in range(t + 1) if l not in self._seen]
            if missing:
                raise EvalError(f"the replacement of {self.out_sites[t].name} needs {self.in_sites[missing[0]].name}, "
                                "which this forward had not computed yet: a transcoder's input site must come before "
                                "its target in the model")
            out = a.clone()
            with torch.autocast(a.device.type, enabled=False):
                pred = self.predictor.output(t)
            out[positions_of(self.where, a)] = pred.to(a.dtype)
            return out

        return fn

    @contextlib.contextmanager
    def attach(self, lm) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            handles = [lm.register_forward_pre_hook(self._new_forward)]
            handles += [register_read(lm, site, self._capture(l)) for l, site in enumerate(self.in_sites)]
            stack.callback(lambda: [h.remove() for h in handles])
            for t, site in enumerate(self.out_sites):
                stack.enter_context(splice(lm, site, self._replace(t)))
            yield


class ZeroAblation:
    """The lm_losses intervention "zero": every site of out_sites zeroed at the positions `where` names."""

    def __init__(self, out_sites: list[HookSite], where: int | SplicePositions):
        self.out_sites, self.where = out_sites, where

    def _zero(self, a: Tensor) -> Tensor:
        out = a.clone()
        out[positions_of(self.where, a)] = 0
        return out

    @contextlib.contextmanager
    def attach(self, lm) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for site in self.out_sites:
                stack.enter_context(splice(lm, site, self._zero))
            yield
