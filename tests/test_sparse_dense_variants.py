"""Vanilla and JumpReLU through the selected-entries path (sparse_fraction, issue 15) against the
dense path: the loss, the metrics and every parameter's gradient on batches of small L0 (rows
with no active latent and one with many), the fallbacks to the dense path, training runs with the
path on and off, and exact resume after kill -9 with it on."""

import copy
import json

import pytest
import torch

from tests.helpers import cfg_for, final_weights, kill9_and_resume
from train.config import cfg_from_dict, cfg_from_saved, get_default_cfg, post_init_cfg, update_cfg
from train.kernels import SelectedDecode, SelectedEncode, column_order, select_above
from train.sae import build_sae
from train.sae.registry import sae_class
from train.training import train_sae

D, M, B = 24, 96, 40
TOL = dict(rtol=1e-5, atol=1e-6)

# JumpReLU settings: every sparsity form, the bandwidth wide enough that many inactive entries lie
# in the kernel (their threshold gradient needs the decode's gradient at entries where f = 0)
JUMPRELU = {"l0": dict(sparsity="l0"), "tanh": dict(sparsity="tanh"),
            "target_l0": dict(sparsity="l0", target_l0=3.0),
            "freq": dict(sparsity="l0", freq_coeff=0.5, freq_max=0.02),
            # the pre-activation loss on silent latents: their block encoded afresh (_pair marks some silent)
            "pre_act_silent": dict(sparsity="l0", pre_act_coeff=0.1, pre_act_silent_tokens=500)}


