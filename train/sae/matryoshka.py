"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima et al. 2025): nested prefixes of one dictionary.

Widths m_1 < m_2 < ... < m_n = m. Training selects latents as BatchTopK does, over all m latents
at once (the k*B largest entries of relu(z) in the batch), and reconstructs x once per prefix
with only that prefix's latents, each reconstruction with b_dec:

    x_hat_i = f[:, :m_i] @ W_dec[:m_i] + b_dec,     loss = sum_i mse(x_hat_i) + sparsity + AuxK

(the sum over prefixes, as the paper's equation and SAELens 6.54's
MatryoshkaBatchTopKTrainingSAE; the paper's released code and dictionary_learning average the
prefixes instead, a constant factor 1/n). The outermost prefix is the whole SAE, so its term is
the ordinary "mse"; the inner ones are logged as "mse_prefix/<m_i>". AuxK (dead latents
reconstruct the whole SAE's residual, aux_coeff 1/32) is BatchTopK's.

Cost: on the sparse-kernel path the inner reconstructions are decoded from the batch's active
set (k*B entries, train.kernels), band by band (latents m_{j-1}..m_j) and summed cumulatively, so
they cost at most one more sparse decode (O(k B d)) next to BatchTopK's step, never n dense
[B, m] x [m, d] products.

Inference is BatchTopK's: a threshold calibrated on held-out rows after training (global or per
feature), exported as SAELens' `jumprelu` with that threshold; a prefix of the exported SAE is
its first m_i latents (rows of W_dec, columns of W_enc).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch
from torch import Tensor

from train.kernels import row_offsets, sparse_decode
from train.sae.base import Active, BaseAutoencoder, Encoding
from train.sae.batchtopk import BatchTopK
from train.sae.registry import register


def _parse_width(item: str | int | float) -> int | Fraction:
    """One width: an int is a number of latents; "1/16", "0.25" (or a float) a fraction of d_sae."""
    if isinstance(item, bool):
        raise ValueError(f"{item!r} is not a width")
    if isinstance(item, int):
        return item
    if isinstance(item, float):
        return Fraction(item).limit_denominator(1 << 20)
    text = str(item).strip()
    try:
        if "/" in text or "." in text or "e" in text.lower():
            return Fraction(text).limit_denominator(1 << 20)
        return int(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is neither a number of latents (288) nor a fraction (1/16, 0.25)") from None


def parse_widths(spec: str | Sequence[str | int | float]) -> list[int | Fraction]:
    """The widths of a spec ("1/16,1/4" or a sequence), unresolved. ValueError naming a bad item."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no widths given")
    out = [_parse_width(s) for s in items]
    for w in out:
        if isinstance(w, Fraction) and not 0 < w <= 1:
            raise ValueError(f"fraction {w} is not in (0, 1]")
    return out


def prefix_widths(spec: str | Sequence[str | int | float], d_sae: int) -> tuple[int, ...]:
    """Resolved prefix widths, increasing, ending at d_sae (appended when the spec stops short).
    Fractions of d_sae are rounded to the nearest latent. ValueError says what is wrong."""
    widths = [int(round(w * d_sae)) if isinstance(w, Fraction) else w for w in parse_widths(spec)]
    if not all(1 <= w <= d_sae for w in widths):
        raise ValueError(f"widths {widths} must lie in 1..{d_sae} (dict_size)")
    if widths[-1] != d_sae:
        widths.append(d_sae)
    for a, b in zip(widths, widths[1:]):
        if not a < b:
            raise ValueError(f"widths {widths} must increase (the whole dictionary, {d_sae}, is always the last; "
                             "write fractions as 1/4 or 0.25)")
    return tuple(widths)


class MatryoshkaBatchTopK(BatchTopK):
    """Sparsity rule: BatchTopK's selection, with a reconstruction term per nested prefix (module
    docstring). widths: a spec ("1/16,1/4", or a sequence of ints / fractions), resolved against
    d_sae into `self.widths` (increasing, ending at d_sae)."""

    config_keys = {**BatchTopK.config_keys, "widths": "matryoshka_widths"}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        problem = super().config_error(cfg)
        if problem:
            return problem
        try:
            if cfg.dict_size is None:
                parse_widths(cfg.matryoshka_widths)
            else:
                prefix_widths(cfg.matryoshka_widths, cfg.dict_size)
        except ValueError as e:
            return f"matryoshka_widths={cfg.matryoshka_widths!r}: {e}"
        return None

    def __init__(self, d_in: int, d_sae: int, *, widths: str | Sequence[str | int | float] = "1/16,1/4", **rule):
        super().__init__(d_in, d_sae, **rule)
        self.widths = prefix_widths(widths, d_sae)

    def describe(self) -> dict:
        return {**super().describe(), "widths": list(self.widths)}

    # ----- training: one reconstruction term per inner prefix
    def prefix_reconstructions(self, f: Tensor | None, active: Active | None = None,
                               n_rows: int | None = None) -> list[tuple[int, Tensor]]:
        """(m_i, f[:, :m_i] @ W_dec[:m_i] + b_dec [B, d]) for each inner prefix m_i < m, built band by
        band; from the sparse active set when given (its flat rows / cols / vals; f may then be None,
        with n_rows = B), else from f [B, m]."""
        inner = self.widths[:-1]
        out: list[tuple[int, Tensor]] = []
        recon: Tensor = self.b_dec
        if active is None:
            lo = 0
            for w in inner:
                recon = recon + f[:, lo:w] @ self.W_dec[lo:w]
                out.append((w, recon))
                lo = w
            return out
        B = f.shape[0] if f is not None else n_rows
        band = torch.bucketize(active.cols, torch.tensor(inner, device=active.cols.device), right=True)
        for j, w in enumerate(inner):
            sel = (band == j).nonzero().squeeze(1)  # still row-sorted
            part = sparse_decode(active.vals.index_select(0, sel), active.cols.index_select(0, sel), self.W_dec,
                                 row_offsets(active.rows.index_select(0, sel), B))
            recon = recon + part
            out.append((w, recon))
        return out

    def reconstruction_losses(self, x: Tensor, x_hat: Tensor, f: Tensor, pre: Tensor,
                              active: Active | None) -> dict[str, Tensor]:
        terms = super().reconstruction_losses(x, x_hat, f, pre, active)
        for w, recon in self.prefix_reconstructions(f, active, x.shape[0]):
            terms[f"mse_prefix/{w}"] = (recon - x).pow(2).sum(-1).mean()
        return terms

    # ----- inference: BatchTopK's, and each inner prefix alone
    def encodings(self) -> list[Encoding]:
        """BatchTopK's (the calibrated threshold first, then batch top-k), then, once calibrated,
        each inner prefix alone under the threshold ("prefix_<m_i>")."""
        out = super().encodings()
        if self.calibrated:
            out += [Encoding(f"prefix_{w}", f"the first {w} of {self.d_sae} latents alone (calibrated threshold)",
                             True, width=w) for w in self.widths[:-1]]
        return out

    def final_results(self, evaluate) -> dict:
        """BatchTopK's results and "heldout_prefix": {m_i: figures of the first m_i latents alone}."""
        results = super().final_results(evaluate)
        results["heldout_prefix"] = {str(e.width): evaluate(e) for e in self.encodings() if e.width is not None}
        return results


@register("matryoshka")
class MatryoshkaSAE(MatryoshkaBatchTopK, BaseAutoencoder):
    """Matryoshka BatchTopK: BatchTopK training with one reconstruction term per nested prefix of
    the dictionary (see the module docstring); inference as BatchTopK (calibrated threshold)."""

    title = "Matryoshka BatchTopK"
