"""JumpReLU's newer terms and options: the quadratic penalty around target_l0, Anthropic's
pre-activation loss, the frequency penalty, thresholds initialised from data, float32 thresholds
under bf16 autocast, and checkpoints recorded before these options existed."""

import pytest
import torch

from tests.helpers import SITE, cfg_for, sae_step
from train.config import ConfigError, cfg_from_saved, post_init_cfg, update_cfg
from train.sae import JumpReLUSAE
from train.sae.registry import build_from_cfg, sae_from_record, sae_record

EPS, THETA = 0.1, 2.0


def identity_sae(**kw) -> JumpReLUSAE:
    """4 latents, W_enc = W_dec = I, so that z = x (b_dec = b_enc = 0)."""
    sae = JumpReLUSAE(4, 4, threshold_init=THETA, bandwidth=EPS, dtype=torch.float64, **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4, dtype=torch.float64))
        sae.W_dec.copy_(torch.diag(torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64)))
    return sae


X = torch.tensor([[1.0, 1.98, 2.03, 3.0], [2.04, 2.5, 0.5, 1.97]], dtype=torch.float64)  # z = x
H = (X > THETA).double()  # L0 per row: 2 and 2
K = ((X - THETA).abs() / EPS < 0.5).double()  # inside the kernel window


def test_quadratic_penalty_around_target_l0():
    sae = identity_sae(l0_coeff=3.0, target_l0=1.0)
    out = sae(X)
    l0 = H.sum(1)
    want = 3.0 * ((2 / 1.0) * (l0 - 1.0) ** 2).mean()
    torch.testing.assert_close(out.losses["sparsity"], want)
    out.losses["sparsity"].backward()
    # d/dlog theta_i = mean_b 3 * (4 / T)(L0_b - T) * dH_bi/dtheta_i * theta_i, dH/dtheta = -(1/eps) K
    per_row = 3.0 * (4 / 1.0) * (l0 - 1.0) / X.shape[0]
    want_grad = (per_row[:, None] * -(1 / EPS) * K).sum(0) * THETA
    torch.testing.assert_close(sae.log_threshold.grad, want_grad)
    assert torch.all(sae.W_enc.grad == 0)  # the step still passes nothing to z
    at_target = identity_sae(l0_coeff=3.0, target_l0=2.0)(X).losses["sparsity"]
    assert at_target == 0  # both rows are at L0 = 2


def test_pre_activation_loss_pulls_below_threshold_pre_activations_up():
    sae = identity_sae(l0_coeff=0.0, pre_act_coeff=0.5)
    out = sae(X)
    norms = torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    want = 0.5 * ((THETA - X).relu() * norms).sum(1).mean()
    torch.testing.assert_close(out.losses["sparsity"], want)
    out.losses["sparsity"].backward()
    below = (X < THETA).double()
    # z = x, so dz/dW_enc[j, i] = x_j: the gradient on the diagonal is -0.5 * mean_b below_bi * norm_i * x_bi
    diag = torch.diagonal(sae.W_enc.grad)
    torch.testing.assert_close(diag, -0.5 * (below * norms * X).mean(0))
    torch.testing.assert_close(sae.log_threshold.grad, 0.5 * (below * norms).mean(0) * THETA)


def test_pre_activation_loss_on_silent_latents_only():
    x = torch.tensor([[1.0, 1.98, 1.5, 3.0], [2.04, 1.9, 0.5, 1.97]], dtype=torch.float64)  # 1, 2 stay silent
    sae = identity_sae(l0_coeff=0.0, pre_act_coeff=0.5, pre_act_silent_tokens=100)
    sae.tokens_since_fired.copy_(torch.tensor([5000, 98, 5000, 0]))
    out = sae(x)  # training mode: the counters count this batch first -> [0, 100, 5002, 0]
    assert sae.tokens_since_fired.tolist() == [0, 100, 5002, 0]
    norms = torch.tensor([0.0, 2.0, 1.0, 0.0], dtype=torch.float64)  # latents 0 and 3 fired: weight 0
    want = 0.5 * ((THETA - x).relu() * norms).sum(1).mean()
    torch.testing.assert_close(out.losses["sparsity"], want)
    out.losses["sparsity"].backward()
    below = (x < THETA).double()
    torch.testing.assert_close(torch.diagonal(sae.W_enc.grad), -0.5 * (below * norms * x).mean(0))
    torch.testing.assert_close(sae.log_threshold.grad, 0.5 * (below * norms).mean(0) * THETA)
    assert sae.W_enc.grad[:, [0, 3]].abs().sum() == 0  # the latents that fire are left alone
    everyone = identity_sae(l0_coeff=0.0, pre_act_coeff=0.5)
    assert everyone(x).losses["sparsity"] > want  # 0 silent tokens: every latent pays


