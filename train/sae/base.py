"""The SAE's shape: parameters, init, encode/decode, the loss assembly, dead latents, decoder upkeep.

Shapes: x [B, d] (d = d_in), latents f [B, m] (m = d_sae), W_enc [d, m], b_enc [m],
W_dec [m, d], b_dec [d]. The encoder sees x - b_dec; x_hat = f @ W_dec + b_dec.

Loss conventions (the same for every variant):
- mse = mean over tokens of sum over d of (x_hat - x)^2: the per-token squared error, as in
  Anthropic's and SAELens's standard/JumpReLU losses. With the dataset scaled so E||x||^2 = d,
  predicting zero costs about d; the sparsity coefficients are on that scale.
- loss = mse + sparsity + aux (+ any further reconstruction terms a rule adds through
  `reconstruction_losses`, e.g. Matryoshka's per-prefix errors, Gated's gate-path error).
  `losses` holds those terms (they sum to `loss`) and the detached metrics "l0" (mean active
  latents per token), "l1" (mean sum_i |f_i|) and "explained_variance". "mse" is always the
  whole SAE's error. AuxK: train.sae.losses.

Dead latents: `tokens_since_fired` counts tokens (not batches) since each latent was last
non-zero. forward() updates it in training mode; a latent is dead once the count exceeds
`dead_tokens_threshold`.

What a sparsity rule (a mixin placed before this class, e.g. train.sae.topk.TopK) provides:
`activation(pre) -> f`, optionally `sparsity_loss(f, pre)` and `reconstruction_losses(x, x_hat,
f, pre, active)`, with `fast = True` a `sparse_encode(x, center)` that selects the active latents
through train.kernels, and with a schedule `set_training_tokens(tokens)` (the trainer calls it
before every step with the tokens seen so far; what it sets must be a pure function of them, so
that a resumed run repeats it). Cost of such a
training forward: the batch's active latents stay a sparse list (`Active`), and the metrics, the
dead-latent update and `SAEOutput.fired` are taken from it, so beyond the encoder matmul and the
selection only `latents` (a zero fill and a scatter) touches [B, m] memory.

Threshold rules (f_i nonzero only where z_i is above a floor: Vanilla's ReLU, JumpReLU) set
`selects_active` and define `active_floor()`, `active_values(z, cols)` and
`active_sparsity_loss(active, n_rows)`. With `sparse_fraction` > 0 (config keys sparse_fraction
and sparse_kernels) a training forward lists the entries above the floor; when they number at
most sparse_fraction x B x m (the batch's mean selected count per token against the width: the
sparse kernels' cost is their total, as the list is flat and unpadded), the decode, the decoder's
gradient and the encoder's weight gradient go through them (train.kernels.SelectedEncode and
SelectedDecode), the same function as the dense path up to float rounding, and with
forward(latents=False) (the trainer's) no [B, m] latents are formed; otherwise, or when the floor
is None (a loss term with dense gradients, e.g. JumpReLU's pre_act_coeff), the step is the dense
one. The declarations the rest of train/ reads (config keys, run label, encodings, calibration, export form) have their
defaults at the end of this class; the package docstring (train.sae) lists them.
"""

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from train.kernels import CenteredEncode, SelectedDecode, SelectedEncode, column_order, select_above, sparse_decode
from train.sae.losses import auxk_loss, explained_variance


class SAEOutput(NamedTuple):
    x_hat: Tensor  # [B, d] reconstruction
    latents: Tensor | None  # [B, m] post-activation f; None when forward(latents=False) took a sparse path
    pre_acts: Tensor  # [B, m] pre-activations z (without grad on the fast TopK/BatchTopK paths)
    loss: Tensor  # scalar: losses["mse"] + losses["sparsity"] + losses["aux"] (+ a rule's reconstruction terms)
    losses: dict[str, Tensor]  # scalars: mse, sparsity, aux; detached l0, l1, explained_variance
    l0: Tensor  # [B] float, number of non-zero latents per token (detached)
    fired: Tensor  # [m] int64, tokens of the batch on which each latent was non-zero (detached)


class Active(NamedTuple):
    """A batch's selected latents, flat: vals [n] (differentiable), rows [n] and cols [n] int64;
    on a threshold rule's selected-entries path also pre [n], their raw pre-activations (detached),
    and what the encoder read, x [B, d_in] and its centre [d_in], so that a loss can encode a block
    of columns afresh (`BaseAutoencoder.encode_columns`)."""

    vals: Tensor
    rows: Tensor
    cols: Tensor
    pre: Tensor | None = None
    x: Tensor | None = None
    center: Tensor | None = None


