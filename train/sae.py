"""Sparse autoencoder variants: one loss assembly in the base class, small hooks per variant.

Shapes: x [B, d] (d = d_in), latents f [B, m] (m = d_sae), W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d]. The encoder sees x - b_dec; x_hat = f @ W_dec + b_dec.

Loss conventions (the same for every variant):
- mse = mean over tokens of sum over d of (x_hat - x)^2: the per-token squared error, as in
  Anthropic's and SAELens's standard/JumpReLU losses. With the dataset scaled so E||x||^2 = d,
  predicting zero costs about d; the sparsity coefficients below are on that scale.
- loss = mse + sparsity + aux. `losses` holds those three terms (they sum to `loss`) and the
  detached metrics "l0" (mean active latents per token), "l1" (mean sum_i |f_i|) and
  "explained_variance".
- AuxK (dead latents, any variant with aux_coeff > 0; on by default for TopK and BatchTopK):
  e = x - x_hat.detach(); e_hat = decode of the top aux_k pre-activations among dead latents,
  without b_dec; aux = aux_coeff * sum ||e_hat - e||^2 / sum ||e||^2 over the batch. The
  denominator is the error of predicting zero (OpenAI's normalisation, taken over the batch
  rather than per token so a token with a tiny residual cannot dominate). It is exactly zero
  when no latent is dead, by masking, without a host sync.

Dead latents: `tokens_since_fired` counts tokens (not batches) since each latent was last
non-zero. forward() updates it in training mode; a latent is dead once the count exceeds
`dead_tokens_threshold`.

Cost of a training forward: the fast TopK/BatchTopK paths keep the batch's active latents as a
sparse list (`Active`) and take the metrics, the dead-latent update and `SAEOutput.fired` from
it, so beyond the encoder matmul and the selection only `latents` (a zero fill and a scatter)
touches [B, m] memory. On the CPU, AuxK reads the dead set on the host (there is no device to
wait for): nothing is computed when no latent is dead, and otherwise the fast paths work on the
dead latents' columns only, as small dense matmuls ([B, d] x [d, n_dead] and back). On CUDA it
stays sync-free (masking, as described above).
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from train.kernels import BatchTopKEncode, CenteredEncode, GatherEncode, TopKEncode, sparse_decode

SAE_REGISTRY: dict[str, type["BaseAutoencoder"]] = {}


def register(name: str):
    """Class decorator: make an SAE class buildable as build_sae(name, ...); sets cls.arch = name."""

    def deco(cls):
        if name in SAE_REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is already registered to {SAE_REGISTRY[name].__name__}")
        SAE_REGISTRY[name] = cls
        cls.arch = name
        return cls

    return deco


def build_sae(arch: str, **kwargs) -> "BaseAutoencoder":
    """Construct a registered SAE, e.g. build_sae("topk", d_in=768, d_sae=24576, k=32)."""
    if arch not in SAE_REGISTRY:
        raise ValueError(f"unknown SAE architecture {arch!r}; valid names: {', '.join(sorted(SAE_REGISTRY))}")
    return SAE_REGISTRY[arch](**kwargs)


class SAEOutput(NamedTuple):
    x_hat: Tensor  # [B, d] reconstruction
    latents: Tensor  # [B, m] post-activation f
    pre_acts: Tensor  # [B, m] pre-activations z (without grad on the fast TopK/BatchTopK paths)
    loss: Tensor  # scalar: losses["mse"] + losses["sparsity"] + losses["aux"]
    losses: dict[str, Tensor]  # scalars: mse, sparsity, aux; detached l0, l1, explained_variance
    l0: Tensor  # [B] float, number of non-zero latents per token (detached)
    fired: Tensor  # [m] int64, tokens of the batch on which each latent was non-zero (detached)


class Active(NamedTuple):
    """A batch's selected latents, flat: vals [n] (differentiable), rows [n] and cols [n] int64."""

    vals: Tensor
    rows: Tensor
    cols: Tensor


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2, a scalar. x, x_hat [B, d]."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1 - resid / total.clamp_min(torch.finfo(total.dtype).tiny)


