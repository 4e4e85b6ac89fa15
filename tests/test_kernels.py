"""The sparse TopK/BatchTopK kernels match the dense reference path in values and gradients."""

import pytest
import torch

from train.kernels import BatchTopKEncode, TopKEncode, sparse_decode
from train.sae import BatchTopKSAE, MatryoshkaSAE, TopKSAE

B, D, M, K = 12, 10, 40, 5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}
DTYPES = [torch.float64, torch.float32]


def leaves(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    W = torch.randn(D, M, generator=g, dtype=dtype).requires_grad_()
    b = (0.1 * torch.randn(M, generator=g, dtype=dtype)).requires_grad_()
    c = (0.3 * torch.randn(D, generator=g, dtype=dtype)).requires_grad_()  # the encoder's centre (b_dec)
    return x, c, W, b


def grads_of(out, inputs, seed=1):
    """Gradients of <out, r> for a fixed random r, so every output entry matters."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * r).sum(), inputs)


def assert_close_all(a, b, dtype):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_matches_dense(dtype):
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(M, D, generator=g, dtype=dtype).requires_grad_()
    vals = torch.randn(B, K, generator=g, dtype=dtype).requires_grad_()
    idx = torch.stack([torch.randperm(M, generator=g)[:K] for _ in range(B)])
    dense = torch.zeros(B, M, dtype=dtype).scatter(1, idx, vals) @ W_dec
    fast = sparse_decode(vals, idx, W_dec)
    torch.testing.assert_close(fast, dense, **TOL[dtype])
    assert_close_all(grads_of(fast, (vals, W_dec)), grads_of(dense, (vals, W_dec)), dtype)
    # The flat form: rows with 0, 2 and 3 entries.
    flat_vals, flat_idx = vals[:3].detach().flatten()[:5].requires_grad_(), idx[:3].flatten()[:5]
    offsets = torch.tensor([0, 0, 2])
    rows = torch.tensor([1, 1, 2, 2, 2])
    dense = torch.zeros(3, M, dtype=dtype).index_put((rows, flat_idx), flat_vals) @ W_dec
    fast = sparse_decode(flat_vals, flat_idx, W_dec, offsets)
    torch.testing.assert_close(fast, dense, **TOL[dtype])
    assert_close_all(grads_of(fast, (flat_vals, W_dec)), grads_of(dense, (flat_vals, W_dec)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_grad", [True, False])
def test_topk_encode_matches_dense(dtype, x_grad):
    x, c, W, b = leaves(dtype)
    x.requires_grad_(x_grad)
    with torch.no_grad():  # two rows whose top k are all negative (x - c = 0 there), to exercise the ReLU branch
        x[:2] = c
        b -= 1
    vals, idx, pre = TopKEncode.apply(x, c, W, b, K)
    assert not pre.requires_grad and idx.shape == (B, K)
    dense_pre = (x - c) @ W + b
    ref_top, ref_idx = dense_pre.topk(K, dim=1)
    torch.testing.assert_close(pre, dense_pre.detach(), **TOL[dtype])
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    # Compare as dense latents so the order inside the top k does not matter.
    fast = torch.zeros(B, M, dtype=dtype).scatter(1, idx, vals)
    dense = torch.zeros(B, M, dtype=dtype).scatter(1, ref_idx, ref_top.relu())
    assert 0 < (dense > 0).sum() < B * K
    torch.testing.assert_close(fast, dense, **TOL[dtype])
    inputs = (x, c, W, b) if x_grad else (c, W, b)
    assert_close_all(grads_of(fast, inputs), grads_of(dense, inputs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_grad", [True, False])
def test_batchtopk_encode_matches_dense(dtype, x_grad):
    x, c, W, b = leaves(dtype, seed=3)
    x.requires_grad_(x_grad)
    vals, rows, cols, offsets, pre = BatchTopKEncode.apply(x, c, W, b, K)
    assert vals.shape == rows.shape == cols.shape == (B * K,)
    assert torch.all(rows[1:] >= rows[:-1]), "flat list must be row-sorted"
    assert torch.equal(offsets, (rows[None, :] < torch.arange(B)[:, None]).sum(1))
    z = ((x - c) @ W + b).relu().flatten()
    top, flat = z.topk(B * K)
    dense = torch.zeros_like(z).scatter(0, flat, top).view(B, M)
    fast = torch.zeros(B, M, dtype=dtype).index_put((rows, cols), vals)
    assert len(set((dense > 0).sum(1).tolist())) > 1, "want a variable number of latents per row"
    torch.testing.assert_close(fast, dense, **TOL[dtype])
    inputs = (x, c, W, b) if x_grad else (c, W, b)
    assert_close_all(grads_of(fast, inputs), grads_of(dense, inputs), dtype)


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dead", [False, True])
def test_sae_fast_path_matches_dense(cls, dtype, with_dead):
    """Whole forward + loss (AuxK included): same outputs and gradients for every parameter and x."""
    saes = [cls(D, M, k=K, fast=fast, aux_k=7, dtype=dtype, generator=torch.Generator().manual_seed(0))
            for fast in (True, False)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    outs, grads = [], []
    for sae in saes:
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
            sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            if with_dead:
                sae.tokens_since_fired[M // 2:] = 10**9  # half the latents have been dead for long
        xi = x.clone().requires_grad_()
        out = sae(xi)
        out.loss.backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in sae.parameters()])
    fast, dense = outs
    assert (fast.losses["aux"] > 0) == with_dead
    for key in ("mse", "aux"):
        torch.testing.assert_close(fast.losses[key], dense.losses[key], **TOL[dtype])
    torch.testing.assert_close(fast.x_hat, dense.x_hat, **TOL[dtype])
    torch.testing.assert_close(fast.latents, dense.latents, **TOL[dtype])
    assert_close_all(grads[0], grads[1], dtype)
    assert torch.equal(saes[0].tokens_since_fired, saes[1].tokens_since_fired)


class _BigOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op whose output has at least `n` elements."""

    def __init__(self, n):
        super().__init__()
        self.n, self.ops = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.n:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("cls,extra", [(TopKSAE, {}), (BatchTopKSAE, {}), (MatryoshkaSAE, {"widths": "1/4"})])
def test_sparse_backward_forms_nothing_of_batch_by_width(cls, extra):
    """The step's backward touches only the active entries: autograd must not fill a [B, m] zero
    gradient for the returned pre-activations (a custom Function materialises one by default)."""
    b, m = 64, 512  # B * m larger than every other tensor here (W_enc is d x m = 10 x 512)
    sae = cls(D, m, k=K, fast=True, aux_coeff=0.0, generator=torch.Generator().manual_seed(0), **extra)
    sae.train()
    x = torch.randn(b, D, generator=torch.Generator().manual_seed(1))
    out = sae(x, latents=False)
    assert out.latents is None
    spy = _BigOutputs(b * m)
    with spy:
        out.loss.backward()
    assert spy.ops == [], f"the backward formed [B, m] tensors: {spy.ops}"
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
