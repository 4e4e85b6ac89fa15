"""JumpReLU SAE: f = z * H(z - theta) with a learned per-latent threshold theta = exp(log_threshold)."""

import math

import torch
from torch import Tensor, nn

from train.sae.base import BaseAutoencoder
from train.sae.functions import JumpReLUFn, StepFn
from train.sae.registry import register


class JumpReLU:
    """Sparsity rule: f = z * H(z - theta), theta = exp(log_threshold) [m], computed outside the
    autograd functions (train.sae.functions).

    sparsity="l0": l0_coeff * mean_B sum_i H(z_i - theta_i), the step on the pre-activation z.
    sparsity="tanh": l0_coeff * mean_B sum_i tanh(tanh_c * |f_i| ||W_dec,i||), a smooth proxy
    whose gradient also reaches the encoder. bandwidth is the kernel width eps. AuxK is off unless
    aux_coeff > 0.
    """

    config_keys = {"l0_coeff": "l0_coeff", "sparsity": "jumprelu_sparsity", "bandwidth": "jumprelu_bandwidth",
                   "threshold_init": "threshold_init"}
    saelens_arch = "jumprelu"  # with threshold = exp(log_threshold)

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"l0_{cfg.l0_coeff:g}"

    def __init__(self, d_in: int, d_sae: int, *, l0_coeff: float = 1.0, sparsity: str = "l0",
                 tanh_c: float = 4.0, threshold_init: float = 0.001, bandwidth: float = 0.05, **base):
        if sparsity not in ("l0", "tanh"):
            raise ValueError(f"JumpReLU sparsity must be 'l0' or 'tanh', got {sparsity!r}")
        super().__init__(d_in, d_sae, **base)
        self.l0_coeff, self.sparsity, self.tanh_c, self.bandwidth = l0_coeff, sparsity, tanh_c, bandwidth
        self.log_threshold = nn.Parameter(torch.full_like(self.b_enc, math.log(threshold_init)))

    def activation(self, pre: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, self.log_threshold.exp(), self.bandwidth)

    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        if self.sparsity == "l0":
            per_token = StepFn.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(-1)
        else:
            per_token = torch.tanh(self.tanh_c * f.abs() * self.W_dec.norm(dim=1)).sum(-1)
        return self.l0_coeff * per_token.mean()

    def inference_threshold(self) -> Tensor | None:
        return self.log_threshold.detach().exp()


@register("jumprelu")
class JumpReLUSAE(JumpReLU, BaseAutoencoder):
    """f = z * H(z - theta), theta = exp(log_threshold) [m]; l0 or tanh sparsity (see JumpReLU)."""
