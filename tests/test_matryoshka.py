"""Matryoshka BatchTopK: the loss against a naive per-prefix implementation (values and gradients,
sparse and dense paths), the widths' spelling and errors, its encodings, and on synthetic
hierarchical data (parents with children) a smallest prefix that reconstructs better than the
same number of latents of a plain BatchTopK SAE trained the same way."""

import pytest
import torch

from tests.helpers import cfg_for, sae_step
from train.config import ConfigError, update_cfg
from train.sae import BatchTopKSAE, MatryoshkaSAE, build_sae
from train.sae.matryoshka import prefix_widths

D, M, K = 16, 64, 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed(sae, seed=0):
    """Random biases and off-tied weights, so that every parameter's gradient is exercised."""
    g = gen(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    sae.make_decoder_unit_norm()
    return sae


def naive_loss(params, x, k, widths):
    """Per-prefix loss written from the paper: one BatchTopK selection over all latents, then
    sum over prefixes m_i of mean_B ||f[:, :m_i] W_dec[:m_i] + b_dec - x||^2 (dense, autograd)."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc + b_enc
    acts = pre.relu().flatten()
    idx = acts.topk(k * x.shape[0]).indices
    f = torch.zeros_like(acts).scatter(0, idx, acts[idx]).view_as(pre)
    total = 0
    for w in widths:
        total = total + (f[:, :w] @ W_dec[:w] + b_dec - x).pow(2).sum(-1).mean()
    return total


@pytest.mark.parametrize("fast", [True, False])
def test_loss_and_gradients_equal_a_naive_per_prefix_implementation(fast):
    sae = perturbed(MatryoshkaSAE(D, M, k=K, widths="1/8,1/2", fast=fast, dtype=torch.float64, generator=gen()))
    assert sae.widths == (8, 32, 64)
    x = torch.randn(48, D, generator=gen(1), dtype=torch.float64)
    out = sae(x)
    assert set(out.losses) >= {"mse", "mse_prefix/8", "mse_prefix/32", "sparsity", "aux"}
    assert out.losses["aux"] == 0 and out.losses["sparsity"] == 0  # nothing is dead yet; BatchTopK has no penalty
    out.loss.backward()

    params = [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    want = naive_loss(params, x, K, sae.widths)
    want.backward()
    torch.testing.assert_close(out.loss.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - x).pow(2).sum(-1).mean())
    for p, q in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10)
    assert all(float(q.grad.abs().sum()) > 0 for q in params)


def test_prefix_reconstructions_from_the_sparse_set_equal_the_dense_ones():
    sae = perturbed(MatryoshkaSAE(D, M, k=K, widths=[2, 8, 40], dtype=torch.float64, generator=gen()))
    x = torch.randn(32, D, generator=gen(2), dtype=torch.float64)
    f, pre, _, active = sae._encode_decode(x)
    with torch.no_grad():
        f[:, :2] = 0  # an empty band: no active entry among the first two latents
    keep = active.cols >= 2
    from train.sae.base import Active
    active = Active(active.vals[keep], active.rows[keep], active.cols[keep])
    sparse = sae.prefix_reconstructions(f, active)
    dense = sae.prefix_reconstructions(f, None)
    assert [w for w, _ in sparse] == [2, 8, 40] == [w for w, _ in dense]
    for (_, a), (_, b) in zip(sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse[0][1], sae.b_dec.expand(32, D))


def test_auxk_is_batchtopk_s():
    mat = perturbed(MatryoshkaSAE(D, M, k=K, dead_tokens_threshold=10, generator=gen()))
    plain = BatchTopKSAE(D, M, k=K, dead_tokens_threshold=10, generator=gen())
    plain.load_state_dict(mat.state_dict())
    for sae in (mat, plain):
        sae.tokens_since_fired[::3] = 100  # a third of the latents dead
    x = torch.randn(32, D, generator=gen(3))
    a, b = mat(x).losses["aux"], plain(x).losses["aux"]
    assert a > 0 and torch.equal(a, b)


def test_widths_spellings_and_errors():
    assert prefix_widths("1/16,1/4", 4608) == (288, 1152, 4608)
    assert prefix_widths("0.0625, 0.25, 1.0", 4608) == (288, 1152, 4608)
    assert prefix_widths([288, 1152], 4608) == prefix_widths("288,1152,4608", 4608) == (288, 1152, 4608)
    assert prefix_widths("1/3", 100) == (33, 100)
    for bad, why in [("1/4,1/16", "must increase"), ("1/16,1/4,1", "must increase.*write fractions as 1/4"),
                     ("abc", "neither a number"), ("1.5", r"not in \(0, 1\]"), ("0,8", "1\\.\\.64"),
                     ("", "no widths"), ("128", "1\\.\\.64")]:
        with pytest.raises(ValueError, match=why):
            prefix_widths(bad, 64)


def test_widths_in_the_config(sparse_cache, tmp_path):
    cfg = cfg_for(sparse_cache, tmp_path, arch="matryoshka", dict_size=64)
    assert update_cfg(cfg, matryoshka_widths=["1/16", "1/4"]).matryoshka_widths == "1/16,1/4"  # a TOML list
    assert update_cfg(cfg, matryoshka_widths=[8, 32]).matryoshka_widths == "8,32"
    with pytest.raises(ConfigError, match=r"matryoshka_widths='1/4,1/16': widths \[16, 4, 64\] must increase"):
        update_cfg(cfg, matryoshka_widths="1/4,1/16")
    with pytest.raises(ConfigError, match="matryoshka_widths='x'"):
        update_cfg(cfg, dict_size=None, matryoshka_widths="x")
    update_cfg(cfg, arch="topk", matryoshka_widths="x")  # only matryoshka reads it


def test_prefix_encodings_keep_only_their_latents():
    sae = perturbed(build_sae("matryoshka", d_in=D, d_sae=M, k=K, widths="1/4", generator=gen()))
    assert [e.name for e in sae.encodings()] == ["batch_topk"]  # uncalibrated: no threshold, no prefixes
    sae.set_threshold(0.05)
    names = [e.name for e in sae.encodings()]
    assert names == ["threshold", "batch_topk", "prefix_16"]
    x = torch.randn(20, D, generator=gen(4))
    with torch.no_grad():
        full = sae.encodings()[0].encode(sae, x)
        prefix = sae.encodings()[2].encode(sae, x)
    assert torch.equal(prefix[:, :16], full[:, :16]) and not prefix[:, 16:].any() and full[:, 16:].any()
    assert sae.describe() == {"k": K, "threshold_kind": "global", "widths": [16, 64]}


# --------------------------------------------------------------------------- hierarchical data

PARENTS, CHILDREN, HD = 6, 4, 24  # 6 parent features with 4 children each, in 24 dimensions


def hierarchical(n: int, seed: int) -> torch.Tensor:
    """x = sum over active parents of (a_p parent_p + a_c child_pc): one or two parents per token,
    each with exactly one of its children; a child never fires without its parent."""
    g0 = gen(123)
    parents = torch.randn(PARENTS, HD, generator=g0)
    children = torch.randn(PARENTS, CHILDREN, HD, generator=g0)
    parents /= parents.norm(dim=-1, keepdim=True)
    children /= children.norm(dim=-1, keepdim=True)
    g = gen(seed)
    x = torch.zeros(n, HD)
    n_active = 1 + (torch.rand(n, generator=g) < 0.5).long()
    for slot in range(2):
        p = torch.randint(PARENTS, (n,), generator=g)
        c = torch.randint(CHILDREN, (n,), generator=g)
        on = (n_active > slot).float()[:, None]
        a_p = 1.5 + torch.rand(n, 1, generator=g)
        a_c = 0.5 + 0.5 * torch.rand(n, 1, generator=g)
        x += on * (a_p * parents[p] + a_c * children[p, c])
    return x


def train_on(sae, data, steps, batch, lr=3e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.init_b_dec(data[:2048], method="mean")
    for i in range(steps):
        out = sae_step(sae, opt, data[i * batch:(i + 1) * batch])
    sae.eval()
    return sae



def test_smallest_prefix_beats_the_same_number_of_plain_batchtopk_latents(one_thread):
    """The Matryoshka SAE's first PARENTS latents alone reconstruct held-out data better than the
    PARENTS most-used latents of a BatchTopK SAE trained on the same data in the same order from
    the same init: BatchTopK absorbs parents into children-specific latents, the first prefix
    must explain the tokens on its own."""
    torch.manual_seed(0)
    steps, batch, width, k = 500, 128, 48, 3
    data = hierarchical(steps * batch, seed=0)
    held = hierarchical(4096, seed=1)
    with torch.no_grad():
        total = (held - held.mean(0)).pow(2).sum()
    results = {}
    for name, cls, extra in [("matryoshka", MatryoshkaSAE, {"widths": [PARENTS]}), ("batchtopk", BatchTopKSAE, {})]:
        sae = train_on(cls(HD, width, k=k, generator=gen(5), **extra), data, steps, batch)
        with torch.no_grad():
            f = sae.encode(held, use_threshold=False)
            order = torch.arange(width) if name == "matryoshka" else (f > 0).sum(0).argsort(descending=True)
            keep = torch.zeros(width, dtype=torch.bool)
            keep[order[:PARENTS]] = True
            prefix_ev = 1 - (sae.decode(f * keep) - held).pow(2).sum() / total
            full_ev = 1 - (sae.decode(f) - held).pow(2).sum() / total
        results[name] = (float(prefix_ev), float(full_ev))
    (m_prefix, m_full), (b_prefix, b_full) = results["matryoshka"], results["batchtopk"]
    assert m_full > 0.8 and b_full > 0.8, results  # both learned the data
    assert m_prefix > b_prefix + 0.1, results
