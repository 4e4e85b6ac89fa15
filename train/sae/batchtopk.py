"""BatchTopK SAE: the k*B largest entries of relu(z) over a batch of B tokens; a calibrated threshold at inference."""

import torch
from torch import Tensor

from train.heldout import threshold_loop_collect, threshold_loop_compute
from train.kernels import BatchTopKEncode
from train.sae.base import Active, BaseAutoencoder, Encoding
from train.sae.registry import register
from train.sae.topk import TopK

_THRESHOLD_KINDS = ("none", "global", "per_feature")


class BatchTopK(TopK):
    """Sparsity rule: training keeps the k*B largest entries of relu(z) over the batch (k per token
    on average; TopK's arguments, config keys and run label); inference, once a threshold is set
    (set_threshold), keeps z where z > threshold, JumpReLU style.

    `threshold` [m] is a buffer and `threshold_kind` is "none", "global" (one value for all
    features) or "per_feature"; both travel in the state dict. The fast path stores the batch's
    active set as a flat row-sorted list of k*B entries (see train.kernels); rows may hold any
    number of them, so there is no padding.
    """

    def __init__(self, d_in: int, d_sae: int, **rule):
        super().__init__(d_in, d_sae, **rule)
        device, dtype = self.W_dec.device, self.W_dec.dtype
        self.register_buffer("threshold", torch.zeros(d_sae, device=device, dtype=dtype))
        self.register_buffer("threshold_kind_id", torch.zeros((), dtype=torch.long, device=device))
        self.threshold_kind = "none"
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_threshold_kind())

    def _sync_threshold_kind(self) -> None:
        self.threshold_kind = _THRESHOLD_KINDS[int(self.threshold_kind_id)]

    @torch.no_grad()
    def set_threshold(self, value: float | Tensor) -> None:
        """Calibrated inference threshold: a scalar ("global") or a [m] tensor ("per_feature")."""
        value = torch.as_tensor(value, dtype=self.threshold.dtype, device=self.threshold.device)
        if value.dim() == 0:
            kind = "global"
        elif value.shape == (self.d_sae,):
            kind = "per_feature"
        else:
            raise ValueError(f"threshold must be a scalar or shape ({self.d_sae},), got {tuple(value.shape)}")
        self.threshold.copy_(value.expand(self.d_sae))
        self.threshold_kind_id.fill_(_THRESHOLD_KINDS.index(kind))
        self.threshold_kind = kind

    def activation(self, pre: Tensor) -> Tensor:
        z = pre.relu().flatten()
        top, idx = z.topk(self.k_now * pre.shape[0], sorted=False)
        return torch.zeros_like(z).scatter_(0, idx, top).view_as(pre)

    def encode(self, x: Tensor, use_threshold: bool | None = None) -> Tensor:
        """x [..., d] -> f [..., m]. use_threshold: None = the threshold if calibrated, else batch top-k."""
        if use_threshold is None:
            use_threshold = self.threshold_kind != "none"
        if not use_threshold:
            return super().encode(x)
        if self.threshold_kind == "none":
            raise ValueError(f"{type(self).__name__} has no calibrated threshold; call set_threshold() first")
        z = self.pre_acts(x.reshape(-1, self.d_in)).relu()
        return (z * (z > self.threshold)).reshape(*x.shape[:-1], self.d_sae)

    def sparse_encode(self, x: Tensor, center: Tensor, latents: bool = True) -> tuple[Tensor | None, Tensor, Active, tuple]:
        vals, rows, cols, offsets, pre = BatchTopKEncode.apply(x, center, self.W_enc, self.b_enc, self.k_now)
        f = torch.zeros_like(pre).index_put_((rows, cols), vals) if latents else None
        return f, pre, Active(vals, rows, cols), (vals, cols, offsets)

    def inference_threshold(self) -> Tensor | None:
        return None if self.threshold_kind == "none" else self.threshold.detach().clone()

    # ----- calibration and encodings
    needs_calibration = True

    @property
    def calibrated(self) -> bool:
        return self.threshold_kind != "none"

    def calibrate(self, batches, kind: str, n_batches: int) -> None:
        """Set the inference threshold ("global" or "per_feature", train.heldout.threshold_loop_compute)
        from the training-time selections on up to n_batches held-out batches."""
        self.set_threshold(threshold_loop_compute(threshold_loop_collect(self, batches, n_batches), kind))

    def encodings(self) -> list[Encoding]:
        """The calibrated threshold (when set; what export writes), then the training-time batch top-k."""
        out = []
        if self.calibrated:
            out.append(Encoding("threshold", f"JumpReLU with the calibrated {self.threshold_kind} threshold "
                                             "(per token; as exported)", True))
        out.append(Encoding("batch_topk", f"training-time batch top-k (k={self.k} per token on average over each "
                                          "batch)", False, per_batch=True))
        return out

    def final_results(self, evaluate) -> dict:
        """Both encodings' figures; "heldout" is the threshold's, and inference L0 is reported against k."""
        encodings = {e.name: e for e in self.encodings()}
        batch_figures = evaluate(encodings["batch_topk"])
        figures = evaluate(encodings["threshold"])
        return {"threshold_kind": self.threshold_kind, "heldout_batchtopk": batch_figures, "heldout": figures,
                "inference_l0": figures["l0"], "k": self.k}

    def describe(self) -> dict:
        return {**super().describe(), "threshold_kind": self.threshold_kind}

    # ----- export: as JumpReLU with the calibrated threshold (per feature), so no k
    saelens_arch = "jumprelu"

    def export_config(self) -> dict:
        return {}


@register("batchtopk")
class BatchTopKSAE(BatchTopK, BaseAutoencoder):
    """Training: keep the k*B largest entries of relu(z) over the batch (k per token on average).

    Inference: once a threshold is set (set_threshold), encode keeps z where z > threshold,
    JumpReLU style (see BatchTopK).
    """
