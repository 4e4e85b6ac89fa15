"""Cross-layer transcoder (CLT): one encoder per layer, decoders from each layer to every later one.

Shapes: L covered layers (the order of cfg.in_site's sites), x, y [B, L, d] (layer l's input
site and target site, stacked by train.site_pairs), m latents per layer. Source layer l is a
transcoder (train.sae.transcoder, composed with the run's sparsity rule) whose encoder reads x_l
and whose decoder writes the targets l..L-1 at once: W_dec_l [m, (L - l) d], its rows unit-norm
over all the layers they write. The output biases b_dec [L, d] are the CLT's own:

    f_l = rule_l((x_l - b_in_l) W_enc_l + b_enc_l)                        [B, m], per layer
    y_hat_t = b_dec_t + sum_{l <= t} f_l W_dec_l[:, t - l]                [B, d]
    loss = mean_B sum_t sum_d (y_hat_t - y_t)^2 + sum_l sparsity_l + sum_l AuxK_l

where AuxK_l reconstructs the residual of targets l.. from layer l's dead latents. The sparsity
is per layer: TopK keeps k per token and layer, BatchTopK k*B per layer, JumpReLU a threshold per
latent of each layer; each layer calibrates its own threshold. Latent i of layer l is global
latent l*m + i (d_sae = L*m; counters, densities and `encode` use that order).

Memory (`training_memory`, checked before training): with P parameters,
    P = L (d m + m + d)   encoders (W_enc, b_enc, b_in)
      + L(L+1)/2 m d      decoders (one block per pair l <= t)
      + L d (+ L m for JumpReLU's thresholds)
and training holds 16 P bytes (float32 weights, gradients and Adam's two moments) plus the
batch's working set, about 4 B' L (4 m + 4 d) bytes (B' the micro-batch: pre-activations,
latents and their gradients; inputs, targets and prediction). Decoders grow with L^2: 26 layers
of 16384 latents at d 2048 hold 12.65G parameters, 11.78G of them decoders: 188.5 GiB to train
before the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from shared.errors import UserError
from train.sae.base import Encoding, SAEOutput, center_of
from train.sae.jumprelu import JumpReLU
from train.sae.losses import explained_variance
from train.sae.registry import register
from train.sae.transcoder import DEFAULT_SPARSITY, Transcoder, compose, sparsity_names, sparsity_of


class MemoryLimitError(UserError):
    """A model's training would not fit in the memory available (or the configured limit)."""


