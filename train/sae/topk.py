"""TopK SAE: f = relu of the k largest pre-activations of each token, zero elsewhere."""

import torch
from torch import Tensor

from train.kernels import TopKEncode
from train.sae.base import Active, BaseAutoencoder
from train.sae.registry import register


class TopK:
    """Sparsity rule: each token keeps its k largest pre-activations (relu'd); structural, no penalty.

    fast=True trains through train.kernels (sparse backward and decode); fast=False is the
    dense reference path. AuxK is on by default (aux_coeff = 1/32).
    """

    config_keys = {"k": "k", "aux_coeff": "aux_coeff", "fast": "sparse_kernels"}
    saelens_arch = "topk"

    @classmethod
    def config_error(cls, cfg) -> str | None:
        if cfg.dict_size is not None and cfg.k > cfg.dict_size:
            return f"k={cfg.k} is larger than dict_size={cfg.dict_size}"
        return None

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"k{cfg.k}"

    def __init__(self, d_in: int, d_sae: int, *, k: int, fast: bool = True, aux_coeff: float = 1 / 32, **base):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        super().__init__(d_in, d_sae, aux_coeff=aux_coeff, **base)
        self.k, self.fast = k, fast

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}

    def export_config(self) -> dict:
        return {"k": int(self.k), "rescale_acts_by_decoder_norm": False}

    def activation(self, pre: Tensor) -> Tensor:
        top, idx = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, top.relu())

    def sparse_encode(self, centered: Tensor) -> tuple[Tensor, Tensor, Active, tuple]:
        vals, idx, pre = TopKEncode.apply(centered, self.W_enc, self.b_enc, self.k)
        f = torch.zeros_like(pre).scatter_(1, idx, vals)
        rows = torch.arange(centered.shape[0], device=centered.device).repeat_interleave(self.k)
        return f, pre, Active(vals.reshape(-1), rows, idx.reshape(-1)), (vals, idx, None)


@register("topk")
class TopKSAE(TopK, BaseAutoencoder):
    """f = relu of the k largest pre-activations of each token, zero elsewhere.

    fast=True trains through train.kernels (sparse backward and decode); fast=False is the
    dense reference path. AuxK is on by default (aux_coeff = 1/32).
    """