def _batch(sae) -> torch.Tensor:
    """x [B, D]: mostly a few active latents per row; row 0 with none (x = b_dec, pre = b_enc < floor),
    row 1 with many (the sum of 30 encoder directions)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g)
    with torch.no_grad():
        x[0] = sae.b_dec
        x[1] = 3 * sae.W_enc[:, :30].sum(1) + sae.b_dec
    return x


def _pair(arch: str, **kw):
    """Two copies of one SAE: selected-entries path (sparse_fraction 1: always taken) and dense."""
    g = torch.Generator().manual_seed(0)
    dense = build_sae(arch, d_in=D, d_sae=M, generator=g, **kw)
    with torch.no_grad():
        dense.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
        if arch == "vanilla":
            dense.b_enc.fill_(-2.2)  # z ~ N(-2.2, ~1): about 2% of the entries positive
        else:
            dense.b_enc.copy_(torch.randn(M, generator=g) * 0.3)
            dense.log_threshold.copy_((2.0 + 0.3 * torch.rand(M, generator=g)).log())
        dense.tokens_since_fired[::4] = 10_000  # a quarter of the latents silent for 10k tokens
    sparse = copy.deepcopy(dense)
    sparse.sparse_fraction = 1.0
    return sparse, dense


def _compare(sparse, dense, x, scale=0.7):
    outs = [sae(x, sparsity_coeff_scale=scale) for sae in (sparse, dense)]
    for out in outs:
        out.loss.backward()
    s, d = outs
    assert not s.pre_acts.requires_grad and d.pre_acts.requires_grad  # the two paths were taken
    torch.testing.assert_close(s.loss, d.loss, **TOL)
    for k in d.losses:
        torch.testing.assert_close(s.losses[k], d.losses[k], **TOL, msg=k)
    torch.testing.assert_close(s.x_hat, d.x_hat, **TOL)
    torch.testing.assert_close(s.latents, d.latents, **TOL)
    torch.testing.assert_close(s.l0, d.l0)
    assert torch.equal(s.fired, d.fired)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert q.grad is not None and q.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    return s, d


def test_vanilla_selected_path_matches_dense_values_and_every_gradient():
    sparse, dense = _pair("vanilla", l1_coeff=0.3)
    x = _batch(dense)
    s, d = _compare(sparse, dense, x)
    assert d.l0[0] == 0 and d.l0[1] >= 20 and 0 < d.l0.mean() < 0.1 * M, d.l0


@pytest.mark.parametrize("form", list(JUMPRELU))
def test_jumprelu_selected_path_matches_dense_values_and_every_gradient(form):
    sparse, dense = _pair("jumprelu", l0_coeff=0.2, bandwidth=0.5, **JUMPRELU[form])
    x = _batch(dense)
    z = dense.pre_acts(x).detach()
    theta = dense.log_threshold.detach().exp()
    in_kernel = ((z - theta).abs() < 0.25) & (z <= theta)
    assert in_kernel.sum() > 10  # inactive entries that the threshold's pseudo-gradient sees
    s, d = _compare(sparse, dense, x)
    assert d.l0[0] == 0 and d.l0[1] >= 20 and 0 < d.l0.mean() < 0.1 * M, d.l0


def test_auxk_on_the_selected_path_matches_dense():
    sparse, dense = _pair("vanilla", l1_coeff=0.3, aux_coeff=0.5, aux_k=8, dead_tokens_threshold=100)
    for sae in (sparse, dense):
        sae.tokens_since_fired[::3] = 1000  # a third of the latents dead
    s, _ = _compare(sparse, dense, _batch(dense))
    assert s.losses["aux"] > 0


def test_without_latents_the_selected_path_forms_no_dense_latents_and_the_same_loss():
    sparse, dense = _pair("jumprelu", l0_coeff=0.2, bandwidth=0.5, target_l0=3.0)
    x = _batch(dense)
    lean, full = sparse(x, latents=False), dense(x, latents=False)
    assert lean.latents is None and full.latents is not None  # the dense path forms f anyway
    lean.loss.backward()
    full.loss.backward()
    torch.testing.assert_close(lean.loss, full.loss, **TOL)
    for k in full.losses:
        torch.testing.assert_close(lean.losses[k], full.losses[k], **TOL, msg=k)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


@pytest.mark.parametrize("arch", ["vanilla", "jumprelu"])
def test_selected_path_under_bf16_autocast_matches_dense_within_bf16_rounding(arch):
    sparse, dense = _pair(arch, **({"l1_coeff": 0.3} if arch == "vanilla" else {"l0_coeff": 0.2, "bandwidth": 0.5}))
    x = _batch(dense)
    outs = []
    for sae in (sparse, dense):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
        out.loss.backward()
        outs.append(out)
    assert not outs[0].pre_acts.requires_grad and outs[0].latents.dtype == outs[1].latents.dtype
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=2e-2, atol=1e-2)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert p.grad.dtype == torch.float32, name
        scale = q.grad.abs().max()
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=0, atol=3e-2, msg=name)


def test_the_dense_path_is_kept_above_the_fraction_and_for_pre_act_loss():
    sparse, dense = _pair("vanilla", l1_coeff=0.3)
    x = _batch(dense)
    l0 = dense(x).l0.mean().item()
    sparse.sparse_fraction = 0.9 * l0 / M  # mean L0 above the fraction: dense
    assert sparse(x).pre_acts.requires_grad
    sparse.sparse_fraction = 1.1 * l0 / M  # at or below: selected entries
    assert not sparse(x).pre_acts.requires_grad
    sparse, dense = _pair("jumprelu", l0_coeff=0.2, pre_act_coeff=0.1)  # gradients at every below-threshold entry
    out = sparse(_batch(dense))
    assert out.pre_acts.requires_grad
    torch.testing.assert_close(out.loss, dense(_batch(dense)).loss)


@pytest.mark.parametrize("block_rows", [2, 256])  # blocks of rows, the last one short; one block
def test_select_above_and_selected_encode_against_a_naive_reference(monkeypatch, block_rows):
    monkeypatch.setattr("train.kernels.SELECT_ROWS", block_rows)
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(7, 5, generator=g, requires_grad=True), torch.randn(5, 11, generator=g, requires_grad=True), torch.zeros(11, requires_grad=True)
    c = torch.randn(5, generator=g, requires_grad=True)
    floor = torch.rand(11, generator=g)
    pre = torch.addmm(b, x - c, W)
    flat, rows, cols, offsets = select_above(pre, floor, 7 * 11)
    want = (pre > floor).nonzero()
    assert torch.equal(rows, want[:, 0]) and torch.equal(cols, want[:, 1]) and torch.equal(flat, rows * 11 + cols)
    assert torch.equal(offsets, torch.searchsorted(rows, torch.arange(7)))
    assert select_above(pre, floor, rows.numel() - 1) is None
    w = torch.randn(rows.numel(), generator=g)
    (SelectedEncode.apply(x, c, W, b, pre.detach(), flat, rows, cols, offsets, *column_order(cols, 11)) * w).sum().backward()
    got = [t.grad.clone() for t in (x, c, W, b)]
    x.grad = c.grad = W.grad = b.grad = None
    (torch.addmm(b, x - c, W)[rows, cols] * w).sum().backward()
    for a, t in zip(got, (x, c, W, b)):
        torch.testing.assert_close(a, t.grad)


def test_selected_decode_against_a_naive_reference():
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(6, 9, generator=g) < 0.3
    mask[2] = False  # a row with no entry
    rows, cols = mask.nonzero().unbind(1)
    offsets = torch.searchsorted(rows, torch.arange(6))
    vals = torch.randn(rows.numel(), generator=g, requires_grad=True)
    W = torch.randn(9, 5, generator=g, requires_grad=True)
    w_out = torch.randn(6, 5, generator=g)
    out = SelectedDecode.apply(vals, W, rows, cols, offsets, *column_order(cols, 9))
    (out * w_out).sum().backward()
    got = vals.grad.clone(), W.grad.clone()
    vals.grad = W.grad = None
    dense = torch.zeros(6, 9).index_put((rows, cols), vals)
    torch.testing.assert_close(out, dense @ W)
    ((dense @ W) * w_out).sum().backward()
    torch.testing.assert_close(got[0], vals.grad)
    torch.testing.assert_close(got[1], W.grad)


def test_transcoder_with_a_threshold_rule_takes_the_selected_path():
    g = torch.Generator().manual_seed(0)
    dense = build_sae("transcoder", sparsity="vanilla", d_in=D, d_sae=M, d_out=D + 4, generator=g, l1_coeff=0.3)
    with torch.no_grad():
        dense.b_enc.fill_(-2.2)
        dense.b_in.copy_(torch.randn(D, generator=g) * 0.1)
    sparse = copy.deepcopy(dense)
    sparse.sparse_fraction = 1.0
    x, y = torch.randn(B, D, generator=g), torch.randn(B, D + 4, generator=g)
    outs = [sae(x, target=y) for sae in (sparse, dense)]
    for out in outs:
        out.loss.backward()
    assert not outs[0].pre_acts.requires_grad
    torch.testing.assert_close(outs[0].loss, outs[1].loss, **TOL)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


@pytest.mark.parametrize("rule", ["vanilla", "jumprelu"])
def test_clt_sources_with_a_threshold_rule_take_the_selected_path(rule):
    L = 3
    g = torch.Generator().manual_seed(0)
    kw = {"l1_coeff": 0.3} if rule == "vanilla" else {"l0_coeff": 0.2, "bandwidth": 0.5}
    dense = build_sae("clt", sparsity=rule, d_in=D, d_sae=M, n_layers=L, generator=g, **kw)
    with torch.no_grad():
        for src in dense.sources:
            src.b_enc.fill_(-1.5)
            if rule == "jumprelu":
                src.log_threshold.fill_(0.0)  # theta = 1
    sparse = copy.deepcopy(dense)
    for src in sparse.sources:
        src.sparse_fraction = 1.0
    x, y = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    outs = [model(x, target=y) for model in (sparse, dense)]
    for out in outs:
        out.loss.backward()
    assert all(not p.requires_grad for p in outs[0].pre_acts) and all(p.requires_grad for p in outs[1].pre_acts)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, **TOL)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_sparse_fraction_is_recorded_only_when_on_and_old_runs_stay_dense():
    cfg = post_init_cfg(update_cfg(get_default_cfg(), arch="vanilla"), 16, "s")
    assert sae_class("vanilla").config_args(cfg)["sparse_fraction"] == 0.05
    assert "sparse_fraction" not in sae_class("vanilla").config_args(update_cfg(cfg, sparse_kernels=False))
    assert "sparse_fraction" not in sae_class("vanilla").config_args(update_cfg(cfg, sparse_fraction=0.0))
    assert "sparse_fraction" not in sae_class("topk").config_args(update_cfg(cfg, arch="topk"))
    old = {k: v for k, v in cfg.to_dict().items() if k != "sparse_fraction"}
    assert cfg_from_saved(old).sparse_fraction == 0.0  # a run made before the key resumes dense
    assert cfg_from_dict(old).sparse_fraction == 0.05
    assert build_sae("vanilla", d_in=4, d_sae=8).sparse_fraction == 0.0  # an old record rebuilds dense
    with pytest.raises(ValueError, match="sparse_fraction"):
        update_cfg(cfg, sparse_fraction=1.5)


# --------------------------------------------------------------------------- training runs

RUNS = {"vanilla": {"l1_coeff": 0.5}, "jumprelu": {"target_l0": 4, "l0_coeff": 0.05, "jumprelu_freq_coeff": 0.1}}


@pytest.mark.parametrize("arch", list(RUNS))
def test_training_with_the_selected_path_gives_the_dense_runs_weights(sparse_cache, tmp_path, arch):
    weights = {}
    for fraction in (1.0, 0.0):
        cfg = cfg_for(sparse_cache, tmp_path / str(fraction), arch=arch, tokens=256 * 8, checkpoint_every=256 * 8,
                      sparse_fraction=fraction, **RUNS[arch])
        sae, run_dir = train_sae(None, cfg, progress=False)
        assert sae.sparse_fraction == fraction
        weights[fraction] = final_weights(run_dir)
    for k in weights[0.0]:
        torch.testing.assert_close(weights[1.0][k], weights[0.0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("arch", list(RUNS))
def test_selected_path_resumes_bit_identically_after_kill9(sparse_cache, tmp_path, arch):
    run_dir, ref = kill9_and_resume(sparse_cache, tmp_path, arch, {**RUNS[arch], "sparse_fraction": 1.0})
    a, b = final_weights(run_dir), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("l0") for m in steps] == [m.get("l0") for m in want]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_kernel_paths_without_latents_form_none_and_give_the_same_loss_and_gradients(arch):
    g = torch.Generator().manual_seed(3)
    kw = {"widths": (24, 96)} if arch == "matryoshka" else {}
    lean = build_sae(arch, d_in=D, d_sae=M, k=4, generator=g, fast=True, **kw)
    full = copy.deepcopy(lean)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(4))
    a, b = lean(x, latents=False), full(x)
    assert a.latents is None and b.latents is not None and b.latents.shape == (B, M)  # [B, m] not formed
    a.loss.backward()
    b.loss.backward()
    for k in b.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k], **TOL, msg=k)
    for (name, p), q in zip(lean.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    assert torch.equal(a.fired, b.fired) and torch.equal(a.l0, b.l0)
