"""SAE variants: registry, init and decoder constraints, activations, AuxK, dead counters,
JumpReLU pseudo-gradients, and short training runs on synthetic sparse data."""

import math

import pytest
import torch

from tests.helpers import sae_step

from train.sae import (SAE_REGISTRY, BaseAutoencoder, BatchTopKSAE, GatedSAE, JumpReLUFn, JumpReLUSAE, MatryoshkaSAE,
                       StepFn, TopKSAE, VanillaSAE, build_sae, explained_variance, geometric_median, register)

D, M = 16, 64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)



# ----- registry and construction -----

def test_registry_builds_each_variant_and_rejects_unknown():
    assert {"vanilla", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"} <= set(SAE_REGISTRY)
    expected = {"vanilla": VanillaSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE,
                "gated": GatedSAE, "matryoshka": MatryoshkaSAE}
    for name, cls in expected.items():
        sae = build_sae(name, d_in=D, d_sae=M, **({"k": 4} if "topk" in name or name == "matryoshka" else {}))
        assert type(sae) is cls and sae.arch == name and sae.W_enc.shape == (D, M)
    valid = ", ".join(sorted(SAE_REGISTRY))  # every registered name, sorted (batchtopk, ..., jumprelu, ..., topk, ..., vanilla)
    with pytest.raises(ValueError, match=f"unknown SAE architecture 'crosscoder'; valid names: {valid}$"):
        build_sae("crosscoder", d_in=D, d_sae=M)
    with pytest.raises(ValueError, match="already registered"):
        register("topk")(VanillaSAE)


def test_register_adds_a_new_architecture():
    @register("test_relu_only")
    class ReluOnly(BaseAutoencoder):
        def activation(self, pre):
            return pre.relu()

    try:
        sae = build_sae("test_relu_only", d_in=D, d_sae=M)
        out = sae(torch.randn(3, D))
        assert isinstance(sae, ReluOnly) and torch.equal(out.loss, out.losses["mse"])
    finally:
        del SAE_REGISTRY["test_relu_only"]


def test_tied_unit_norm_init_is_seeded():
    a, b = (TopKSAE(D, M, k=4, generator=gen(7)) for _ in range(2))
    c = TopKSAE(D, M, k=4, generator=gen(8))
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)
    assert torch.equal(a.W_enc, a.W_dec.T) and a.W_enc.is_contiguous()
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(M))
    assert torch.all(a.b_enc == 0) and torch.all(a.b_dec == 0)
    d64 = VanillaSAE(D, M, dtype=torch.float64, generator=gen(7))
    assert d64.W_dec.dtype == torch.float64 and torch.allclose(d64.W_dec.float(), a.W_dec)


def test_explained_variance():
    x = torch.randn(50, D, generator=gen())
    assert explained_variance(x, x) == 1
    torch.testing.assert_close(explained_variance(x, x.mean(0).expand_as(x)), torch.tensor(0.0))
    assert explained_variance(x, torch.zeros_like(x)) < 0


# ----- decoder constraints -----

def test_make_decoder_unit_norm():
    sae = VanillaSAE(D, M, generator=gen())
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(M, 1, generator=gen(1)) * 5 + 0.1)
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    sae.make_decoder_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(M))
    torch.testing.assert_close(sae.W_dec.detach(), direction)


