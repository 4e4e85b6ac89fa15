"""What each latent writes: its logit effect through the unembedding, and its nearest latents.

Logit effect (as sae_vis computes it, with TransformerLens' folded final-norm weight): for decoder
row w_j [d] (in raw activation units: W_dec / s, s the run's scaling factor) and the LM's
unembedding W_U [d, vocab],

    effect_j = (w_j * g) @ W_U            [vocab]

where g [d] is the elementwise gain of the final norm (LayerNorm / RMSNorm weight; 1 + weight for
Gemma's RMSNorm), or 1 when there is none or it is not used. The norm's division by the residual's
scale is not modelled (it is positive and shared by all tokens, so the order of tokens is the same).
We keep the `k` most promoted and most suppressed tokens per latent, computed over blocks of latents
so that only a [block, vocab] matrix exists at a time.

Nearest latents: the `k` other latents with the largest cosine between decoder rows, over blocks of
rows ([block, m] at a time, never the whole m x m matrix).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


class TopTokens(NamedTuple):
    """Per latent, [m, k]: ids and logit effects of the most promoted (descending) and most
    suppressed (ascending, i.e. most negative first) tokens."""

    pos_ids: Tensor
    pos_values: Tensor
    neg_ids: Tensor
    neg_values: Tensor


def unembedding(model: nn.Module) -> Tensor:
    """W_U [d_model, vocab] (float32, detached) of a causal LM."""
    out = model.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (unembedding) to read")
    return out.weight.detach().float().t()


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm before the unembedding (model.norm, transformer.ln_f, ...) or None."""
    base = getattr(model, "base_model", model)
    for holder in (base, getattr(base, "decoder", None), getattr(base, "language_model", None)):
        for name in _FINAL_NORM_NAMES:
            mod = getattr(holder, name, None) if holder is not None else None
            if isinstance(mod, nn.Module) and not isinstance(mod, nn.ModuleList):
                return mod
    return None


@torch.no_grad()
def norm_gain(norm: nn.Module, d: int) -> Tensor:
    """Elementwise gain g [d] of an elementwise-affine norm, measured rather than read from its
    weight (so Gemma's (1 + weight) needs no special case): for a zero-mean x whose mean square is
    1e6 (the norm's eps is then negligible), norm(x) - norm(-x) = 2 g x / rms(x); bias cancels."""
    p = next(norm.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x = torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0).double()
    x = x - x.mean()
    x = (x / x.pow(2).mean().sqrt() * 1000).to(device)
    dtype = p.dtype if p is not None else torch.float32
    xs = torch.stack([x, -x]).to(dtype)[:, None, :]  # [2, 1, d]: a batch of one-token sequences
    y = norm(xs).double()[:, 0, :]
    return ((y[0] - y[1]) * 1000 / (2 * x)).float().cpu()


@torch.no_grad()
def logit_effect(W_dec: Tensor, W_U: Tensor, gain: Tensor | None = None, k: int = 10, block: int = 1024) -> TopTokens:
    """Top promoted / suppressed tokens of each decoder row. W_dec [m, d], W_U [d, vocab], gain [d]."""
    W_dec = W_dec.float()
    if gain is not None:
        W_U = gain.to(W_U)[:, None] * W_U
    k = min(k, W_U.shape[1])
    parts: list[list[Tensor]] = [[], [], [], []]
    for i in range(0, W_dec.shape[0], block):
        eff = W_dec[i : i + block].to(W_U.device) @ W_U
        pv, pi = eff.topk(k, dim=1)
        nv, ni = (-eff).topk(k, dim=1)
        for lst, t in zip(parts, (pi, pv, ni, -nv)):
            lst.append(t.cpu())
    return TopTokens(*(torch.cat(p) for p in parts))


@torch.no_grad()
def nearest_latents(W_dec: Tensor, k: int = 5, block: int = 1024) -> tuple[Tensor, Tensor]:
    """(ids [m, k] int64, cosines [m, k] float32) of each latent's k nearest other latents by decoder
    cosine, largest first. Rows of zero norm have cosine 0 with every other row."""
    W = W_dec.float()
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = unit.shape[0]
    k = min(k, m - 1)
    ids, cos = [], []
    for i in range(0, m, block):
        sim = unit[i : i + block] @ unit.t()
        rows = torch.arange(i, min(i + block, m), device=sim.device)
        sim[rows - i, rows] = -float("inf")
        v, j = sim.topk(k, dim=1)
        ids.append(j.cpu())
        cos.append(v.cpu())
    return torch.cat(ids), torch.cat(cos)
