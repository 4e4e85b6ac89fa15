"""Vanilla (ReLU + L1) SAE: f = relu(z); sparsity = l1_coeff * mean_B sum_i f_i ||W_dec,i||."""

from torch import Tensor

from train.sae.base import Active, BaseAutoencoder
from train.sae.registry import register


class ReLUL1:
    """Sparsity rule: f = relu(z), penalised by the decoder-norm-weighted L1 of f (no AuxK by default).

    A threshold rule (floor 0): with sparse_fraction set it trains through the entries z > 0 when
    they are few enough (train.sae.base); the L1's gradient lives on them alone.
    """

    config_keys = {"l1_coeff": "l1_coeff"}
    saelens_arch = "standard"
    selects_active = True

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

    def active_floor(self) -> float:
        return 0.0

    def active_values(self, z: Tensor, cols: Tensor) -> Tensor:
        return z.relu()

    def active_sparsity_loss(self, active: Active, n_rows: int) -> Tensor:
        return self.l1_coeff * (active.vals * self.W_dec.norm(dim=1).index_select(0, active.cols)).sum() / n_rows


@register("vanilla")
class VanillaSAE(ReLUL1, BaseAutoencoder):
    """f = relu(z); sparsity = l1_coeff * mean_B sum_i f_i ||W_dec,i||."""
