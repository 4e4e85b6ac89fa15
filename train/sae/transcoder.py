"""Transcoders: the encoder reads one site, the decoder predicts another; any sparsity rule.

Shapes: x [B, d_in] (the input site, e.g. mlp_in = blocks.L.ln2.hook_normalized), y [B, d_out]
(the target site, e.g. blocks.L.hook_mlp_out), latents f [B, m]. Parameters: b_in [d_in] (the
input's centre, initialised like an SAE's b_dec from a sample of the input site), W_enc [d_in, m],
b_enc [m], W_dec [m, d_out] (unit rows, kept so as an SAE's are), b_dec [d_out] (initialised from
the target site), and for the skip variant W_skip [d_out, d_in], a dense linear map from input to
target initialised at zero (Paulo et al. 2025, "Transcoders beat sparse autoencoders"):

    z = (x - b_in) W_enc + b_enc;   f = rule(z);   y_hat = f W_dec + b_dec  (+ x W_skip^T)
    loss = mean_B sum_d (y_hat - y)^2 + sparsity + AuxK (the residual y - y_hat, from dead latents)

A transcoder is a shape, like BaseAutoencoder (whose encode path and decoder upkeep it keeps), and
the sparsity rule is any registered SAE variant's rule that touches only the encoder side (config
key `sparsity`; `composable` decides): `build_sae("transcoder", sparsity="topk", d_in=.., d_sae=..,
k=32)` composes the class (TopK, Transcoder) once, cached, without a class per combination written
by hand; the checkpoint's record (arch "transcoder", args with "sparsity") rebuilds it alone.

Export (train.export, train.export_circuit_tracer). SAELens 6's transcoders and circuit-tracer's
have no input centre: z = x W_enc + b_enc. The dataset scaling (trained on s_in x, predicting
s_out y) and b_in fold exactly: W_enc' = s_in W_enc, b_enc' = b_enc - b_in W_enc, W_dec' =
W_dec / s_out, b_dec' = b_dec / s_out, W_skip' = W_skip s_in / s_out; thresholds unchanged.
Forms: ReLU + L1 -> "transcoder" / "skip_transcoder"; JumpReLU and calibrated BatchTopK ->
"jumprelu_transcoder" / "jumprelu_skip_transcoder"; TopK has no SAELens or circuit-tracer
transcoder form (refused at export).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from train.kernels import CenteredEncode, sparse_decode
from train.sae.base import Active, BaseAutoencoder, center_of
from train.sae.losses import auxk_loss
from train.sae.registry import SAE_REGISTRY, register

DEFAULT_SPARSITY = "topk"
# What a rule must leave to the shape to compose with it (the decoder side, the input centre, the loss).
SHAPE_METHODS = ("forward", "decode", "_encode_decode", "pre_acts", "auxk_loss", "init_b_dec", "fold_scaling",
                 "export_tensors", "make_decoder_unit_norm", "remove_parallel_decoder_grad")
# The transcoder form of a rule's exported SAE form (SAELens' transcoder architectures).
_TRANSCODER_FORMS = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}


def rule_of(name: str) -> type | None:
    """The sparsity rule of registered variant `name` when it composes with another shape: the
    mixin of `class XSAE(Rule, BaseAutoencoder)` that defines none of SHAPE_METHODS; else None."""
    cls = SAE_REGISTRY.get(name)
    if cls is None or getattr(cls, "composes_rule", False) or cls.__bases__[1:] != (BaseAutoencoder,):
        return None
    rule = cls.__bases__[0]
    if any(m in vars(k) for k in rule.__mro__[:-1] for m in SHAPE_METHODS):
        return None
    return rule


def sparsity_names() -> tuple[str, ...]:
    """The registered variants whose rule composes with a transcoder shape, in registration order."""
    return tuple(name for name in SAE_REGISTRY if rule_of(name) is not None)


def sparsity_of(cfg) -> str:
    return cfg.sparsity or DEFAULT_SPARSITY


_COMPOSED: dict[tuple[type, str], type] = {}


def compose(shape: type, sparsity: str) -> type:
    """The class (rule of `sparsity`, shape), made once and cached; ValueError for a rule that does not compose."""
    key = (shape, sparsity)
    if key not in _COMPOSED:
        rule = rule_of(sparsity)
        if rule is None:
            raise ValueError(f"sparsity {sparsity!r} does not compose with a {shape.title}; valid: "
                             f"{', '.join(sparsity_names())}")
        form = _TRANSCODER_FORMS.get(getattr(rule, "saelens_arch", None))
        if form is not None and shape.skip:
            form = form.replace("transcoder", "skip_transcoder")
        _COMPOSED[key] = type(f"{rule.__name__}{shape.__name__}", (rule, shape), {
            "rule": sparsity, "title": f"{SAE_REGISTRY[sparsity].title} {shape.title}", "__module__": __name__,
            "saelens_arch": form, "export_config": shape.export_config})
    return _COMPOSED[key]


@register("transcoder")
class Transcoder(BaseAutoencoder):
    """Encoder on the input site, decoder to the target site (module docstring); composed with a
    sparsity rule by `compose` (build_sae("transcoder", sparsity=..., ...)).

    d_out: target width (default d_in). output_bias=False keeps b_dec a zero buffer (a CLT's
    sources, whose output bias is the CLT's)."""

    rule: str | None = None  # the composed class's sparsity; None on the registered shape itself
    skip = False
    composes_rule = True
    site_layout = "pair"  # train.site_pairs: reads in_site, predicts out_site

    # ----- declarations about a config: the registered shape asks its composed class
    @classmethod
    def from_args(cls, sparsity: str = DEFAULT_SPARSITY, **kwargs) -> "Transcoder":
        return compose(cls, sparsity)(**kwargs)

    @classmethod
    def config_args(cls, cfg) -> dict:
        if cls.rule is None:
            return compose(cls, sparsity_of(cfg)).config_args(cfg)
        return {**super().config_args(cfg), "sparsity": cls.rule}

    @classmethod
    def config_error(cls, cfg) -> str | None:
        if cls.rule is not None:
            return super().config_error(cfg)
        if sparsity_of(cfg) not in sparsity_names():
            return f"sparsity={cfg.sparsity!r} does not compose with a {cls.title}; valid: {', '.join(sparsity_names())}"
        for key in ("in_site", "out_site"):
            if getattr(cfg, key) and "," in getattr(cfg, key):
                return f"{key}={getattr(cfg, key)!r} names several sites; a {cls.arch} reads one site and predicts one"
        if cfg.site is not None and cfg.in_site is not None and cfg.site != cfg.in_site:
            return f"site={cfg.site!r} differs from in_site={cfg.in_site!r}: a {cls.arch}'s site is the one it reads"
        return compose(cls, sparsity_of(cfg)).config_error(cfg)

    @classmethod
    def run_label(cls, cfg) -> str:
        return compose(cls, sparsity_of(cfg)).run_label(cfg) if cls.rule is None else super().run_label(cfg)

    @classmethod
    def site_label(cls, cfg) -> str:
        return f"{sparsity_of(cfg)}_{cfg.in_site}-{cfg.out_site}"

    # ----- the shape
    def __init__(self, d_in: int, d_sae: int, *, d_out: int | None = None, output_bias: bool = True, **base):
        super().__init__(d_in, d_sae, **base)  # tied init W_enc = W_dec^T (unit rows), b_enc, counters
        self.d_out = d_in if d_out is None else int(d_out)
        device, dtype = self.W_enc.device, self.W_enc.dtype
        if self.d_out != d_in:  # decoder rows [d_out]: its first d_in columns tied to the encoder, the rest drawn
            gen = base.get("generator")
            rest = torch.randn(d_sae, self.d_out - d_in, generator=gen, device=gen.device if gen is not None else "cpu")
            W = torch.cat([self.W_dec.detach().to(rest.device, torch.float32), rest / rest.norm(dim=1, keepdim=True)], 1)
            self.W_dec = nn.Parameter((W / W.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype))
        del self.b_dec
        b_dec = torch.zeros(self.d_out, device=device, dtype=dtype)
        if output_bias:
            self.b_dec = nn.Parameter(b_dec)
        else:
            self.register_buffer("b_dec", b_dec)
        self.b_in = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, device=device, dtype=dtype))

    def pre_acts(self, x: Tensor) -> Tensor:
        """z = (x - b_in) @ W_enc + b_enc. x [B, d_in] -> [B, m]."""
        return CenteredEncode.apply(x, self.b_in, self.W_enc, self.b_enc)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """y_hat = f @ W_dec + b_dec (+ x @ W_skip^T: the skip variant needs its input x [..., d_in])."""
        y = f @ self.W_dec + self.b_dec
        return y if not self.skip else y + self._skip(x)

    def _skip(self, x: Tensor | None) -> Tensor:
        if x is None:
            raise ValueError(f"a {self.title}'s prediction needs its input: call decode(f, x)")
        return x @ self.W_skip.t()

    def _encode_decode(self, x: Tensor, latents: bool = True) -> tuple[Tensor | None, Tensor, Tensor, Active | None]:
        if self.fast:
            f, pre, active, (vals, idx, offsets) = self.sparse_encode(x, self.b_in, latents)
            y = sparse_decode(vals, idx, self.W_dec, offsets) + self.b_dec
        else:
            pre = self.pre_acts(x)
            selected = self._select_active(x, self.b_in, pre, latents)
            if selected is None:
                f, active = self.activation(pre), None
                y = f @ self.W_dec + self.b_dec
            else:
                (f, active, decoded), pre = selected, pre.detach()
                y = decoded + self.b_dec
        return f, pre, (y if not self.skip else y + self._skip(x)), active

    def forward(self, x: Tensor, sparsity_coeff_scale: float | Tensor = 1.0, target: Tensor | None = None,
                latents: bool = True):
        """x [B, d_in], target [B, d_out] -> SAEOutput (BaseAutoencoder.forward's loss against target)."""
        if target is None:
            raise ValueError(f"a {self.title} predicts another site: call it with target=[B, {self.d_out}] rows")
        return super().forward(x, sparsity_coeff_scale, target=target, latents=latents)

    def auxk_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, target: Tensor | None = None) -> Tensor:
        return auxk_loss(self, x, x_hat, pre, target=target, center=self.b_in)

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, target: Tensor | None = None, method: str = "geometric_median") -> None:
        """b_in from a sample [N, d_in] of the input site, b_dec (when trained) from one [N, d_out] of the target."""
        self.b_in.copy_(center_of(sample, method))
        if target is not None and isinstance(self.b_dec, nn.Parameter):
            self.b_dec.copy_(center_of(target, method))

    # ----- export
    @torch.no_grad()
    def fold_scaling(self, scale_in: float, scale_out: float) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec (float32, CPU) for raw activations and no input centre
        (module docstring); b_enc' = b_enc - b_in W_enc is taken in float64."""
        cpu = {n: getattr(self, n).detach().to("cpu") for n in ("W_enc", "b_enc", "W_dec", "b_dec", "b_in")}
        b_enc = cpu["b_enc"].double() - cpu["b_in"].double() @ cpu["W_enc"].double()
        return {"W_enc": cpu["W_enc"].float() * scale_in, "b_enc": b_enc.float(), "W_dec": cpu["W_dec"].float() / scale_out,
                "b_dec": cpu["b_dec"].float() / scale_out}

    @torch.no_grad()
    def export_tensors(self, scale_in: float, scale_out: float) -> dict[str, Tensor]:
        """fold_scaling's tensors, the inference threshold [m] where the rule has one, W_skip' [d_out, d_in]."""
        out = super().export_tensors(scale_in, scale_out)
        if self.skip:
            out["W_skip"] = self.W_skip.detach().to("cpu", torch.float32) * (scale_in / scale_out)
        return out

    def export_config(self) -> dict[str, Any]:
        """SAELens' transcoder config keys: d_out, and no input centring."""
        return {"d_out": int(self.d_out), "apply_b_dec_to_input": False}


@register("skip_transcoder")
class SkipTranscoder(Transcoder):
    """A transcoder with a dense skip map W_skip [d_out, d_in] from input to target, initialised at zero."""

    skip = True
    title = "skip transcoder"


Transcoder.title = "transcoder"
