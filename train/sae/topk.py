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

    k annealing (off unless k_anneal_tokens > 0, as sparsify's k decay): training starts at
    k_anneal_start (default min(d_sae, 10 d_in)) and decays linearly to k over the first
    k_anneal_tokens training tokens, k_t = round(k0 + (k - k0) min(t / T, 1)), a pure function of
    the tokens seen (set_training_tokens), so that a resumed run repeats it. Inference and
    evaluation (eval mode) always use k.
    """

    config_keys = {"k": "k", "aux_coeff": "aux_coeff", "fast": "sparse_kernels"}
    late_config_keys = {"k_anneal_tokens": ("k_anneal_tokens", 0), "k_anneal_start": ("k_anneal_start", None)}
    saelens_arch = "topk"

    @classmethod
    def config_error(cls, cfg) -> str | None:
        if cfg.dict_size is not None and cfg.k > cfg.dict_size:
            return f"k={cfg.k} is larger than dict_size={cfg.dict_size}"
        if cfg.k_anneal_tokens < 0:
            return f"k_anneal_tokens={cfg.k_anneal_tokens} must not be negative"
        if cfg.k_anneal_start is not None:
            if cfg.k_anneal_start < cfg.k:
                return f"k_anneal_start={cfg.k_anneal_start} must be at least k={cfg.k} (k decays from it to k)"
            if cfg.dict_size is not None and cfg.k_anneal_start > cfg.dict_size:
                return f"k_anneal_start={cfg.k_anneal_start} is larger than dict_size={cfg.dict_size}"
        return None

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"k{cfg.k}"

    def __init__(self, d_in: int, d_sae: int, *, k: int, fast: bool = True, aux_coeff: float = 1 / 32,
                 k_anneal_tokens: int = 0, k_anneal_start: int | None = None, **base):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        super().__init__(d_in, d_sae, aux_coeff=aux_coeff, **base)
        self.k, self.fast = k, fast
        self.k_anneal_tokens = k_anneal_tokens
        self.k_anneal_start = min(d_sae, 10 * d_in) if k_anneal_start is None else k_anneal_start
        if k_anneal_tokens and not k <= self.k_anneal_start <= d_sae:
            raise ValueError(f"k_anneal_start must be in k={k}..d_sae={d_sae}, got {self.k_anneal_start}")
        self.k_train = self.k_anneal_start if k_anneal_tokens else k  # the k of the next training step

    def set_training_tokens(self, tokens: int) -> None:
        """k annealing: the training k after `tokens` training tokens (k once annealing is off or over)."""
        T = self.k_anneal_tokens
        if T <= 0 or tokens >= T:
            self.k_train = self.k
        else:
            k0 = self.k_anneal_start
            self.k_train = int(round(k0 + (self.k - k0) * tokens / T))

    @property
    def k_now(self) -> int:
        """The k of the current mode: the (annealed) training k in training mode, k otherwise."""
        return self.k_train if self.training else self.k

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k}

    def export_config(self) -> dict:
        return {"k": int(self.k), "rescale_acts_by_decoder_norm": False}

    def activation(self, pre: Tensor) -> Tensor:
        top, idx = pre.topk(self.k_now, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, top.relu())

    def sparse_encode(self, x: Tensor, center: Tensor, latents: bool = True) -> tuple[Tensor | None, Tensor, Active, tuple]:
        k = self.k_now
        vals, idx, pre = TopKEncode.apply(x, center, self.W_enc, self.b_enc, k)
        f = torch.zeros_like(pre).scatter_(1, idx, vals) if latents else None
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        return f, pre, Active(vals.reshape(-1), rows, idx.reshape(-1)), (vals, idx, None)


@register("topk")
class TopKSAE(TopK, BaseAutoencoder):
    """f = relu of the k largest pre-activations of each token, zero elsewhere.

    fast=True trains through train.kernels (sparse backward and decode); fast=False is the
    dense reference path. AuxK is on by default (aux_coeff = 1/32).
    """
