"""Gated SAE: the forward, every loss term and every gradient against a naive implementation of the
paper's equations (a separate magnitude matmul with W_mag = W_enc * exp(r_mag)); the frozen decoder
of the auxiliary term; the shared directions; learning on synthetic sparse data."""

import pytest
import torch

from tests.helpers import sae_step

from train.sae import GatedSAE

D, M = 12, 40


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_gated(seed=0, **kw) -> GatedSAE:
    sae = GatedSAE(D, M, dtype=torch.float64, generator=gen(seed), **kw)
    g = gen(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, M, dtype=torch.float64)[:, None])  # norms != 1: the L1 weighting shows
    return sae


def naive(params, x, l1):
    """Rajamanoharan et al. 2024, written out: two encoder paths sharing W_enc."""
    W_enc, b_gate, r_mag, b_mag, W_dec, b_dec = params
    xc = x - b_dec
    pi_gate = xc @ W_enc + b_gate
    pi_mag = xc @ (W_enc * r_mag.exp()) + b_mag
    f = (pi_gate > 0).to(x.dtype) * pi_mag.relu()
    x_hat = f @ W_dec + b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    sparsity = l1 * (pi_gate.relu() * W_dec.norm(dim=1)).sum(-1).mean()
    via_gate = pi_gate.relu() @ W_dec.detach() + b_dec.detach()
    aux = (via_gate - x).pow(2).sum(-1).mean()
    return f, x_hat, {"mse": mse, "sparsity": sparsity, "mse_gate": aux}


def test_forward_losses_and_gradients_equal_the_papers_equations():
    sae = random_gated(l1_coeff=0.7)
    x = torch.randn(64, D, generator=gen(5), dtype=torch.float64)
    out = sae(x)
    params = [p.detach().clone().requires_grad_(True) for p in
              (sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec)]
    f, x_hat, terms = naive(params, x, 0.7)
    torch.testing.assert_close(out.latents, f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-12, atol=1e-12)
    for name, want in terms.items():
        torch.testing.assert_close(out.losses[name], want, rtol=1e-12, atol=1e-12)
    assert out.losses["aux"] == 0  # no AuxK unless asked
    torch.testing.assert_close(out.loss, sum(terms.values()), rtol=1e-12, atol=1e-12)
    assert 0 < float(out.losses["l0"]) < M
    out.loss.backward()
    sum(terms.values()).backward()
    for p, q in zip((sae.W_enc, sae.b_enc, sae.r_mag, sae.b_mag, sae.W_dec, sae.b_dec), params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10)
        assert float(q.grad.abs().sum()) > 0


def test_the_auxiliary_term_trains_the_gate_through_a_frozen_decoder():
    sae = random_gated()
    x = torch.randn(32, D, generator=gen(6), dtype=torch.float64)
    sae(x).losses["mse_gate"].backward()

    def untouched(p):
        return p.grad is None or not bool(p.grad.any())

    assert untouched(sae.W_dec)  # a frozen copy of the decoder
    assert untouched(sae.r_mag) and untouched(sae.b_mag)  # the magnitude path is not in it
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_enc.grad.abs().sum() > 0  # the gate learns from it
    # b_dec's gradient is the encoder side's only (x - b_dec enters the gate), not the decoder's
    xc_grad = -(sae.W_enc.detach() @ sae.b_enc.grad)
    torch.testing.assert_close(sae.b_dec.grad, xc_grad, rtol=1e-10, atol=1e-12)


def test_init_and_shared_directions():
    sae = GatedSAE(D, M, generator=gen())
    assert torch.equal(sae.r_mag, torch.zeros(M)) and torch.equal(sae.b_mag, torch.zeros(M))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    x = torch.randn(16, D, generator=gen(7))
    with torch.no_grad():
        f = sae.encode(x)
    torch.testing.assert_close(f, ((x - sae.b_dec) @ sae.W_enc).relu())  # r_mag = b_mag = 0: gate and magnitude agree
    assert sae.saelens_arch == "gated"



def test_gated_learns_sparse_codes(one_thread):
    torch.manual_seed(0)
    n_feat, d = 48, 16
    dictionary = torch.randn(n_feat, d, generator=gen(99))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = gen(1)

    def data(n):
        idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :3]
        return torch.zeros(n, n_feat).scatter(1, idx, 2 + 2 * torch.rand(n, 3, generator=g)) @ dictionary

    sae = GatedSAE(d, 96, l1_coeff=3.0, generator=gen())
    train, held = data(400 * 64), data(2048)
    sae.init_b_dec(train[:1000], method="mean")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(400):
        out = sae_step(sae, opt, train[i * 64:(i + 1) * 64])
    sae.eval()
    with torch.no_grad():
        out = sae(held)
    assert out.losses["explained_variance"] > 0.85, out.losses
    assert 1 <= out.losses["l0"] <= 12, out.losses
