"""JumpReLU SAE: f = z * H(z - theta) with a learned per-latent threshold theta = exp(log_threshold)."""

import math

import torch
from torch import Tensor, nn

from train.sae.base import Active, BaseAutoencoder
from train.sae.functions import JumpReLUFn, StepFn
from train.sae.registry import register


DEFAULT_INIT_L0 = 32  # jumprelu_init_l0's default without a target (capped at dict_size / 16)
THRESHOLD_INIT = 0.001  # threshold_init's default, here and in train.config (tests/test_jumprelu.py pins both)


class JumpReLU:
    """Sparsity rule: f = z * H(z - theta), theta = exp(log_threshold) [m], computed outside the
    autograd functions (train.sae.functions). log_threshold and theta are float32 (the SAE's
    dtype) whatever autocast does to z: z - theta is taken in float32.

    sparsity="l0": l0_coeff * mean_B sum_i H(z_i - theta_i), the step on the pre-activation z;
    with target_l0 = T set instead the quadratic penalty around it (Gemma Scope 2, SAELens'
    "quadratic"): l0_coeff * mean_B (2 / T) (L0_b - T)^2, L0_b = sum_i H(z_bi - theta_i).
    sparsity="tanh": l0_coeff * mean_B sum_i tanh(tanh_c * |f_i| ||W_dec,i||), a smooth proxy
    whose gradient also reaches the encoder. bandwidth is the kernel width eps. Optional terms,
    added to the sparsity loss:
      pre_act_coeff   Anthropic's pre-activation loss, pre_act_coeff * mean_B sum_i
                      relu(theta_i - z_i) ||W_dec,i||: below-threshold pre-activations are pulled up,
                      so latents that never fire still learn; with pre_act_silent_tokens = N > 0
                      only over the latents silent for at least N training tokens
                      (tokens_since_fired >= N), so the ones that fire are left alone
      freq_coeff      a frequency penalty against too-dense latents: freq_coeff * sum_i
                      relu(p_i - freq_max), p_i = mean_B H(z_i - theta_i) (pseudo-derivative to theta),
                      so a latent firing on more than freq_max of the tokens pays freq_coeff more
                      per firing
    init_l0: when set, the thresholds are initialised from data (init_from_sample, the trainer's
    first batch): each latent's threshold sits between its k-th and (k+1)-th largest
    pre-activation, k = round(N init_l0 / m), so that the SAE starts at about init_l0 active latents
    per token and every latent fires at the same rate; None: threshold_init for every latent.
    threshold_lr_scale: log_threshold's learning rate is lr times this. Adam moves a parameter by
    about lr per step whatever the loss's scale, so at lr 4e-4 the thresholds change by about 10%
    over 1M tokens of batches of 4096 (245 steps), too slowly for the L0 terms to steer L0.
    AuxK is off unless aux_coeff > 0.

    A threshold rule (train.sae.base): with sparse_fraction set it trains through the entries with
    z > theta - bandwidth when they are few enough. These hold every active one and every one the
    kernel sees (|z - theta| < bandwidth / 2, with a margin of bandwidth / 2 against rounding), so
    the jump, the L0, quadratic, tanh and frequency terms and all their gradients, the thresholds'
    included, are computed on them alone. pre_act_coeff > 0 keeps the dense path: its gradient
    reaches W_enc at every below-threshold entry.
    """

    config_keys = {"l0_coeff": "l0_coeff", "sparsity": "jumprelu_sparsity", "bandwidth": "jumprelu_bandwidth",
                   "threshold_init": "threshold_init"}
    late_config_keys = {"target_l0": ("target_l0", None), "pre_act_coeff": ("jumprelu_pre_act_coeff", 0.0),
                        "pre_act_silent_tokens": ("jumprelu_pre_act_silent_tokens", 0),
                        "freq_coeff": ("jumprelu_freq_coeff", 0.0), "freq_max": ("jumprelu_freq_max", 0.1),
                        "init_l0": ("jumprelu_init_l0", 0.0),  # resolved by config_args
                        "threshold_lr_scale": ("jumprelu_threshold_lr_scale", 1.0)}
    saelens_arch = "jumprelu"  # with threshold = exp(log_threshold)
    selects_active = True

    @classmethod
    def config_error(cls, cfg) -> str | None:
        if cfg.target_l0 is not None:
            if cfg.jumprelu_sparsity != "l0":
                return (f"target_l0={cfg.target_l0:g} sets the quadratic L0 penalty; it needs jumprelu_sparsity='l0', "
                        f"not {cfg.jumprelu_sparsity!r}")
            if not 0 < cfg.target_l0 <= (cfg.dict_size or math.inf):
                return f"target_l0={cfg.target_l0:g} must be in (0, dict_size={cfg.dict_size}]"
        if cfg.jumprelu_init_l0 is not None and not 0 <= cfg.jumprelu_init_l0 <= (cfg.dict_size or math.inf):
            return f"jumprelu_init_l0={cfg.jumprelu_init_l0:g} must be in [0, dict_size={cfg.dict_size}] (0: off)"
        for key in ("jumprelu_pre_act_coeff", "jumprelu_freq_coeff"):
            if getattr(cfg, key) < 0:
                return f"{key}={getattr(cfg, key):g} must not be negative"
        if not cfg.jumprelu_threshold_lr_scale > 0:
            return f"jumprelu_threshold_lr_scale={cfg.jumprelu_threshold_lr_scale:g} must be positive"
        if not 0 < cfg.jumprelu_freq_max <= 1:
            return f"jumprelu_freq_max={cfg.jumprelu_freq_max:g} must be a fraction of tokens in (0, 1]"
        return None

    @classmethod
    def config_args(cls, cfg) -> dict:
        """init_l0 resolved (jumprelu_init_l0's default: the target; else, unless threshold_init is
        set to another value than its default, DEFAULT_INIT_L0 capped at 1/16 of the dictionary;
        0: off), passed only when on, so that records made before it rebuild."""
        args = super().config_args(cfg)
        args.pop("init_l0", None)
        init = cfg.jumprelu_init_l0
        if init is None and cfg.target_l0 is not None:
            init = cfg.target_l0
        elif init is None and cfg.threshold_init == THRESHOLD_INIT:  # no threshold asked for
            init = min(DEFAULT_INIT_L0, cfg.dict_size / 16)
        if init:
            args["init_l0"] = init
        return args

    @classmethod
    def run_label(cls, cfg) -> str:
        return f"l0_{cfg.l0_coeff:g}" if cfg.target_l0 is None else f"l0_{cfg.l0_coeff:g}_t{cfg.target_l0:g}"

    def __init__(self, d_in: int, d_sae: int, *, l0_coeff: float = 1.0, sparsity: str = "l0",
                 tanh_c: float = 4.0, threshold_init: float = THRESHOLD_INIT, bandwidth: float = 0.05,
                 target_l0: float | None = None, pre_act_coeff: float = 0.0, pre_act_silent_tokens: int = 0,
                 freq_coeff: float = 0.0,
                 freq_max: float = 0.1, init_l0: float | None = None, threshold_lr_scale: float = 1.0, **base):
        if sparsity not in ("l0", "tanh"):
            raise ValueError(f"JumpReLU sparsity must be 'l0' or 'tanh', got {sparsity!r}")
        if target_l0 is not None and sparsity != "l0":
            raise ValueError("target_l0 (the quadratic L0 penalty) needs sparsity='l0'")
        super().__init__(d_in, d_sae, **base)
        self.l0_coeff, self.sparsity, self.tanh_c, self.bandwidth = l0_coeff, sparsity, tanh_c, bandwidth
        self.target_l0, self.pre_act_coeff, self.init_l0 = target_l0, pre_act_coeff, init_l0
        self.pre_act_silent_tokens = pre_act_silent_tokens
        self.freq_coeff, self.freq_max, self.threshold_lr_scale = freq_coeff, freq_max, threshold_lr_scale
        self.log_threshold = nn.Parameter(torch.full_like(self.b_enc, math.log(threshold_init)))

    def param_groups(self) -> list[dict]:
        """log_threshold in a group of its own when threshold_lr_scale != 1 (its lr = lr * scale)."""
        if self.threshold_lr_scale == 1.0:
            return super().param_groups()
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest}, {"params": [self.log_threshold], "lr_scale": self.threshold_lr_scale}]

    @property
    def wants_init_sample(self) -> bool:
        return self.init_l0 is not None

    @torch.no_grad()
    def init_from_sample(self, sample: Tensor) -> None:
        """init_l0: thresholds from the pre-activations of sample [N, d] (the class docstring)."""
        if self.init_l0 is None:
            return
        z = self.pre_acts(sample.to(self.W_enc.dtype))
        n = z.shape[0]
        k = min(max(1, round(n * self.init_l0 / self.d_sae)), n - 1)
        top = z.topk(k + 1, dim=0).values  # [k + 1, m], descending
        theta = ((top[k - 1] + top[k]) / 2).clamp_min(1e-6)
        self.log_threshold.copy_(theta.log())

    def activation(self, pre: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, self.log_threshold.exp(), self.bandwidth)

    def sparsity_loss(self, f: Tensor, pre: Tensor) -> Tensor:
        theta = self.log_threshold.exp()
        step = StepFn.apply(pre, theta, self.bandwidth) if self.sparsity == "l0" or self.freq_coeff else None
        if self.sparsity == "tanh":
            loss = self.l0_coeff * torch.tanh(self.tanh_c * f.abs() * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif self.target_l0 is None:
            loss = self.l0_coeff * step.sum(-1).mean()
        else:
            t = self.target_l0
            loss = self.l0_coeff * ((2 / t) * (step.sum(-1) - t).square()).mean()
        if self.freq_coeff:
            loss = loss + self.freq_coeff * (step.mean(0) - self.freq_max).relu().sum()
        if self.pre_act_coeff:
            weight = self.W_dec.norm(dim=1)  # [m]
            if self.pre_act_silent_tokens:
                weight = weight * (self.tokens_since_fired >= self.pre_act_silent_tokens)
            loss = loss + self.pre_act_coeff * ((theta - pre).relu() @ weight.to(pre.dtype)).mean()
        return loss

    def active_floor(self) -> Tensor | None:
        if self.pre_act_coeff and not self.pre_act_silent_tokens:
            return None
        return self.log_threshold.detach().exp() - self.bandwidth

    def active_values(self, z: Tensor, cols: Tensor) -> Tensor:
        return JumpReLUFn.apply(z, self.log_threshold.exp().index_select(0, cols), self.bandwidth)

    def active_sparsity_loss(self, active: Active, n_rows: int) -> Tensor:
        """sparsity_loss on the selected entries: the step's sums over rows and latents become index_adds."""
        theta = self.log_threshold.exp().index_select(0, active.cols)
        step = StepFn.apply(active.pre, theta, self.bandwidth) if self.sparsity == "l0" or self.freq_coeff else None
        if self.sparsity == "tanh":
            norms = self.W_dec.norm(dim=1).index_select(0, active.cols)
            loss = self.l0_coeff * torch.tanh(self.tanh_c * active.vals.abs() * norms).sum() / n_rows
        elif self.target_l0 is None:
            loss = self.l0_coeff * step.sum() / n_rows
        else:
            t = self.target_l0
            l0 = step.new_zeros(n_rows).index_add(0, active.rows, step)
            loss = self.l0_coeff * ((2 / t) * (l0 - t).square()).mean()
        if self.freq_coeff:
            rate = step.new_zeros(self.d_sae).index_add(0, active.cols, step) / n_rows
            loss = loss + self.freq_coeff * (rate - self.freq_max).relu().sum()
        if self.pre_act_coeff:  # on the silent latents only (active_floor): their block, encoded afresh
            silent = (self.tokens_since_fired >= self.pre_act_silent_tokens).nonzero().squeeze(1)
            if silent.numel():
                z = self.encode_columns(active, silent)  # [B, n_silent]
                weight = self.W_dec.index_select(0, silent).norm(dim=1)
                loss = loss + self.pre_act_coeff * ((self.log_threshold.exp().index_select(0, silent) - z).relu() @ weight.to(z.dtype)).mean()
        return loss

    def inference_threshold(self) -> Tensor | None:
        return self.log_threshold.detach().exp()


@register("jumprelu")
class JumpReLUSAE(JumpReLU, BaseAutoencoder):
    """f = z * H(z - theta), theta = exp(log_threshold) [m]; l0, quadratic or tanh sparsity (see JumpReLU)."""