def test_remove_parallel_decoder_grad_leaves_orthogonal_part():
    sae = VanillaSAE(D, M, generator=gen(), dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # must work for rows that are not unit norm
    sae(torch.randn(32, D, generator=gen(1), dtype=torch.float64)).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    rows = sae.W_dec.detach()
    assert (before * rows).sum(1).abs().max() > 1e-2  # there was a parallel part to remove
    torch.testing.assert_close((sae.W_dec.grad * rows).sum(1), torch.zeros(M, dtype=torch.float64), atol=1e-10, rtol=0)
    unit = rows / rows.norm(dim=1, keepdim=True)
    orth = before - (before * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(sae.W_dec.grad, orth)


# ----- b_dec init -----

def test_geometric_median_known_case_and_outlier():
    pts = torch.zeros(5, 3)
    pts[:, 0] = torch.tensor([0.0, 1, 2, 3, 100])  # collinear: the geometric median is the median
    torch.testing.assert_close(geometric_median(pts), torch.tensor([2.0, 0, 0]), atol=1e-4, rtol=0)
    cloud = torch.randn(200, 4, generator=gen())
    cloud[:20] += 50  # 10% far outliers
    gm = geometric_median(cloud)
    assert gm.norm() < 1.0 and cloud.mean(0).norm() > 8
    objective = lambda y: (cloud - y).norm(dim=1).sum()  # noqa: E731
    for step in torch.randn(10, 4, generator=gen(1)) * 1e-2:
        assert objective(gm) <= objective(gm + step)


def test_init_b_dec_methods():
    sample = torch.randn(100, D, generator=gen()) + 3
    sample[:5] += 100
    sae = TopKSAE(D, M, k=4)
    sae.init_b_dec(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))
    sae.init_b_dec(sample)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(sample))
    assert (sae.b_dec - 3).abs().max() < 1.0
    with pytest.raises(ValueError, match="median"):
        sae.init_b_dec(sample, method="median")


# ----- activations -----

@pytest.mark.parametrize("fast", [True, False])
def test_topk_keeps_exactly_k_largest_per_token(fast):
    sae = TopKSAE(D, M, k=5, fast=fast, generator=gen())
    x = torch.randn(20, D, generator=gen(1))
    out = sae(x)
    assert torch.equal((out.latents != 0).sum(1), torch.full((20,), 5))
    assert torch.equal(out.l0, torch.full((20,), 5.0)) and out.losses["l0"] == 5
    top = out.pre_acts.topk(5, dim=1)
    torch.testing.assert_close(out.latents.gather(1, top.indices), top.values.relu())
    torch.testing.assert_close(sae.encode(x), out.latents)
    torch.testing.assert_close(out.x_hat, sae.decode(out.latents))


@pytest.mark.parametrize("fast", [True, False])
def test_batchtopk_keeps_k_times_batch_largest(fast):
    sae = BatchTopKSAE(D, M, k=4, fast=fast, generator=gen())
    x = torch.randn(16, D, generator=gen(1))
    out = sae(x)
    nz = out.latents != 0
    assert nz.sum() == 4 * 16 and len(set(nz.sum(1).tolist())) > 1  # k*B in total, varying per token
    assert out.losses["l0"] == 4
    z = out.pre_acts.relu()
    assert z[nz].min() >= z[~nz].max()  # the kept entries are the batch's largest
    torch.testing.assert_close(out.latents[nz], z[nz])
    torch.testing.assert_close(out.x_hat, sae.decode(out.latents))


def test_batchtopk_calibrated_threshold_encode_and_state():
    sae = BatchTopKSAE(D, M, k=4, generator=gen())
    x = torch.randn(16, D, generator=gen(1))
    assert sae.threshold_kind == "none" and sae.inference_threshold() is None
    with pytest.raises(ValueError, match="set_threshold"):
        sae.encode(x, use_threshold=True)
    batch_topk = sae.encode(x)  # uncalibrated: batch top-k
    assert (batch_topk != 0).sum() == 64

    thr = torch.linspace(0.0, 1.0, M)
    sae.set_threshold(thr)
    assert sae.threshold_kind == "per_feature"
    torch.testing.assert_close(sae.inference_threshold(), thr)
    z = sae.pre_acts(x).relu()
    f = sae.encode(x)  # calibrated: the per-feature threshold
    torch.testing.assert_close(f, torch.where(z > thr, z, 0.0))
    assert not torch.equal(f, torch.where(z > thr.mean(), z, 0.0))  # per feature, not one global value
    torch.testing.assert_close(sae.encode(x, use_threshold=False), batch_topk)
    torch.testing.assert_close(sae.encode(x.view(4, 4, D)), f.view(4, 4, M))  # leading dims kept

    loaded = BatchTopKSAE(D, M, k=4)
    loaded.load_state_dict(sae.state_dict())
    assert loaded.threshold_kind == "per_feature"
    torch.testing.assert_close(loaded.encode(x), f)

    sae.set_threshold(0.5)
    assert sae.threshold_kind == "global"
    torch.testing.assert_close(sae.encode(x), torch.where(z > 0.5, z, 0.0))
    with pytest.raises(ValueError, match="shape"):
        sae.set_threshold(torch.ones(3))


