"""Loss terms and metrics every variant shares: explained variance and the AuxK dead-latent loss.

AuxK (any variant with aux_coeff > 0; on by default for TopK and BatchTopK): e = x - x_hat.detach();
e_hat = decode of the top aux_k pre-activations among dead latents, without b_dec;
aux = aux_coeff * sum ||e_hat - e||^2 / sum ||e||^2 over the batch. The denominator is the error
of predicting zero (OpenAI's normalisation, taken over the batch rather than per token so a token
with a tiny residual cannot dominate). It is exactly zero when no latent is dead.

One code path on every device: AuxK works on a block of candidate latents known on the host,
`sae.auxk_candidates` ([n_cand] int64, a superset of the dead set), never on the whole [B, m]:
no candidates -> nothing is computed (no encode, no top-k, no decode); otherwise z on the block
([B, d] x [d, n_cand]), the live candidates masked out on the device, a top-k over the block when
aux_k < n_cand, and the decode from the block ([B, n_cand] x [n_cand, d]).

Who sets the candidates: the trainer, every `auxk_refresh_steps` steps (and at the first step
after a checkpoint or a restore, so that a resumed run refreshes where the uninterrupted one did),
by one host read (`refresh_auxk_candidates`): the latents whose counter exceeds
dead_tokens_threshold - horizon, horizon = the tokens until the next refresh. A counter grows by
at most the global batch per step, so every latent dead before the next refresh is in the block,
and the loss is the same function of the dead set as a fresh read every step would give. An SAE
used without a trainer (auxk_candidates None) reads its dead set on the host at each call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from train.kernels import CenteredEncode

if TYPE_CHECKING:
    from train.sae.base import BaseAutoencoder

AUXK_MAX_REFRESH_STEPS = 64  # at most this many steps between two host reads of the dead set
AUXK_HORIZON_FRACTION = 16  # the candidates' horizon is at most dead_tokens_threshold / this


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2, a scalar. x, x_hat [B, d]."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - resid / total.clamp_min(torch.finfo(total.dtype).tiny)


def auxk_refresh_steps(dead_tokens_threshold: int, batch_tokens: int) -> int:
    """Steps between two host reads of the dead set (>= 1): as many as keep the candidates'
    horizon (steps x batch_tokens) within dead_tokens_threshold / AUXK_HORIZON_FRACTION, at most
    AUXK_MAX_REFRESH_STEPS. A read is one device sync and a copy of n_cand indices."""
    return max(1, min(AUXK_MAX_REFRESH_STEPS, dead_tokens_threshold // (AUXK_HORIZON_FRACTION * batch_tokens)))


@torch.no_grad()
def refresh_auxk_candidates(sae: BaseAutoencoder, horizon_tokens: int) -> None:
    """Set sae.auxk_candidates: the latents that are dead now or would be after horizon_tokens
    more tokens without firing ([n_cand] int64 on sae's device; read on the host: one sync). A
    model made of per-layer sources (a CLT, train.sae.clt) sets each source's."""
    for part in getattr(sae, "sources", None) or (sae,):
        limit = part.dead_tokens_threshold - horizon_tokens
        part.auxk_candidates = (part.tokens_since_fired > limit).nonzero().squeeze(1)


def auxk_loss(sae: BaseAutoencoder, x: Tensor, x_hat: Tensor, pre: Tensor, target: Tensor | None = None,
              center: Tensor | None = None) -> Tensor:
    """aux_coeff * normalised error of reconstructing target - x_hat.detach() from sae's dead latents.

    x [B, d_in] what the encoder reads, centred by `center` (default b_dec); x_hat [B, d_out];
    target [B, d_out] (default x: an SAE); pre [B, m] the pre-activations of x (read on the dense
    path; the fast and selected-entries paths encode the candidate block afresh, since their pre
    carries no gradient).
    A scalar."""
    if sae.aux_coeff == 0:
        return x.new_zeros(())
    cand = sae.auxk_candidates
    if cand is None or cand.device != sae.tokens_since_fired.device:  # none kept (or the SAE moved): read now
        cand = sae.dead_mask().nonzero().squeeze(1)
    if cand.numel() == 0:
        return x.new_zeros(())  # no latent is dead: exactly the loss's value, without computing it
    dead = sae.dead_mask().index_select(0, cand)  # [n_cand] bool, on the device: no sync
    if sae.fast or not pre.requires_grad:  # pre without grad: the sparse paths' (or no grad wanted)
        z = CenteredEncode.apply(x, sae.b_dec if center is None else center, sae.W_enc.index_select(1, cand), sae.b_enc.index_select(0, cand))
    else:
        z = pre.index_select(1, cand)
    masked = torch.where(dead, z, -torch.inf)  # live candidates can never be chosen (relu(-inf) = 0)
    acts = masked.relu()
    k_aux = min(sae.aux_k, cand.numel())
    if k_aux < cand.numel():  # keep each token's k_aux largest among the dead
        top = masked.detach().topk(k_aux, dim=1, sorted=False).indices
        acts = acts * torch.zeros_like(acts).scatter_(1, top, 1.0)
    e = ((x if target is None else target) - x_hat).detach()
    e_hat = acts @ sae.W_dec.index_select(0, cand)
    aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
    return sae.aux_coeff * aux * dead.any()  # candidates that are all still live: zero, without a sync
