"""Vanilla (ReLU + L1) SAE: f = relu(z); sparsity = l1_coeff * mean_B sum_i f_i ||W_dec,i||."""

from torch import Tensor

from train.sae.base import BaseAutoencoder
from train.sae.registry import register


class ReLUL1:
    """Sparsity rule: f = relu(z), penalised by the decoder-norm-weighted L1 of f (no AuxK by default)."""

    config_keys = {"l1_coeff": "l1_coeff"}
    saelens_arch = "standard"

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"l1_{cfg.l1_coeff:g}"

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 5.0, **base):
        super().__init__(d_in, d_sae, **base)
        self.l1_coeff = l1_coeff

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        return self.l1_coeff * (f @ self.W_dec.norm(dim=1)).mean()  # a matvec: no [B, m] temporary


@register("vanilla")
class VanillaSAE(ReLUL1, BaseAutoencoder):
    """f = relu(z); sparsity = l1_coeff * mean_B sum_i f_i ||W_dec,i||."""