def test_inference_threshold_per_variant():
    assert TopKSAE(D, M, k=4).inference_threshold() is None
    assert VanillaSAE(D, M).inference_threshold() is None
    jr = JumpReLUSAE(D, M, threshold_init=0.25)
    torch.testing.assert_close(jr.inference_threshold(), torch.full((M,), 0.25))


# ----- dead latents and AuxK -----

def test_dead_counters_count_tokens():
    sae = TopKSAE(D, 4, k=1)
    f = torch.zeros(5, 4)
    f[2, 0] = 1.0
    sae.update_dead_counters(f)
    assert sae.tokens_since_fired.tolist() == [0, 5, 5, 5]
    f = torch.zeros(3, 4)
    f[0, 1] = 0.5
    sae.update_dead_counters(f)
    assert sae.tokens_since_fired.tolist() == [3, 0, 8, 8]
    sae.update_dead_counters(torch.zeros(2, 2, 4))  # [batch, seq, m]: 4 tokens
    assert sae.tokens_since_fired.tolist() == [7, 4, 12, 12]
    assert sae.dead_mask(7).tolist() == [False, False, True, True]
    assert sae.tokens_since_fired.dtype == torch.int64


def test_forward_updates_counters_only_in_training():
    sae = TopKSAE(D, M, k=2, generator=gen())
    x = torch.randn(10, D, generator=gen(1))
    fired = sae(x).latents.ne(0).any(0)
    assert torch.equal(sae.tokens_since_fired, torch.where(fired, 0, 10))
    sae.eval()
    sae(x)
    assert torch.equal(sae.tokens_since_fired, torch.where(fired, 0, 10))


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("fast", [True, False])
def test_auxk_zero_without_dead_positive_with_dead_and_detached(cls, fast):
    x = torch.randn(32, D, generator=gen(1))
    sae = cls(D, M, k=3, fast=fast, aux_k=6, dead_tokens_threshold=100, generator=gen())
    out = sae(x)
    assert out.losses["aux"] == 0 and not sae.dead_mask().any()

    sae.tokens_since_fired.fill_(1000)  # everything was dead; this batch's firing revives some
    out = sae(x)
    dead = sae.dead_mask()
    live = ~dead
    assert dead.any() and live.any()
    assert out.losses["aux"] > 0

    # The documented value: aux_coeff * sum ||e_hat - e||^2 / sum ||e||^2, e = x - x_hat.
    z = out.pre_acts.detach()
    top = torch.where(dead, z, -torch.inf).topk(6, dim=1)
    e_hat = torch.zeros_like(z).scatter(1, top.indices, top.values.relu()) @ sae.W_dec.detach()
    e = x - out.x_hat.detach()
    torch.testing.assert_close(out.losses["aux"], (e_hat - e).pow(2).sum() / e.pow(2).sum() / 32)

    # The residual is detached: AuxK moves only dead latents' weights (and b_dec through x - b_dec).
    out.losses["aux"].backward()
    assert torch.all(sae.W_dec.grad[live] == 0) and torch.all(sae.W_enc.grad[:, live] == 0)
    assert torch.all(sae.b_enc.grad[live] == 0)
    assert sae.W_dec.grad[dead].abs().sum() > 0 and sae.W_enc.grad[:, dead].abs().sum() > 0


def test_auxk_off_for_vanilla_and_jumprelu_unless_asked():
    x = torch.randn(16, D, generator=gen(1))
    for sae in (VanillaSAE(D, M), JumpReLUSAE(D, M)):
        sae.tokens_since_fired.fill_(10**9)
        assert sae(x).losses["aux"] == 0
    sae = JumpReLUSAE(D, M, aux_coeff=1 / 32, threshold_init=10.0)  # nothing fires: every latent stays dead
    sae.tokens_since_fired.fill_(10**9)
    assert sae(x).losses["aux"] > 0


