"""The step's metrics (L0, L1, fired counts) are exact under bf16 autocast, where latents are bfloat16."""

import pytest
import torch

from train.sae import BatchTopKSAE, VanillaSAE

D, M, B, K = 8, 1024, 16, 32


def _batch(seed=0):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed))
    x[0] *= 50  # one token takes most of the batch's B * K entries: far more than 256
    return x


@pytest.mark.parametrize("fast", [True, False])
def test_batchtopk_metrics_exact_under_bf16(fast):
    sae = BatchTopKSAE(D, M, k=K, fast=fast, aux_coeff=0.0, generator=torch.Generator().manual_seed(0))
    sae.train()
    x = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    f = out.latents.float()
    counts = (f != 0).sum(1)
    assert counts.max() > 300, "the test needs a row beyond bf16's exact integers"
    assert torch.equal(out.l0.double(), counts.double())
    assert out.losses["l0"].item() == pytest.approx(counts.double().mean().item(), rel=1e-6)
    assert out.losses["l1"].item() == pytest.approx(f.double().abs().sum(1).mean().item(), rel=1e-5)
    assert torch.equal(out.fired, (f != 0).sum(0))


def test_dense_path_fired_counts_exact_under_bf16():
    sae = VanillaSAE(D, M, sparse_fraction=0.0, generator=torch.Generator().manual_seed(0))
    sae.train()
    x = torch.randn(1024, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every latent fires on (almost) every token: counts near 1024
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    f = out.latents.float()
    assert out.latents.dtype == torch.bfloat16 and (f != 0).sum(0).max() > 300
    assert torch.equal(out.fired, (f != 0).sum(0))
    assert torch.equal(out.l0.double(), (f != 0).sum(1).double())
