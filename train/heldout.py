"""Held-out figures and threshold statistics, below both training and evaluation.

`evaluate_heldout(sae, store)` encodes the store's held-out rows (`store.eval_batches()`, never
trained on) and returns the reconstruction figures training logs (eval/*, final/* and done.json):

    mse                   mean over rows of sum_d (x - x_hat)^2, in the store's (normalised) space
    explained_variance    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all evaluated rows
    l0                    mean over rows of #{f_i > 0}
    never_fired           latents with no activation on the evaluated rows (and never_fired_fraction)
    rows                  rows evaluated

More figures come from accumulators: objects with update(x [B, d], f [B, m], x_hat [B, d]), called
on every evaluated batch, which the caller reads afterwards (train.evaluation adds cosine
similarity, L1 and densities this way).

A transcoder (`plan`, train.site_pairs) is evaluated the same way on its target: x is then the
target rows (a clt's [B, L, d] flattened to [B, L*d]) and x_hat the prediction from the input rows.

Threshold statistics (`threshold_loop_collect` / `threshold_loop_compute`, the seed's names) are
what a batch-level rule's inference threshold is calibrated from (BatchTopK: train.sae.batchtopk).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Protocol

import torch
from torch import Tensor

from train.errors import TrainingError

if TYPE_CHECKING:
    from train.sae.base import BaseAutoencoder, Encoding


class Accumulator(Protocol):
    def update(self, x: Tensor, f: Tensor, x_hat: Tensor) -> None:
        """Add one evaluated batch: rows x [B, d], latents f [B, m], reconstruction x_hat [B, d]."""


class ReconstructionSums:
    """The sums behind evaluate_heldout's figures (float64 on the host, summed batch by batch)."""

    def __init__(self, d_sae: int, device: torch.device):
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.sq_err = self.xs_sq = self.l0 = 0.0
        self.xs_sum: float | Tensor = 0.0
        self.rows = 0

    def update(self, x: Tensor, f: Tensor, x_hat: Tensor) -> None:
        self.sq_err += float(((x - x_hat) ** 2).sum())
        self.xs_sum = self.xs_sum + x.double().sum(0)
        self.xs_sq += float((x.double() ** 2).sum())
        self.l0 += float((f > 0).sum())
        self.fired |= (f > 0).any(0)
        self.rows += x.shape[0]

    def figures(self) -> dict[str, float]:
        n = self.rows
        total_var = self.xs_sq - float((self.xs_sum**2).sum()) / n
        return {"mse": self.sq_err / n, "explained_variance": 1 - self.sq_err / total_var, "l0": self.l0 / n,
                "never_fired": int((~self.fired).sum()), "never_fired_fraction": float((~self.fired).float().mean()),
                "rows": n}


@torch.no_grad()
def evaluate_heldout(sae: BaseAutoencoder, store, max_batches: int = 50, encoding: Encoding | None = None,
                     accumulators: Iterable[Accumulator] = (), plan=None) -> dict[str, float]:
    """Reconstruction figures (above) on up to max_batches held-out batches of `store`.

    encoding: how to encode (an entry of sae.encodings()); None: sae.encode(x). Every accumulator
    sees every evaluated batch. plan: the sites the model reads and predicts (train.site_pairs.
    SitePlan; None: the store's batches are an SAE's rows). The SAE's train/eval mode is restored
    afterwards."""
    was_training = sae.training
    sae.eval()
    device = next(sae.parameters()).device
    sums = ReconstructionSums(sae.d_sae, device)
    extra = list(accumulators)
    try:
        for i, batch in enumerate(store.eval_batches()):
            if i >= max_batches:
                break
            x, y = (batch, None) if plan is None else plan.pair(batch)
            x = x.to(device)
            f = sae.encode(x) if encoding is None else encoding.encode(sae, x)
            if y is None:
                x_hat = sae.decode(f)
            else:  # a transcoder: its prediction of the target, flattened per row
                x_hat = sae.decode(f, x).reshape(x.shape[0], -1)
                x, f = y.to(device).reshape(x.shape[0], -1), f.reshape(x.shape[0], -1)
            for acc in extra:
                acc.update(x, f, x_hat)
            sums.update(x, f, x_hat)
    finally:
        sae.train(was_training)
    if sums.rows == 0:
        raise TrainingError("the store has no held-out rows to evaluate on; set heldout_shards >= 1")
    return sums.figures()


@torch.no_grad()
def threshold_loop_collect(sae: BaseAutoencoder, batches, n_batches: int) -> dict[str, Tensor]:
    """Statistics of a batch-level rule's selections over held-out batches (its training-time
    encode, `use_threshold=False`).

    Returns sums over batches of: the smallest kept activation of each batch (global), and each
    latent's smallest kept activation in batches where it fired (per-feature), with counts.
    """
    m = sae.d_sae
    dev = next(sae.parameters()).device
    stats = {"global_sum": torch.zeros((), dtype=torch.float64, device=dev), "global_n": torch.zeros((), device=dev),
             "feature_sum": torch.zeros(m, dtype=torch.float64, device=dev), "feature_n": torch.zeros(m, device=dev)}
    for i, x in enumerate(batches):
        if i >= n_batches:
            break
        f = sae.encode(x.to(dev), use_threshold=False)
        kept = f > 0
        if not kept.any():
            continue
        stats["global_sum"] += f[kept].min().double()
        stats["global_n"] += 1
        fired = kept.any(0)
        mins = torch.where(kept, f, torch.full_like(f, float("inf"))).min(0).values
        stats["feature_sum"] += torch.where(fired, mins, torch.zeros_like(mins)).double()
        stats["feature_n"] += fired.float()
    return stats


def threshold_loop_compute(stats: dict[str, Tensor], kind: str) -> Tensor | float:
    """Global threshold (mean over batches of the smallest kept activation), or per-feature
    thresholds (each latent's mean smallest kept activation; the global value where it never fired)."""
    if float(stats["global_n"]) == 0:
        raise TrainingError("no held-out batch produced an active latent; cannot calibrate a threshold")
    global_t = float(stats["global_sum"] / stats["global_n"])
    if kind == "global":
        return global_t
    per = stats["feature_sum"] / stats["feature_n"].clamp_min(1)
    return torch.where(stats["feature_n"] > 0, per, torch.full_like(per, global_t)).float()