def test_frequency_penalty_on_latents_denser_than_freq_max():
    sae = identity_sae(l0_coeff=0.0, freq_coeff=2.0, freq_max=0.25)
    out = sae(X)
    p = H.mean(0)  # firing rates [0.5, 0.5, 0.5, 0.5]
    torch.testing.assert_close(out.losses["sparsity"], 2.0 * (p - 0.25).relu().sum())
    out.losses["sparsity"].backward()
    over = (p > 0.25).double()
    torch.testing.assert_close(sae.log_threshold.grad, 2.0 * over * (-(1 / EPS) * K).mean(0) * THETA)
    assert identity_sae(l0_coeff=0.0, freq_coeff=2.0, freq_max=0.75)(X).losses["sparsity"] == 0


def test_thresholds_initialised_from_data_fire_every_latent_at_the_same_rate():
    g = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(16, 64, init_l0=4, generator=g)
    sample = torch.randn(1024, 16, generator=g) * 2 + 1
    assert sae.wants_init_sample and not JumpReLUSAE(16, 64).wants_init_sample
    sae.init_from_sample(sample)
    with torch.no_grad():
        f = sae.encode(sample)
    per_latent = (f > 0).sum(0)
    assert torch.all(per_latent == round(1024 * 4 / 64)), per_latent  # k = 64 rows each
    assert (f > 0).sum(1).double().mean() == 4.0
    assert sae.log_threshold.dtype == torch.float32 and bool((sae.log_threshold.exp() > 0).all())


def test_init_l0_through_the_trainer_starts_near_it(sparse_cache, tmp_path):
    from train.training import train_sae
    _, run_dir = train_sae(None, cfg_for(sparse_cache, tmp_path, arch="jumprelu", l0_coeff=0.05, target_l0=6,
                                         tokens=256 * 10, checkpoint_every=256 * 10, log_every=1), progress=False)
    import json
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and 4 <= first["l0"] <= 8, first  # the first batch, thresholds set from it