def split_sites(value: str | None) -> list[str]:
    """A config's comma-separated site list -> names (empty for None)."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int  # P, every trained tensor's elements
    parameter_bytes: int  # 16 P: weights, gradients, Adam's two moments (float32)
    batch_bytes: int  # the working set of one (micro-)batch
    formula: str

    @property
    def total(self) -> int:
        return self.parameter_bytes + self.batch_bytes


def clt_memory(n_layers: int, d: int, m: int, batch: int, thresholds: bool = False) -> MemoryEstimate:
    """The memory of training a CLT of L = n_layers layers of m latents on d-wide sites (module docstring)."""
    L = n_layers
    params = L * (d * m + m + d) + L * (L + 1) // 2 * m * d + L * d + (L * m if thresholds else 0)
    batch_bytes = 4 * batch * L * (4 * m + 4 * d)
    formula = (f"P = L(dm + m + d) + L(L+1)/2 md + Ld{' + Lm' if thresholds else ''} = {params:,} parameters "
               f"(L={L}, d={d}, m={m}); 16 P bytes + 4 B L (4m + 4d) bytes for a batch of B={batch}")
    return MemoryEstimate(params, 16 * params, batch_bytes, formula)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(estimate: MemoryEstimate, available: int, where: str, limit_gib: float | None) -> None:
    """MemoryLimitError with the numbers when the estimate exceeds the limit (memory_limit_gib, else `available`)."""
    limit = int(limit_gib * 2**30) if limit_gib is not None else available
    if estimate.total <= limit:
        return
    what = f"memory_limit_gib={limit_gib:g}" if limit_gib is not None else f"{_gib(available)} available on {where}"
    raise MemoryLimitError(
        f"this clt needs about {_gib(estimate.total)} to train ({_gib(estimate.parameter_bytes)} for "
        f"{estimate.parameters:,} parameters with their gradients and Adam state, {_gib(estimate.batch_bytes)} for a "
        f"batch), more than {what}: {estimate.formula}. Cover fewer layers, lower dict_size or expansion, set "
        "micro_batch_size, or raise memory_limit_gib")


@register("clt")
class CrossLayerTranscoder(nn.Module):
    """L sources (composed transcoders) and the output biases b_dec [L, d] (module docstring).

    d_in: site width; d_sae: latents per layer (m); n_layers: L; sparsity: the rule; the rest are
    the rule's and BaseAutoencoder's keyword arguments, shared by every layer."""

    title = "CLT"
    composes_rule = True
    site_layout = "layers"  # train.site_pairs: one input and one target site per layer
    needs_calibration = False  # the instance's is its rule's (set in __init__)
    saelens_arch = None  # SAELens has no CLT (train export --format circuit-tracer writes one)

    # ----- declarations about a config (train.config, train.sae.registry)
    @classmethod
    def config_args(cls, cfg) -> dict:
        args = compose(Transcoder, sparsity_of(cfg)).config_args(cfg)  # d_in, d_sae, shared and rule keys, sparsity
        return {**args, "n_layers": len(split_sites(cfg.in_site)) or 1}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        if sparsity_of(cfg) not in sparsity_names():
            return f"sparsity={cfg.sparsity!r} does not compose with a clt; valid: {', '.join(sparsity_names())}"
        ins, outs = split_sites(cfg.in_site), split_sites(cfg.out_site)
        if "," in (cfg.in_site or "") + (cfg.out_site or "") and len(ins) != len(outs):
            return f"in_site names {len(ins)} sites and out_site {len(outs)}: a clt needs one of each per layer"
        if cfg.site is not None and ins and cfg.site != ins[0]:
            return f"site={cfg.site!r} differs from the clt's first input site {ins[0]!r}"
        return compose(Transcoder, sparsity_of(cfg)).config_error(cfg)

    @classmethod
    def run_label(cls, cfg) -> str:
        return compose(Transcoder, sparsity_of(cfg)).run_label(cfg)

    @classmethod
    def site_label(cls, cfg) -> str:
        ins, outs = split_sites(cfg.in_site), split_sites(cfg.out_site)
        kind = lambda name: name.split(".", 2)[-1]  # noqa: E731 - blocks.L.<hook> -> <hook>
        return f"{sparsity_of(cfg)}_{len(ins)}layers_{kind(ins[0])}-{kind(outs[0])}"

    @classmethod
    def training_memory(cls, cfg) -> MemoryEstimate:
        return clt_memory(len(split_sites(cfg.in_site)), cfg.d_in, cfg.dict_size, cfg.micro_batch_size or cfg.batch_size,
                          thresholds=issubclass(compose(Transcoder, sparsity_of(cfg)), JumpReLU))

    # ----- the model
    def __init__(self, d_in: int, d_sae: int, *, n_layers: int, sparsity: str = DEFAULT_SPARSITY, generator=None,
                 device=None, dtype: torch.dtype = torch.float32, **rule_args):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a clt needs at least one layer, got n_layers={n_layers}")
        self.d_in, self.d_latent, self.n_layers = d_in, d_sae, n_layers
        self.d_sae = n_layers * d_sae
        source = compose(Transcoder, sparsity)
        self.sources = nn.ModuleList(source(d_in, d_sae, d_out=(n_layers - l) * d_in, output_bias=False, generator=generator,
                                            device=device, dtype=dtype, **rule_args) for l in range(n_layers))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_in, device=device, dtype=dtype))
        self.register_buffer("tokens_since_fired", torch.zeros(n_layers, d_sae, dtype=torch.long, device=device))
        for src in self.sources:  # each layer counts into its row of the CLT's buffer (one tensor to save and merge)
            del src._buffers["tokens_since_fired"]
        self._link_counters()
        self.needs_calibration = source.needs_calibration
        self.dead_tokens_threshold = self.sources[0].dead_tokens_threshold
        self.fast = self.sources[0].fast

    def _link_counters(self) -> None:
        for l, src in enumerate(self.sources):
            src.tokens_since_fired = self.tokens_since_fired[l]

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)  # .to() may give the buffer new storage
        self._link_counters()
        return out

    @property
    def rule(self) -> str:
        return self.sources[0].rule

    # ----- the trainer's hooks (train.sae.base.BaseAutoencoder's), layer by layer
    @property
    def aux_coeff(self) -> float:
        return self.sources[0].aux_coeff

    @property
    def wants_init_sample(self) -> bool:
        return self.sources[0].wants_init_sample

    def param_groups(self) -> list[dict[str, Any]]:
        """One group with every parameter (b_dec first, as parameters() orders them), besides the
        groups a layer's rule gives their own learning-rate factor (JumpReLU's thresholds)."""
        plain, scaled = list(self.parameters(recurse=False)), []
        for src in self.sources:
            for group in src.param_groups():
                (scaled.append(group) if "lr_scale" in group else plain.extend(group["params"]))
        return [{"params": plain}, *scaled]

    @torch.no_grad()
    def init_from_sample(self, sample: Tensor) -> None:
        """Each layer's data-dependent init from its rows of a sample [N, L, d]."""
        for src, x_l in zip(self.sources, self._layers(sample)):
            src.init_from_sample(x_l)

    def set_training_tokens(self, tokens: int) -> None:
        for src in self.sources:
            src.set_training_tokens(tokens)

    def _layers(self, x: Tensor) -> list[Tensor]:
        if x.shape[-2:] != (self.n_layers, self.d_in):
            raise ValueError(f"a clt of {self.n_layers} layers reads [..., {self.n_layers}, {self.d_in}] rows, got "
                             f"{tuple(x.shape)}")
        return [x[..., l, :].contiguous() for l in range(self.n_layers)]

    def encode(self, x: Tensor, **kw) -> Tensor:
        """x [..., L, d] -> f [..., L*m] (layer l's latents at l*m..). kw: the rule's (use_threshold)."""
        return torch.cat([src.encode(x_l, **kw) for src, x_l in zip(self.sources, self._layers(x))], -1)

    def decode_target(self, feats: dict[int, Tensor], t: int) -> Tensor:
        """Target t's prediction from the latents f_l [N, m] of layers l <= t (all present) -> [N, d]."""
        y = self.b_dec[t].expand(feats[0].shape[0], self.d_in)
        for l in range(t + 1):
            W = self.sources[l].W_dec.view(self.d_latent, self.n_layers - l, self.d_in)[:, t - l]
            y = y + feats[l] @ W
        return y

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """f [..., L*m] -> y_hat [..., L, d]."""
        lead, L, d = f.shape[:-1], self.n_layers, self.d_in
        flat = f.reshape(-1, L, self.d_latent)
        acc = flat.new_zeros(flat.shape[0], L * d)
        for l, src in enumerate(self.sources):
            acc[:, l * d:] += flat[:, l] @ src.W_dec
        return (acc.view(-1, L, d) + self.b_dec).reshape(*lead, L, d)

    def forward(self, x: Tensor, sparsity_coeff_scale: float | Tensor = 1.0, target: Tensor | None = None,
                latents: bool = True) -> SAEOutput:
        """x, target [B, L, d] -> SAEOutput with x_hat [B, L, d], latents and pre_acts as tuples of
        the layers' [B, m] tensors, l0 [B] (all layers), fired [L*m]; losses add fvu/<l> and l0/<l>.
        latents: accepted for the trainer's call (BaseAutoencoder.forward); a clt forms every layer's."""
        if target is None:
            raise ValueError("a clt predicts its target sites: call it with target=[B, L, d] rows")
        B, L, d = x.shape[0], self.n_layers, self.d_in
        xs = self._layers(x)
        acc = x.new_zeros(B, L * d)
        runs = []
        for l, (src, x_l) in enumerate(zip(self.sources, xs)):
            f, pre, out, active = src._encode_decode(x_l)
            acc[:, l * d:] += out
            runs.append((f, pre, active))
        y_hat = acc.view(B, L, d) + self.b_dec
        stats = [src._batch_stats(f, active) for src, (f, _, active) in zip(self.sources, runs)]
        fired = torch.cat([s[2] for s in stats])
        if self.training:
            for src, s in zip(self.sources, stats):
                src._mark_fired(B, s[2])
        mse = (y_hat - target).pow(2).sum((-2, -1)).mean()
        sparsity = sparsity_coeff_scale * sum(src.sparsity_loss(f, pre) for src, (f, pre, _) in zip(self.sources, runs))
        aux = sum(src.auxk_loss(x_l, y_hat[:, l:].reshape(B, -1), pre, target=target[:, l:].reshape(B, -1))
                  for l, (src, x_l, (_, pre, _)) in enumerate(zip(self.sources, xs, runs)))
        l0 = sum(s[0] for s in stats)
        with torch.no_grad():
            metrics = {"l0": l0.mean(), "l1": sum(s[1] for s in stats),
                       "explained_variance": explained_variance(target.reshape(B, -1), y_hat.reshape(B, -1))}
            for l, s in enumerate(stats):
                metrics[f"l0/{l}"] = s[0].mean()
                metrics[f"fvu/{l}"] = 1 - explained_variance(target[:, l], y_hat[:, l])
        losses = {"mse": mse, "sparsity": sparsity, "aux": aux, **metrics}
        return SAEOutput(y_hat, tuple(r[0] for r in runs), tuple(r[1] for r in runs), mse + sparsity + aux, losses, l0, fired)

    # ----- dead latents and decoder upkeep (the trainer's calls, per layer)
    def dead_mask(self, threshold_tokens: int | None = None) -> Tensor:
        """[L*m] bool: no activation in more than threshold_tokens tokens (default dead_tokens_threshold)."""
        limit = self.dead_tokens_threshold if threshold_tokens is None else threshold_tokens
        return self.tokens_since_fired.reshape(-1) > limit

    def remove_parallel_decoder_grad(self) -> None:
        for src in self.sources:
            src.remove_parallel_decoder_grad()

    def make_decoder_unit_norm(self) -> None:
        for src in self.sources:
            src.make_decoder_unit_norm()

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, target: Tensor | None = None, method: str = "geometric_median") -> None:
        """Each layer's b_in from sample [N, L, d]; b_dec [L, d] from target [N, L, d]."""
        for l, src in enumerate(self.sources):
            src.init_b_dec(sample[:, l], method=method)
            if target is not None:
                self.b_dec[l].copy_(center_of(target[:, l], method))

    # ----- encodings and calibration (the rule's, per layer)
    def encodings(self) -> list[Encoding]:
        return self.sources[0].encodings()

    @property
    def calibrated(self) -> bool:
        return all(src.calibrated for src in self.sources)

    def calibrate(self, batches, kind: str, n_batches: int) -> None:
        """Each layer's rule calibrates on layer l of the held-out inputs [B, L, d]. `batches` is
        iterated once per layer: a re-iterable (train.site_pairs.EncoderInputs), not a one-shot iterator."""
        for l, src in enumerate(self.sources):
            src.calibrate((x[..., l, :] for x in batches), kind, n_batches)

    def final_results(self, evaluate: Callable[[Encoding], dict[str, Any]]) -> dict[str, Any]:
        encodings = self.encodings()
        out: dict[str, Any] = {"heldout": evaluate(encodings[0])}
        for enc in encodings[1:]:
            out[f"heldout_{enc.name}"] = evaluate(enc)
        if self.needs_calibration:
            out.update(threshold_kind=self.describe()["threshold_kind"], inference_l0=out["heldout"]["l0"],
                       k=self.describe()["k"])
        return out

    def describe(self) -> dict[str, Any]:
        return {**self.sources[0].describe(), "n_layers": self.n_layers, "latents_per_layer": self.d_latent}

    # ----- export (train.export_circuit_tracer)
    def inference_thresholds(self) -> list[Tensor | None]:
        return [src.inference_threshold() for src in self.sources]

    @torch.no_grad()
    def export_layers(self, scale_in: list[float], scale_out: list[float]) -> list[dict[str, Tensor]]:
        """Per source layer l, for raw activations without input centre (float32, CPU): W_enc [d, m],
        b_enc [m], W_dec [m, L - l, d] (target t's block divided by scale_out[t]), b_dec [d] (target
        l's bias / scale_out[l]) and threshold [m] where the rule has one."""
        L, d, m = self.n_layers, self.d_in, self.d_latent
        out = []
        for l, src in enumerate(self.sources):
            t = src.export_tensors(scale_in[l], 1.0)
            W_dec = t["W_dec"].view(m, L - l, d) / torch.tensor(scale_out[l:], dtype=torch.float32).view(1, -1, 1)
            layer = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": W_dec,
                     "b_dec": self.b_dec[l].detach().to("cpu", torch.float32) / scale_out[l]}
            if "threshold" in t:
                layer["threshold"] = t["threshold"]
            out.append(layer)
        return out