# ----- sparsity terms -----

def test_vanilla_l1_weighted_by_decoder_norm_and_scaled():
    sae = VanillaSAE(D, M, l1_coeff=2.0, generator=gen())
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, M)[:, None])
    x = torch.randn(8, D, generator=gen(1))
    out = sae(x)
    f = out.latents.detach()
    expected = 2.0 * (f * torch.linspace(0.5, 2.0, M)).sum(1).mean()
    torch.testing.assert_close(out.losses["sparsity"], expected)
    torch.testing.assert_close(sae(x, sparsity_coeff_scale=0.25).losses["sparsity"], 0.25 * expected)
    torch.testing.assert_close(out.loss, out.losses["mse"] + out.losses["sparsity"])
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - x).pow(2).sum(1).mean())


def _rect(u):
    return (u.abs() < 0.5).double()


def test_jumprelu_fn_pseudo_gradients_by_hand():
    eps, theta0 = 0.1, 2.0
    z = torch.tensor([[1.0, 1.98, 2.03, 3.0], [2.04, 0.5, 1.97, 2.0]], dtype=torch.float64, requires_grad=True)
    log_theta = torch.full((4,), math.log(theta0), dtype=torch.float64, requires_grad=True)
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    f = JumpReLUFn.apply(z, log_theta.exp(), eps)
    H = (z.detach() > theta0).double()
    torch.testing.assert_close(f, z.detach() * H)
    (f * up).sum().backward()
    K = _rect((z.detach() - theta0) / eps)
    torch.testing.assert_close(z.grad, H * up)  # dJumpReLU/dz = H(z - theta)
    # d/dlog_theta = -(theta/eps) K * theta * upstream: the chain rule through exp exactly once.
    expected = (-(theta0 / eps) * K * up).sum(0) * theta0
    torch.testing.assert_close(log_theta.grad, expected)
    assert expected.abs().sum() > 0

    z.grad = log_theta.grad = None
    StepFn.apply(z, log_theta.exp(), eps).mul(up).sum().backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z))  # dH/dz = 0
    torch.testing.assert_close(log_theta.grad, (-(1 / eps) * K * up).sum(0) * theta0)


def test_jumprelu_l0_is_the_step_on_the_pre_activation():
    eps, theta0, coeff = 0.1, 2.0, 3.0
    sae = JumpReLUSAE(4, 4, l0_coeff=coeff, threshold_init=theta0, bandwidth=eps, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.tensor([[1.0, 1.98, 2.03, 3.0]], dtype=torch.float64)  # z = x; z[1] is just below theta
    out = sae(x)
    torch.testing.assert_close(out.latents, torch.tensor([[0.0, 0.0, 2.03, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(out.losses["sparsity"], torch.tensor(2 * coeff, dtype=torch.float64))
    out.losses["sparsity"].backward()
    # Latents 1 (below theta) and 2 (above) are inside the kernel window; a step on the post-JumpReLU
    # output would see f_1 = 0, far from theta, and give latent 1 no gradient.
    torch.testing.assert_close(sae.log_threshold.grad,
                               torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64) * -(coeff / eps) * theta0)
    assert torch.all(sae.W_enc.grad == 0) and torch.all(sae.b_enc.grad == 0)  # the step passes nothing to z
    half = sae(x, sparsity_coeff_scale=0.5).losses["sparsity"]
    torch.testing.assert_close(half, torch.tensor(coeff, dtype=torch.float64))


def test_jumprelu_tanh_sparsity():
    sae = JumpReLUSAE(4, 4, l0_coeff=0.5, sparsity="tanh", tanh_c=2.0, threshold_init=0.5, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0])))
    x = torch.tensor([[0.1, 0.8, 1.5, -2.0]], dtype=torch.float64)
    out = sae(x)
    f = torch.tensor([0.0, 0.8, 1.5, 0.0], dtype=torch.float64)
    expected = 0.5 * torch.tanh(2.0 * f * torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)).sum()
    torch.testing.assert_close(out.losses["sparsity"], expected)
    out.losses["sparsity"].backward()
    assert sae.W_enc.grad[1, 1] > 0 and sae.W_enc.grad[2, 2] > 0  # unlike the L0 step, tanh reaches z
    with pytest.raises(ValueError, match="tanh"):
        JumpReLUSAE(4, 4, sparsity="l1")