def test_threshold_stays_float32_under_bf16_autocast():
    sae = JumpReLUSAE(16, 64, threshold_init=0.3, l0_coeff=1.0, pre_act_coeff=1e-3, freq_coeff=0.1,
                      generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
        pre = out.pre_acts
    assert pre.dtype == torch.bfloat16  # the matmul ran in bf16 ...
    assert out.latents.dtype == torch.float32  # ... the jump compares z with theta in float32
    theta = sae.log_threshold.detach().exp()
    z = pre.detach().float()
    torch.testing.assert_close(out.latents.detach(), z * (z > theta).float())
    out.loss.backward()
    assert sae.log_threshold.dtype == torch.float32 and sae.log_threshold.grad.dtype == torch.float32
    assert float(sae.log_threshold.grad.abs().sum()) > 0


def test_options_are_checked_and_named(sparse_cache, tmp_path):
    cfg = cfg_for(sparse_cache, tmp_path, arch="jumprelu")
    with pytest.raises(ConfigError, match="target_l0=8 sets the quadratic L0 penalty; it needs jumprelu_sparsity='l0'"):
        update_cfg(cfg, target_l0=8, jumprelu_sparsity="tanh")
    with pytest.raises(ConfigError, match="target_l0=-1 must be in"):
        update_cfg(cfg, target_l0=-1)
    with pytest.raises(ConfigError, match="jumprelu_freq_max=1.5 must be a fraction"):
        update_cfg(cfg, jumprelu_freq_max=1.5)
    with pytest.raises(ConfigError, match="jumprelu_pre_act_coeff=-1 must not be negative"):
        update_cfg(cfg, jumprelu_pre_act_coeff=-1)
    with pytest.raises(ConfigError, match="jumprelu_pre_act_silent_tokens. must be a number of tokens"):
        update_cfg(cfg, jumprelu_pre_act_silent_tokens=-5)
    named = post_init_cfg(update_cfg(cfg, target_l0=8), d_in=16, site=SITE)
    assert named.run_name.startswith(f"jumprelu_{SITE}_64_l0_{cfg.l0_coeff:g}_t8_")
    assert build_from_cfg(named).init_l0 == 8  # a target also sets where training starts


def test_records_made_before_the_options_rebuild_the_sae_they_describe(sparse_cache, tmp_path):
    cfg = post_init_cfg(cfg_for(sparse_cache, tmp_path, arch="jumprelu", jumprelu_init_l0=0,
                                jumprelu_threshold_lr_scale=1.0, sparse_fraction=0.0, jumprelu_pre_act_coeff=0.0,
                                jumprelu_pre_act_silent_tokens=0), d_in=16, site=SITE)  # the values runs used before
    record = sae_record(build_from_cfg(cfg))
    assert set(record["args"]) == {"d_in", "d_sae", "aux_k", "dead_tokens_threshold", "l0_coeff", "sparsity",
                                   "bandwidth", "threshold_init"}  # what checkpoints recorded before
    old = sae_from_record(record)
    assert (old.target_l0, old.pre_act_coeff, old.freq_coeff, old.init_l0) == (None, 0.0, 0.0, None)
    new = sae_record(build_from_cfg(update_cfg(cfg, target_l0=4, jumprelu_freq_coeff=0.5, jumprelu_init_l0=None)))["args"]
    assert new["target_l0"] == 4 and new["freq_coeff"] == 0.5 and new["init_l0"] == 4
    # a config.json written before the keys existed takes the values its run computed with
    gone = ("jumprelu_init_l0", "jumprelu_pre_act_coeff", "jumprelu_threshold_lr_scale", "target_l0",
            "jumprelu_pre_act_silent_tokens", "sparse_fraction")
    saved = {k: v for k, v in cfg.to_dict().items() if k not in gone}
    again = cfg_from_saved(saved)
    assert again.jumprelu_init_l0 == 0 and again.jumprelu_pre_act_coeff == 0.0 and again.jumprelu_threshold_lr_scale == 1
    assert sae_record(build_from_cfg(again)) == record
    # while a new run's defaults start sparse (thresholds from data) with faster thresholds
    fresh = sae_record(build_from_cfg(post_init_cfg(cfg_for(sparse_cache, tmp_path, arch="jumprelu"), d_in=16,
                                                    site=SITE)))["args"]
    assert fresh["init_l0"] == 64 / 16 and fresh["threshold_lr_scale"] == 10.0
    assert (fresh["pre_act_coeff"], fresh["pre_act_silent_tokens"]) == (0.03, 20_000)  # silent latents revived
    big = post_init_cfg(update_cfg(cfg_for(sparse_cache, tmp_path, arch="jumprelu"), dict_size=4608), d_in=16, site=SITE)
    assert build_from_cfg(big).init_l0 == 32
    assert "init_l0" not in sae_record(build_from_cfg(update_cfg(big, threshold_init=0.05)))["args"]  # a threshold asked for
    from train.config import get_default_cfg
    from train.sae.jumprelu import THRESHOLD_INIT
    assert get_default_cfg().threshold_init == THRESHOLD_INIT



@pytest.mark.parametrize("target", [3.0, 10.0])
def test_target_l0_steers_training_to_the_target(one_thread, target):
    """From thresholds that start far from it (init_l0 = 20, or 1.5 for the larger target), the
    quadratic penalty brings the held-out L0 within 20% of target_l0."""
    n_feat, d = 64, 16
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(n_feat, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def data(n):
        idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :5]
        return torch.zeros(n, n_feat).scatter(1, idx, 1 + torch.rand(n, 5, generator=g)) @ dictionary

    sae = JumpReLUSAE(d, 128, l0_coeff=2.0, target_l0=target, init_l0=20.0 if target < 5 else 1.5,
                      threshold_lr_scale=10.0, bandwidth=0.05, generator=torch.Generator().manual_seed(1))
    train = data(300 * 128)
    sae.init_b_dec(train[:1024], method="mean")
    sae.init_from_sample(train[:1024])
    with torch.no_grad():
        start = float((sae.encode(train[:1024]) > 0).sum(1).float().mean())
    assert abs(start - target) > 0.5 * target  # far from the target to begin with
    groups = sae.param_groups()
    opt = torch.optim.Adam([{**gr, "lr": 3e-3 * gr.get("lr_scale", 1.0)} for gr in groups])
    for i in range(300):
        out = sae_step(sae, opt, train[i * 128:(i + 1) * 128])
    sae.eval()
    with torch.no_grad():
        held = sae(data(2048))
    assert abs(float(held.losses["l0"]) - target) <= 0.2 * target, held.losses
    assert held.losses["explained_variance"] > 0.5, held.losses
