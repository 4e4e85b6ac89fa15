"""Loss terms and metrics every variant shares: explained variance and the AuxK dead-latent loss.

AuxK (any variant with aux_coeff > 0; on by default for TopK and BatchTopK): e = x - x_hat.detach();
e_hat = decode of the top aux_k pre-activations among dead latents, without b_dec;
aux = aux_coeff * sum ||e_hat - e||^2 / sum ||e||^2 over the batch. The denominator is the error
of predicting zero (OpenAI's normalisation, taken over the batch rather than per token so a token
with a tiny residual cannot dominate). It is exactly zero when no latent is dead, by masking,
without a host sync. On the CPU the dead set is read on the host (there is no device to wait
for): nothing is computed when no latent is dead, and otherwise the fast (sparse-kernel) variants
work on the dead latents' columns only, as small dense matmuls ([B, d] x [d, n_dead] and back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from train.kernels import CenteredEncode, GatherEncode, sparse_decode

if TYPE_CHECKING:
    from train.sae.base import BaseAutoencoder


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2, a scalar. x, x_hat [B, d]."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - resid / total.clamp_min(torch.finfo(total.dtype).tiny)


def auxk_loss(sae: BaseAutoencoder, x: Tensor, x_hat: Tensor, pre: Tensor, target: Tensor | None = None,
              center: Tensor | None = None) -> Tensor:
    """aux_coeff * normalised error of reconstructing target - x_hat.detach() from sae's dead latents.

    x [B, d_in] what the encoder reads, centred by `center` (default b_dec); x_hat [B, d_out];
    target [B, d_out] (default x: an SAE); pre [B, m] the pre-activations of x. A scalar."""
    if sae.aux_coeff == 0:
        return x.new_zeros(())
    y = x if target is None else target
    c = sae.b_dec if center is None else center
    dead = sae.dead_mask()
    k_aux = min(sae.aux_k, sae.d_sae)
    if dead.device.type == "cpu":  # a host read costs nothing here: skip, or work on the dead block only
        dead_idx = dead.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return x.new_zeros(())  # what the masked path computes, exactly, without computing it
        if sae.fast:  # the dead latents as a dense [B, n_dead] block: small matmuls instead of gathers
            z = CenteredEncode.apply(x, c, sae.W_enc.index_select(1, dead_idx),
                                     sae.b_enc.index_select(0, dead_idx))
            acts = z.relu()
            if k_aux < dead_idx.numel():  # keep each token's k_aux largest
                top = z.detach().topk(k_aux, dim=1, sorted=False).indices
                acts = acts * torch.zeros_like(acts).scatter_(1, top, 1.0)
            e = (y - x_hat).detach()
            e_hat = acts @ sae.W_dec.index_select(0, dead_idx)
            aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
            return sae.aux_coeff * aux
    masked = torch.where(dead, pre, -torch.inf)  # live latents can never be chosen (relu(-inf) = 0)
    if sae.fast:
        idx = masked.detach().topk(k_aux, dim=1, sorted=False).indices
        vals = GatherEncode.apply(x - c, sae.W_enc, sae.b_enc, masked.detach(), idx)
        e_hat = sparse_decode(vals, idx, sae.W_dec)
    else:
        top, idx = masked.topk(k_aux, dim=1, sorted=False)
        e_hat = torch.zeros_like(pre).scatter_(1, idx, top.relu()) @ sae.W_dec
    e = (y - x_hat).detach()
    aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
    return sae.aux_coeff * aux * dead.any()