# ----- training on synthetic sparse data -----

N_FEAT, TRUE_L0, WIDTH = 64, 3, 128


def sparse_data(n: int, seed: int) -> torch.Tensor:
    """x = codes @ dictionary: 3 of 64 unit-norm directions per token, magnitudes in [2, 4)."""
    dictionary = torch.randn(N_FEAT, D * 2, generator=gen(99))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = gen(seed)
    idx = torch.rand(n, N_FEAT, generator=g).argsort(1)[:, :TRUE_L0]
    codes = torch.zeros(n, N_FEAT).scatter(1, idx, 2 + 2 * torch.rand(n, TRUE_L0, generator=g))
    return codes @ dictionary


TRAIN_CASES = {
    "topk": (dict(k=3), (3, 3)),
    "batchtopk": (dict(k=3), (3, 3)),
    "vanilla": (dict(l1_coeff=1.0), (1, 16)),
    "jumprelu": (dict(l0_coeff=1.0, threshold_init=0.1, bandwidth=0.1), (1, 6)),
    "jumprelu_tanh": (dict(l0_coeff=1.0, sparsity="tanh", threshold_init=0.1, bandwidth=0.1), (1, 10)),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_reduces_mse_and_reaches_sparsity(case, one_thread):
    kwargs, (l0_lo, l0_hi) = TRAIN_CASES[case]
    steps, batch = 500, 64
    data = sparse_data(steps * batch, seed=0)
    held_out = sparse_data(2048, seed=1)
    sae = build_sae(case.removesuffix("_tanh"), d_in=D * 2, d_sae=WIDTH, generator=gen(), **kwargs)
    sae.init_b_dec(data[:1000])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    with torch.no_grad():
        zero_pred_mse = (held_out - sae.b_dec).pow(2).sum(1).mean()
    for i in range(steps):
        out = sae_step(sae, opt, data[i * batch:(i + 1) * batch], sparsity_coeff_scale=min(1.0, (i + 1) / 100))
    sae.eval()
    with torch.no_grad():
        out = sae(held_out)
    assert out.losses["mse"] < 0.15 * zero_pred_mse
    assert out.losses["explained_variance"] > 0.85
    assert l0_lo <= out.losses["l0"] <= l0_hi
    if case == "batchtopk":  # a global threshold from the training batches gives an inference L0 near k
        with torch.no_grad():
            mins = [sae(data[i * batch:(i + 1) * batch]).latents for i in range(20)]
        sae.set_threshold(torch.stack([f[f > 0].min() for f in mins]).mean())
        f = sae.encode(held_out)
        assert 2 <= (f != 0).sum(1).float().mean() <= 4.5


# ----- k annealing -----

@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE, MatryoshkaSAE])
def test_k_annealing_decays_linearly_with_tokens_and_leaves_inference_at_k(cls):
    sae = cls(D, M, k=4, k_anneal_tokens=1000, k_anneal_start=20, generator=gen())
    assert sae.k_train == 20  # before any step
    for tokens, want in [(0, 20), (250, 16), (500, 12), (999, 4), (1000, 4), (10**6, 4)]:
        sae.set_training_tokens(tokens)
        assert sae.k_train == want, tokens
    x = torch.randn(32, D, generator=gen(1))
    sae.set_training_tokens(500)
    assert float(sae(x).losses["l0"]) == 12  # training uses the annealed k (per token, or on average)
    sae.eval()
    assert float(sae(x).losses["l0"]) == 4  # inference and evaluation use k
    assert cls(D, M, k=4, k_anneal_tokens=10).k_anneal_start == min(M, 10 * D)  # sparsify's start
    plain = cls(D, M, k=4, generator=gen())
    plain.set_training_tokens(0)
    assert plain.k_train == 4
    with pytest.raises(ValueError, match="k_anneal_start must be in k=4..d_sae=64"):
        cls(D, M, k=4, k_anneal_tokens=10, k_anneal_start=2)
