"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

The two paths share their directions, W_mag = W_enc * exp(r_mag) (per latent), so with
pi_gate = (x - b_dec) W_enc + b_gate (the shape's pre-activation; b_gate is the shape's b_enc):

    f     = H(pi_gate) * relu((x - b_dec) W_mag + b_mag)
          = H(pi_gate) * relu((pi_gate - b_gate) * exp(r_mag) + b_mag)      (one encoder matmul)
    loss  = mse + l1_coeff * mean_B sum_i relu(pi_gate)_i ||W_dec,i||
                + mean_B || x - (relu(pi_gate) @ sg(W_dec) + sg(b_dec)) ||^2

H has no gradient: the gate is trained by the L1 term and by the auxiliary reconstruction through a
frozen (stop-gradient, sg) copy of the decoder, which is logged as "mse_gate". AuxK is off unless
aux_coeff > 0. Parameters r_mag, b_mag (and b_gate) start at zero, as in the paper and SAELens.

Export: SAELens' `gated` architecture, tensors W_enc, b_gate, r_mag, b_mag, W_dec, b_dec. Its
inference computes the magnitude path as (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag: the same
numbers as ours up to float rounding. The dataset scaling folds into W_enc, W_dec and b_dec as
for every SAE; b_gate, r_mag and b_mag keep their values (both paths see the same (x - b_dec) W_enc).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.sae.base import Active, BaseAutoencoder
from train.sae.registry import register


class Gated:
    """Sparsity rule: a gate H(pi_gate) and a magnitude relu((pi_gate - b_gate) exp(r_mag) + b_mag)
    sharing W_enc; L1 on relu(pi_gate) weighted by decoder norms, and the gate's reconstruction
    through a frozen decoder (module docstring). Reads `l1_coeff`."""

    config_keys = {"l1_coeff": "l1_coeff"}
    saelens_arch = "gated"

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"l1_{cfg.l1_coeff:g}"

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 1.0, **base):
        super().__init__(d_in, d_sae, **base)
        self.l1_coeff = l1_coeff
        self.r_mag = nn.Parameter(torch.zeros_like(self.b_enc))
        self.b_mag = nn.Parameter(torch.zeros_like(self.b_enc))

    def activation(self, pre: Tensor) -> Tensor:
        gate = pre.detach().sign().clamp_(min=0)  # H(pi_gate) as floats, no gradient
        magnitude = ((pre - self.b_enc) * self.r_mag.exp() + self.b_mag).relu()
        return magnitude * gate

    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        return self.l1_coeff * (pre.relu() @ self.W_dec.norm(dim=1)).mean()

    def reconstruction_losses(self, x: Tensor, x_hat: Tensor, f: Tensor, pre: Tensor,
                              active: Active | None) -> dict[str, Tensor]:
        terms = super().reconstruction_losses(x, x_hat, f, pre, active)
        via_gate = pre.relu() @ self.W_dec.detach() + self.b_dec.detach()
        terms["mse_gate"] = (via_gate - x).pow(2).sum(-1).mean()
        return terms

    @torch.no_grad()
    def export_tensors(self, scale_in: float, scale_out: float) -> dict[str, Tensor]:
        """SAELens gated's tensors, in its order: b_enc is the gate's bias b_gate."""
        folded = self.fold_scaling(scale_in, scale_out)
        f32 = {name: p.detach().to("cpu", torch.float32).clone() for name, p in
               (("r_mag", self.r_mag), ("b_mag", self.b_mag))}
        return {"W_enc": folded["W_enc"], "b_gate": folded["b_enc"], "r_mag": f32["r_mag"], "b_mag": f32["b_mag"],
                "W_dec": folded["W_dec"], "b_dec": folded["b_dec"]}


@register("gated")
class GatedSAE(Gated, BaseAutoencoder):
    """f = H(pi_gate) * relu((pi_gate - b_gate) exp(r_mag) + b_mag), pi_gate = (x - b_dec) W_enc + b_gate
    (see the module docstring)."""