@dataclass(frozen=True)
class Encoding:
    """One way an SAE encodes at inference / evaluation (BaseAutoencoder.encodings).

    name: its key in eval.json; label: for people; use_threshold: passed to encode when not None
    (True: the calibrated threshold, False: the training-time batch rule); per_batch: a token's
    latents depend on the other tokens of its batch."""

    name: str
    label: str
    use_threshold: bool | None
    per_batch: bool = False
    width: int | None = None  # keep only the first `width` latents (a nested prefix, train.sae.matryoshka)

    def encode(self, sae: "BaseAutoencoder", x: Tensor) -> Tensor:
        """sae's latents of x [..., d] under this encoding -> [..., m] (zero beyond `width` when set)."""
        f = sae.encode(x) if self.use_threshold is None else sae.encode(x, use_threshold=self.use_threshold)
        if self.width is not None:
            f[..., self.width:] = 0
        return f


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (every variant keeps them all on one device)."""
    return next(model.parameters()).device


def center_of(sample: Tensor, method: str) -> Tensor:
    """A bias initialisation from a sample [N, d] -> [d]: "geometric_median" or "mean"."""
    if method == "geometric_median":
        return geometric_median(sample)
    if method == "mean":
        return sample.mean(0)
    raise ValueError(f"unknown b_dec init method {method!r}; use 'geometric_median' or 'mean'")


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

    Variants define `activation(pre) -> f` and may override `sparsity_loss(f, pre)`,
    `reconstruction_losses(...)`, `set_training_tokens(tokens)` and, with fast = True,
    `sparse_encode(x, center)` (the sparse-kernel training path).
    Keyword args shared by every variant:
      aux_k: latents used by AuxK (default d_in // 2); aux_coeff: AuxK weight (0 disables);
      dead_tokens_threshold: tokens without firing before a latent counts as dead;
      sparse_fraction: threshold rules only: the selected-entries path when the batch's entries
        above the floor are at most this fraction of B x m (0: always dense; module docstring);
      generator: torch.Generator for the init (else the global RNG); device, dtype.
    """

    arch = "base"  # the registered name (train.sae.registry.register sets it, and `title`, the name for people)
    title = "base"
    fast = False  # True: train through sparse_encode (the sparse kernels of train.kernels)
    selects_active = False  # True: a threshold rule (active_floor ...): the selected-entries path with sparse_fraction
    # Constructor keyword -> TrainConfig key, for the keys this variant reads beyond the shared ones.
    config_keys: dict[str, str] = {}
    # Keys added after checkpoints recorded their SAE's arguments: keyword -> (TrainConfig key, the
    # value that computes what the variant computed before). Passed (and so recorded) only when the
    # config's value differs from it, so that older records rebuild the SAE they describe.
    late_config_keys: dict[str, tuple[str, Any]] = {}

    # ----- what the variant declares about a training config (train.config, train.sae.registry)
    @classmethod
    def config_args(cls, cfg) -> dict:
        """Constructor keyword arguments (plain JSON values) of the SAE a post-initialised
        TrainConfig describes: d_in, d_sae and the shared keys, then the variant's `config_keys`."""
        args = {"d_in": cfg.d_in, "d_sae": cfg.dict_size, "aux_k": cfg.aux_k,
                "dead_tokens_threshold": cfg.dead_tokens_threshold}
        args.update({kw: getattr(cfg, key) for kw, key in cls.config_keys.items()})
        args.update({kw: getattr(cfg, key) for kw, (key, legacy) in cls.late_config_keys.items()
                     if getattr(cfg, key) != legacy})
        if cls.selects_active and cfg.sparse_kernels and cfg.sparse_fraction:  # recorded only when on
            args["sparse_fraction"] = cfg.sparse_fraction
        return args

    @classmethod
    def config_error(cls, cfg) -> str | None:
        """What is impossible about `cfg` for this variant (a one-line message naming the keys), or None."""
        return None

    @classmethod
    def run_label(cls, cfg) -> str:
        """The sparsity part of a default run name, e.g. "k32" or "l1_5" (train.config.default_run_name)."""
        raise NotImplementedError(f"{cls.__name__} must define run_label(cfg) to be trained from a config")

    @classmethod
    def site_label(cls, cfg) -> str:
        """The sites part of a default run name: the site an SAE reads (a transcoder names both)."""
        return cfg.site

    @classmethod
    def training_memory(cls, cfg) -> Any:
        """An estimate of the memory a training run of `cfg` needs (train.sae.clt.MemoryEstimate),
        checked before training; None: not estimated (SAEs and per-layer transcoders fit anywhere
        their cache does)."""
        return None

    def __init__(self, d_in: int, d_sae: int, *, aux_k: int | None = None, aux_coeff: float = 0.0,
                 dead_tokens_threshold: int = 10_000_000, generator: torch.Generator | None = None,
                 device=None, dtype: torch.dtype = torch.float32, sparse_fraction: float = 0.0):
        super().__init__()
        if not 0 <= sparse_fraction <= 1:
            raise ValueError(f"sparse_fraction must be in [0, 1], got {sparse_fraction}")
        self.sparse_fraction = sparse_fraction
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
        # AuxK's candidate latents ([n] int64, a superset of the dead set), kept by the trainer; None: read per call
        self.auxk_candidates: Tensor | None = None

    # ----- encode / decode -----
    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x - b_dec) @ W_enc + b_enc. x [B, d] -> [B, m] (b_dec's gradient is a matvec: CenteredEncode)."""
        return CenteredEncode.apply(x, self.b_dec, self.W_enc, self.b_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """f from z, [B, m] -> [B, m]; defined by each variant."""
        raise NotImplementedError(f"{type(self).__name__} must define activation()")

    def sparse_encode(self, x: Tensor, center: Tensor, latents: bool = True) -> tuple[Tensor | None, Tensor, Active, tuple]:
        """Fast training path of a sparsity rule: x [B, d] and the encoder's centre [d] (b_dec; a
        transcoder's b_in), encoded as x - center ->
        (f [B, m] (None unless latents), pre [B, m], the active set, (vals, idx, offsets) for
        train.kernels.sparse_decode)."""
        raise NotImplementedError(f"{type(self).__name__} sets fast but defines no sparse_encode()")

    def encode(self, x: Tensor) -> Tensor:
        """Latents f. x [..., d] -> [..., m] (leading dims are flattened into one batch)."""
        f = self.activation(self.pre_acts(x.reshape(-1, self.d_in)))
        return f.reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """x_hat = f @ W_dec + b_dec. f [..., m] -> [..., d]."""
        return f @ self.W_dec + self.b_dec

    def _encode_decode(self, x: Tensor, latents: bool = True) -> tuple[Tensor | None, Tensor, Tensor, Active | None]:
        """Training path: (f [B, m], pre [B, m], x_hat [B, d], the active set if kept sparse, else None);
        latents=False: f is None on the sparse-kernel and selected-entries paths (not formed)."""
        if self.fast:
            f, pre, active, (vals, idx, offsets) = self.sparse_encode(x, self.b_dec, latents)
            return f, pre, sparse_decode(vals, idx, self.W_dec, offsets) + self.b_dec, active
        pre = self.pre_acts(x)
        selected = self._select_active(x, self.b_dec, pre, latents)
        if selected is not None:
            f, active, decoded = selected
            return f, pre.detach(), decoded + self.b_dec, active
        f = self.activation(pre)
        return f, pre, self.decode(f), None

    def _select_active(self, x: Tensor, center: Tensor, pre: Tensor,
                       latents: bool = True) -> tuple[Tensor | None, Active, Tensor] | None:
        """A threshold rule's selected-entries path (module docstring): x [B, d], the encoder's
        centre [d] (b_dec; a transcoder's b_in), pre [B, m] the pre-activations of x - center ->
        (f [B, m] (None unless latents), the active set with its raw pre-activations, its decode
        f @ W_dec [B, d_out] without bias); None: take the dense path."""
        if not (self.selects_active and self.sparse_fraction):
            return None
        floor = self.active_floor()
        if floor is None:
            return None
        sel = select_above(pre.detach(), floor, int(self.sparse_fraction * pre.numel()))
        if sel is None:
            return None
        flat, rows, cols, offsets = sel
        by_column = column_order(cols, self.d_sae)  # shared by the encoder's and the decoder's backward
        z = SelectedEncode.apply(x, center, self.W_enc, self.b_enc, pre.detach(), flat, rows, cols, offsets, *by_column)
        vals = self.active_values(z, cols)
        f = None
        if latents:
            f = pre.new_zeros(pre.shape, dtype=vals.dtype)
            f.view(-1).index_put_((flat,), vals)  # in place on the fresh zeros (index_put would copy them)
        active = Active(vals, rows, cols, z.detach(), x, center)
        return f, active, SelectedDecode.apply(vals, self.W_dec, rows, cols, offsets, *by_column)

    def encode_columns(self, active: Active, cols: Tensor) -> Tensor:
        """The pre-activations of the selected-entries path's batch at latents cols [n] int64,
        differentiable: (x - center) @ W_enc[:, cols] + b_enc[cols] -> [B, n]."""
        return CenteredEncode.apply(active.x, active.center, self.W_enc.index_select(1, cols),
                                    self.b_enc.index_select(0, cols))

    @torch.no_grad()
    def _batch_stats(self, f: Tensor | None, active: Active | None, n_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(l0 [B] float, l1 scalar = mean_B sum_i |f_i|, fired [m] int64), from the sparse set when
        there is one (then f may be None, with n_rows = B). Counted and summed in float32 at least:
        under bf16 autocast f is bfloat16, whose integers are exact only up to 256."""
        B = f.shape[0] if f is not None else n_rows
        acc = torch.promote_types(f.dtype if f is not None else active.vals.dtype, torch.float32)  # bf16 counts stop at 256
        if active is None:  # float reductions only: bool masks and integer casts of [B, m] are slow on the CPU
            on = f.abs()
            l1 = on.sum(-1, dtype=acc).mean()
            on.sign_()  # 1 where f != 0; exact float counts (B < 2^24)
            return on.sum(-1, dtype=acc), l1, on.sum(0, dtype=acc).long()
        on = active.vals.detach() != 0
        l0 = torch.zeros(B, dtype=acc, device=on.device).index_add_(0, active.rows, on.to(acc))
        fired = torch.zeros(self.d_sae, dtype=torch.long, device=on.device).index_add_(0, active.cols, on.long())
        return l0, active.vals.detach().abs().sum(dtype=acc) / B, fired

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: one with every parameter, unless a variant gives some
        their own learning-rate factor ({"params": [...], "lr_scale": s}; train.training.make_optimizer)."""
        return [{"params": list(self.parameters())}]

    wants_init_sample = False  # True: init_from_sample needs the trainer's first batch (JumpReLU's init_l0)

    @torch.no_grad()
    def init_from_sample(self, sample: Tensor) -> None:
        """A variant's data-dependent init from a sample [N, d] of training rows (the trainer's first
        batch, after b_dec's init); the default has none."""

    def set_training_tokens(self, tokens: int) -> None:
        """Before each training step: the training tokens seen so far. Variants with a schedule
        (TopK's k annealing) set it from them here; the default has none."""

    # ----- losses -----
    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        """Unscaled sparsity penalty (scalar); zero for variants whose sparsity is structural (f may be None)."""
        return pre.new_zeros(())

    # ----- threshold rules' selected-entries path (selects_active; module docstring)
    def active_floor(self) -> Tensor | float | None:
        """A floor (scalar or [m], detached): f, the sparsity loss and their gradients depend only
        on the entries with z > floor; None: this configuration needs the dense path."""
        return None

    def active_values(self, z: Tensor, cols: Tensor) -> Tensor:
        """f at the selected entries: z [n] their raw pre-activations (differentiable), cols [n]."""
        raise NotImplementedError(f"{type(self).__name__} sets selects_active but defines no active_values()")

    def active_sparsity_loss(self, active: Active, n_rows: int) -> Tensor:
        """sparsity_loss from the selected entries alone (active.pre set), over a batch of n_rows tokens."""
        raise NotImplementedError(f"{type(self).__name__} sets selects_active but defines no active_sparsity_loss()")

    def reconstruction_losses(self, x: Tensor, x_hat: Tensor, f: Tensor, pre: Tensor,
                              active: Active | None) -> dict[str, Tensor]:
        """The loss's reconstruction terms, name -> scalar, all summed into the loss: "mse" (the
        per-token squared error of x_hat, always first) and any a rule adds. x, x_hat [B, d];
        f, pre [B, m]; active: the batch's sparse active set on the fast path, else None."""
        return {"mse": (x_hat - x).pow(2).sum(-1).mean()}

    def auxk_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor:
        """aux_coeff * normalised error of reconstructing x - x_hat.detach() from dead latents (train.sae.losses)."""
        return auxk_loss(self, x, x_hat, pre)

    def forward(self, x: Tensor, sparsity_coeff_scale: float | Tensor = 1.0, target: Tensor | None = None,
                latents: bool = True) -> SAEOutput:
        """x [B, d] -> SAEOutput. sparsity_coeff_scale multiplies the sparsity term (warm-up).
        target [B, d_out]: what the decoder predicts; None for an SAE, whose target is its input
        (a transcoder, train.sae.transcoder, predicts another site). latents=False (the trainer's
        steps, which read none): SAEOutput.latents is None where a path would form [B, m] only
        for it (the selected-entries path); the loss and the metrics are the same.

        In training mode this also updates the dead-latent counters.
        """
        f, pre, x_hat, active = self._encode_decode(x, latents)
        y = x if target is None else target
        l0, l1, fired = self._batch_stats(f, active, x.shape[0])
        if self.training:
            self._mark_fired(x.shape[0], fired)
        recon = self.reconstruction_losses(y, x_hat, f, pre, active)  # y: the target (an SAE's is x)
        selected = active is not None and active.pre is not None  # a threshold rule's selected-entries path
        sparsity = sparsity_coeff_scale * (self.active_sparsity_loss(active, x.shape[0]) if selected
                                           else self.sparsity_loss(f, pre))
        aux = self.auxk_loss(x, x_hat, pre) if target is None else self.auxk_loss(x, x_hat, pre, target=target)
        with torch.no_grad():
            metrics = {"l0": l0.mean(), "l1": l1, "explained_variance": explained_variance(y, x_hat)}
        loss = recon["mse"]
        for name, term in recon.items():
            if name != "mse":
                loss = loss + term
        loss = loss + sparsity + aux
        losses = {"mse": recon["mse"], "sparsity": sparsity, "aux": aux, **recon, **metrics}
        return SAEOutput(x_hat, f, pre, loss, losses, l0, fired)

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
        self.b_dec.copy_(center_of(sample, method))

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

    # ----- inference encodings and calibration (train.training after training, train.evaluation)
    needs_calibration = False  # True: inference needs calibrate() on held-out rows after training

    @property
    def calibrated(self) -> bool:
        """Whether the inference encoding is ready (always, unless the variant needs a calibration)."""
        return True

    def calibrate(self, batches, kind: str, n_batches: int) -> None:
        """Calibrate inference on up to n_batches held-out batches [B, d] (variants that need it)."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to calibrate")

    def encodings(self) -> list[Encoding]:
        """The ways this SAE encodes, first the one inference (and `train export`) uses."""
        return [Encoding("inference", f"{self.arch} encoder (per token)", None)]

    def final_results(self, evaluate: Callable[[Encoding], dict[str, Any]]) -> dict[str, Any]:
        """done.json's held-out results after training (and calibration); evaluate(encoding) gives
        train.heldout.evaluate_heldout's figures of one encoding."""
        return {"heldout": evaluate(self.encodings()[0])}

    def describe(self) -> dict[str, Any]:
        """Facts that reports record: k (active latents per token, None when not fixed) and
        threshold_kind (of a calibrated inference threshold; None when the variant has none)."""
        return {"k": None, "threshold_kind": None}

    # ----- export (train.export)
    saelens_arch: str | None = None  # the SAELens architecture this variant exports as; None: not exportable

    @torch.no_grad()
    def fold_scaling(self, scale_in: float, scale_out: float) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec (float32, CPU) of the same SAE for raw activations: it was
        trained on s_in x and predicts s_out x, and

            f     = act((s x - b_dec) W_enc + b_enc) = act((x - b_dec / s)(s W_enc) + b_enc)
            x_hat = (f W_dec + b_dec) / s            = f (W_dec / s) + b_dec / s

        so W_enc' = s_in W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s_out; b_enc (and any
        threshold: the pre-activations are the same numbers) unchanged. b_dec is on both sides of
        an SAE, so s_in must equal s_out (ValueError otherwise)."""
        if scale_in != scale_out:
            raise ValueError(f"an SAE reads and predicts the same activations: its input scaling {scale_in} and "
                             f"output scaling {scale_out} must be equal")
        f32 = {name: p.detach().to("cpu", torch.float32) for name, p in
               (("W_enc", self.W_enc), ("b_enc", self.b_enc), ("W_dec", self.W_dec), ("b_dec", self.b_dec))}
        return {"W_enc": f32["W_enc"] * scale_in, "b_enc": f32["b_enc"].clone(), "W_dec": f32["W_dec"] / scale_out,
                "b_dec": f32["b_dec"] / scale_out}

    @torch.no_grad()
    def export_tensors(self, scale_in: float, scale_out: float) -> dict[str, Tensor]:
        """The tensors of the exported form with the dataset scaling folded in (float32, CPU):
        fold_scaling's, then the inference threshold [m] where the variant has one."""
        out = self.fold_scaling(scale_in, scale_out)
        threshold = self.inference_threshold()
        if threshold is not None:
            out["threshold"] = threshold.to("cpu", torch.float32)
        return out

    def export_config(self) -> dict[str, Any]:
        """Keys of the exported cfg.json that depend on the variant (e.g. SAELens topk's k)."""
        return {}