def geometric_median(points: Tensor, n_iter: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld iterations from the mean, in float64. points [N, d] -> [d]."""
    p = points.double()
    y = p.mean(0)
    for _ in range(n_iter):
        w = 1 / (p - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * p).sum(0) / w.sum()
    return y.to(points.dtype)


class BaseAutoencoder(nn.Module):
    """Parameters, init, decoder constraints, dead-latent counters and the loss assembly.

    Subclasses define `activation(pre) -> f` and may override `sparsity_loss(f, pre)` and
    `_encode_decode(x)` (a faster training path, which may also return its `Active` set).
    Keyword args shared by every variant:
      aux_k: latents used by AuxK (default d_in // 2); aux_coeff: AuxK weight (0 disables);
      dead_tokens_threshold: tokens without firing before a latent counts as dead;
      generator: torch.Generator for the init (else the global RNG); device, dtype.
    """

    arch = "base"
    fast = False  # TopK/BatchTopK: use the sparse kernels of train.kernels

    def __init__(self, d_in: int, d_sae: int, *, aux_k: int | None = None, aux_coeff: float = 0.0,
                 dead_tokens_threshold: int = 10_000_000, generator: torch.Generator | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.aux_k = d_in // 2 if aux_k is None else aux_k
        self.aux_coeff = aux_coeff
        self.dead_tokens_threshold = dead_tokens_threshold
        # Drawn on the generator's device (CPU by default) in float32, so a seed gives the same init everywhere.
        gen_device = generator.device if generator is not None else "cpu"
        W = torch.randn(d_sae, d_in, generator=generator, device=gen_device)
        W = (W / W.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.t().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long, device=device))

    # ----- encode / decode -----
    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x - b_dec) @ W_enc + b_enc. x [B, d] -> [B, m] (b_dec's gradient is a matvec: CenteredEncode)."""
        return CenteredEncode.apply(x, self.b_dec, self.W_enc, self.b_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """f from z, [B, m] -> [B, m]; defined by each variant."""
        raise NotImplementedError(f"{type(self).__name__} must define activation()")

    def encode(self, x: Tensor) -> Tensor:
        """Latents f. x [..., d] -> [..., m] (leading dims are flattened into one batch)."""
        f = self.activation(self.pre_acts(x.reshape(-1, self.d_in)))
        return f.reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """x_hat = f @ W_dec + b_dec. f [..., m] -> [..., d]."""
        return f @ self.W_dec + self.b_dec

    def _encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Active | None]:
        """Training path: (f [B, m], pre [B, m], x_hat [B, d], the active set if kept sparse, else None)."""
        pre = self.pre_acts(x)
        f = self.activation(pre)
        return f, pre, self.decode(f), None

    @torch.no_grad()
    def _batch_stats(self, f: Tensor, active: Active | None) -> tuple[Tensor, Tensor, Tensor]:
        """(l0 [B] float, l1 scalar = mean_B sum_i |f_i|, fired [m] int64), from the sparse set when there is one."""
        B = f.shape[0]
        if active is None:  # float reductions only: bool masks and integer casts of [B, m] are slow on the CPU
            on = f.abs()
            l1 = on.sum(-1).mean()
            on.sign_()  # 1 where f != 0; exact float counts (B < 2^24)
            return on.sum(-1), l1, on.sum(0).long()
        on = active.vals.detach() != 0
        l0 = torch.zeros(B, dtype=f.dtype, device=f.device).index_add_(0, active.rows, on.to(f.dtype))
        fired = torch.zeros(self.d_sae, dtype=torch.long, device=f.device).index_add_(0, active.cols, on.long())
        return l0, active.vals.detach().abs().sum() / B, fired

    # ----- losses -----
    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        """Unscaled sparsity penalty (scalar); zero for variants whose sparsity is structural."""
        return f.new_zeros(())

    def auxk_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """aux_coeff * normalised error of reconstructing x - x_hat.detach() from dead latents."""
        if self.aux_coeff == 0:
            return x.new_zeros(())
        dead = self.dead_mask()
        k_aux = min(self.aux_k, self.d_sae)
        if dead.device.type == "cpu":  # a host read costs nothing here: skip, or work on the dead block only
            dead_idx = dead.nonzero().squeeze(1)
            if dead_idx.numel() == 0:
                return x.new_zeros(())  # what the masked path computes, exactly, without computing it
            if self.fast:  # the dead latents as a dense [B, n_dead] block: small matmuls instead of gathers
                z = CenteredEncode.apply(x, self.b_dec, self.W_enc.index_select(1, dead_idx),
                                         self.b_enc.index_select(0, dead_idx))
                acts = z.relu()
                if k_aux < dead_idx.numel():  # keep each token's k_aux largest
                    top = z.detach().topk(k_aux, dim=1, sorted=False).indices
                    acts = acts * torch.zeros_like(acts).scatter_(1, top, 1.0)
                e = (x - x_hat).detach()
                e_hat = acts @ self.W_dec.index_select(0, dead_idx)
                aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
                return self.aux_coeff * aux
        masked = torch.where(dead, pre, -torch.inf)  # live latents can never be chosen (relu(-inf) = 0)
        if self.fast:
            idx = masked.detach().topk(k_aux, dim=1, sorted=False).indices
            vals = GatherEncode.apply(x - self.b_dec, self.W_enc, self.b_enc, masked.detach(), idx)
            e_hat = sparse_decode(vals, idx, self.W_dec)
        else:
            top, idx = masked.topk(k_aux, dim=1, sorted=False)
            e_hat = torch.zeros_like(pre).scatter_(1, idx, top.relu()) @ self.W_dec
        e = (x - x_hat).detach()
        aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
        return self.aux_coeff * aux * dead.any()

    def forward(self, x: Tensor, sparsity_coeff_scale: float | Tensor = 1.0) -> SAEOutput:
        """x [B, d] -> SAEOutput. sparsity_coeff_scale multiplies the sparsity term (warm-up).

        In training mode this also updates the dead-latent counters.
        """
        f, pre, x_hat, active = self._encode_decode(x)
        l0, l1, fired = self._batch_stats(f, active)
        if self.training:
            self._mark_fired(x.shape[0], fired)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = sparsity_coeff_scale * self.sparsity_loss(f, pre)
        aux = self.auxk_loss(x, x_hat, pre)
        with torch.no_grad():
            metrics = {"l0": l0.mean(), "l1": l1, "explained_variance": explained_variance(x, x_hat)}
        losses = {"mse": mse, "sparsity": sparsity, "aux": aux, **metrics}
        return SAEOutput(x_hat, f, pre, mse + sparsity + aux, losses, l0, fired)

    # ----- dead latents -----
    @torch.no_grad()
    def update_dead_counters(self, latents: Tensor) -> None:
        """Add the batch's token count to every latent, then zero those that fired. latents [..., m]."""
        flat = latents.reshape(-1, self.d_sae)
        self._mark_fired(flat.shape[0], (flat != 0).any(0))

    @torch.no_grad()
    def _mark_fired(self, n_tokens: int, fired: Tensor) -> None:
        """Add n_tokens to every counter, then zero those of the latents with fired != 0 ([m], bool or counts)."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired.bool(), 0)

    def dead_mask(self, threshold_tokens: int | None = None) -> Tensor:
        """[m] bool: no activation in more than threshold_tokens tokens (default dead_tokens_threshold)."""
        limit = self.dead_tokens_threshold if threshold_tokens is None else threshold_tokens
        return self.tokens_since_fired > limit

    # ----- parameter maintenance -----
    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec from a sample [N, d] of activations: "geometric_median" or "mean"."""
        if method == "geometric_median":
            center = geometric_median(sample)
        elif method == "mean":
            center = sample.mean(0)
        else:
            raise ValueError(f"unknown b_dec init method {method!r}; use 'geometric_median' or 'mean'")
        self.b_dec.copy_(center)

    @torch.no_grad()
    def make_decoder_unit_norm(self) -> None:
        """Renormalise each decoder row to unit L2 norm (call after the optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of W_dec.grad each row's component along that row (call before the step)."""
        if self.W_dec.grad is None:
            return
        W, grad = self.W_dec, self.W_dec.grad
        # grad -= (grad . w / |w|^2) w for each row w: row dot products and one fused update, no [m, d] temporaries
        coef = torch.linalg.vecdot(grad, W, dim=1) / W.norm(dim=1).clamp_min(1e-12).square()
        grad.addcmul_(coef.unsqueeze(1), W, value=-1)

    def inference_threshold(self) -> Tensor | None:
        """Per-feature threshold [m] for export as JumpReLU, or None when the variant has none."""
        return None


@register("vanilla")
class VanillaSAE(BaseAutoencoder):
    """f = relu(z); sparsity = l1_coeff * mean_B sum_i f_i ||W_dec,i||."""

    def __init__(self, d_in: int, d_sae: int, *, l1_coeff: float = 5.0, **base):
        super().__init__(d_in, d_sae, **base)
        self.l1_coeff = l1_coeff

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        return self.l1_coeff * (f @ self.W_dec.norm(dim=1)).mean()  # a matvec: no [B, m] temporary


@register("topk")
class TopKSAE(BaseAutoencoder):
    """f = relu of the k largest pre-activations of each token, zero elsewhere.

    fast=True trains through train.kernels (sparse backward and decode); fast=False is the
    dense reference path. AuxK is on by default (aux_coeff = 1/32).
    """

    def __init__(self, d_in: int, d_sae: int, *, k: int, fast: bool = True, aux_coeff: float = 1 / 32, **base):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        super().__init__(d_in, d_sae, aux_coeff=aux_coeff, **base)
        self.k, self.fast = k, fast

    def activation(self, pre: Tensor) -> Tensor:
        top, idx = pre.topk(self.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, top.relu())

    def _encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fast:
            return super()._encode_decode(x)
        vals, idx, pre = TopKEncode.apply(x - self.b_dec, self.W_enc, self.b_enc, self.k)
        f = torch.zeros_like(pre).scatter_(1, idx, vals)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.k)
        active = Active(vals.reshape(-1), rows, idx.reshape(-1))
        return f, pre, sparse_decode(vals, idx, self.W_dec) + self.b_dec, active


_THRESHOLD_KINDS = ("none", "global", "per_feature")


@register("batchtopk")
class BatchTopKSAE(BaseAutoencoder):
    """Training: keep the k*B largest entries of relu(z) over the batch (k per token on average).

    Inference: once a threshold is set (set_threshold), encode keeps z where z > threshold,
    JumpReLU style. `threshold` [m] is a buffer and `threshold_kind` is "none", "global" (one
    value for all features) or "per_feature"; both travel in the state dict. The fast path
    stores the batch's active set as a flat row-sorted list of k*B entries (see train.kernels);
    rows may hold any number of them, so there is no padding.
    """

    def __init__(self, d_in: int, d_sae: int, *, k: int, fast: bool = True, aux_coeff: float = 1 / 32, **base):
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        super().__init__(d_in, d_sae, aux_coeff=aux_coeff, **base)
        self.k, self.fast = k, fast
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
        top, idx = z.topk(self.k * pre.shape[0], sorted=False)
        return torch.zeros_like(z).scatter_(0, idx, top).view_as(pre)

    def encode(self, x: Tensor, use_threshold: bool | None = None) -> Tensor:
        """x [..., d] -> f [..., m]. use_threshold: None = the threshold if calibrated, else batch top-k."""
        if use_threshold is None:
            use_threshold = self.threshold_kind != "none"
        if not use_threshold:
            return super().encode(x)
        if self.threshold_kind == "none":
            raise ValueError("BatchTopKSAE has no calibrated threshold; call set_threshold() first")
        z = self.pre_acts(x.reshape(-1, self.d_in)).relu()
        return (z * (z > self.threshold)).reshape(*x.shape[:-1], self.d_sae)

    def _encode_decode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fast:
            return super()._encode_decode(x)
        vals, rows, cols, offsets, pre = BatchTopKEncode.apply(x - self.b_dec, self.W_enc, self.b_enc, self.k)
        f = torch.zeros_like(pre).index_put_((rows, cols), vals)
        return f, pre, sparse_decode(vals, cols, self.W_dec, offsets) + self.b_dec, Active(vals, rows, cols)

    def inference_threshold(self) -> Tensor | None:
        return None if self.threshold_kind == "none" else self.threshold.detach().clone()


# The step and the kernel as in-place float arithmetic: on the CPU, comparisons into bool masks and
# mixed bool/float products or torch.where run several times slower than float ops on [B, m].


def _heaviside_(u: Tensor) -> Tensor:
    """H(u) = 1{u > 0} in u's dtype, in place on u."""
    return u.sign_().clamp_(min=0)


def _rectangle_(u: Tensor, eps: float) -> Tensor:
    """K(u / eps) = 1{|u / eps| < 1/2} in u's dtype, in place on u (0.5 - a > 0 exactly when a < 0.5)."""
    return u.div_(eps).abs_().neg_().add_(0.5).clamp_(min=0).sign_()


class JumpReLUFn(torch.autograd.Function):
    """f = z * H(z - theta). z [B, m], theta [m] (already exp'd), eps: kernel bandwidth.

    d/dz = H(z - theta); d/dtheta = -(theta / eps) K((z - theta) / eps) (pseudo-derivative).
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return _heaviside_(z - theta).mul_(z)  # z * H(z - theta), one [B, m] allocation

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = _heaviside_(z - theta).mul_(grad)
        grad_theta = -(theta / ctx.eps) * _rectangle_(z - theta, ctx.eps).mul_(grad).sum_to_size(theta.shape)
        return grad_z, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(z - theta) as z's dtype. d/dz = 0; d/dtheta = -(1 / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return _heaviside_(z - theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(1 / ctx.eps) * _rectangle_(z - theta, ctx.eps).mul_(grad).sum_to_size(theta.shape)
        return z.new_zeros(()).expand_as(z), grad_theta, None  # an exact zero that allocates nothing


@register("jumprelu")
class JumpReLUSAE(BaseAutoencoder):
    """f = z * H(z - theta), theta = exp(log_threshold) [m], computed outside the autograd functions.

    sparsity="l0": l0_coeff * mean_B sum_i H(z_i - theta_i), the step on the pre-activation z.
    sparsity="tanh": l0_coeff * mean_B sum_i tanh(tanh_c * |f_i| ||W_dec,i||), a smooth proxy
    whose gradient also reaches the encoder. bandwidth is the kernel width eps. AuxK is off unless
    aux_coeff > 0.
    """

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
