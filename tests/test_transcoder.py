"""Transcoders and cross-layer transcoders as models: each (shape, sparsity rule) against a naive
reference written here from the equations (values and gradients), the composition and the
self-describing record, the export fold, and the CLT's memory formula.

    transcoder:  z = (x - b_in) W_enc + b_enc;  f = rule(z);  y_hat = f W_dec + b_dec (+ x W_skip^T)
    clt:         f_l = rule(z_l);  y_hat_t = b_dec_t + sum_{l <= t} f_l W_dec_l[:, t - l]
    loss:        mean_B sum (y_hat - y)^2 (+ the rule's sparsity)
"""

from __future__ import annotations

import pytest
import torch

from train.sae import SAE_REGISTRY, build_sae
from train.sae.clt import MemoryLimitError, check_memory, clt_memory
from train.sae.registry import sae_from_record, sae_record
from train.sae.transcoder import compose, rule_of, sparsity_names, Transcoder

D, M, B = 8, 24, 64
RULES = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "jumprelu": {"threshold_init": 0.05}, "vanilla": {"l1_coeff": 0.5}}


def perturbed(model, seed=0):
    """Random non-trivial parameters (W_skip and b_dec too), decoder rows renormalised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "log_threshold" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.make_decoder_unit_norm()
    return model


def naive_rule(rule: str, z: torch.Tensor, model) -> torch.Tensor:
    """f from pre-activations z [B, m], written from each rule's definition."""
    if rule == "topk":
        vals, idx = z.topk(model.k, dim=1)
        return torch.zeros_like(z).scatter(1, idx, vals.relu())
    if rule == "batchtopk":
        flat = z.relu().flatten()
        vals, idx = flat.topk(model.k * z.shape[0])
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)
    if rule == "jumprelu":
        return z * (z > model.log_threshold.exp()).to(z.dtype)
    return z.relu()


def naive_transcoder(model, rule, x):
    z = (x - model.b_in) @ model.W_enc + model.b_enc
    f = naive_rule(rule, z, model)
    y = f @ model.W_dec + model.b_dec
    return f, (y + x @ model.W_skip.t() if model.skip else y)


MSE_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "b_in", "W_skip")  # log_threshold: the rule's pseudo-gradient


@pytest.mark.parametrize("rule,fast", [("topk", True), ("topk", False), ("batchtopk", True), ("batchtopk", False),
                                       ("jumprelu", False), ("vanilla", False)])  # fast: the sparse-kernel path
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_transcoder_matches_the_naive_reference(arch, rule, fast):
    extra = {**RULES[rule], **({"fast": fast} if rule in ("topk", "batchtopk") else {})}
    model = perturbed(build_sae(arch, sparsity=rule, d_in=D, d_sae=M, aux_coeff=0.0, **extra))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, D, generator=g) * 2, torch.randn(B, D, generator=g)
    out = model(x, sparsity_coeff_scale=0.0, target=y)
    f_ref, y_ref = naive_transcoder(model, rule, x)
    torch.testing.assert_close(out.latents, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, y_ref, rtol=1e-5, atol=1e-5)
    mse_ref = (y_ref - y).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse"], mse_ref)
    torch.testing.assert_close(out.loss, mse_ref)
    names = [n for n in MSE_PARAMS if hasattr(model, n)]
    got = torch.autograd.grad(out.loss, [getattr(model, n) for n in names])
    want = torch.autograd.grad(mse_ref, [getattr(model, n) for n in names])
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    if arch == "skip_transcoder":  # the skip map is a trained parameter, initialised at zero
        assert not torch.equal(got[names.index("W_skip")], torch.zeros(D, D))
        assert torch.equal(build_sae(arch, sparsity=rule, d_in=D, d_sae=M, **RULES[rule]).W_skip, torch.zeros(D, D))
    # decode() and encode() are the same function as the training forward
    torch.testing.assert_close(model.decode(model.encode(x), x), y_ref, rtol=1e-5, atol=1e-5)


def test_auxk_reconstructs_the_target_residual_from_dead_latents():
    model = perturbed(build_sae("transcoder", sparsity="topk", d_in=D, d_sae=M, k=4, aux_k=3, aux_coeff=0.5,
                                dead_tokens_threshold=10))
    model.tokens_since_fired[: M // 2] = 100  # the first half is dead
    model.eval()  # the counters stay (in training the batch's firing would revive them first)
    x, y = torch.randn(B, D), torch.randn(B, D)
    out = model(x, target=y)
    z = (x - model.b_in) @ model.W_enc + model.b_enc
    dead = torch.arange(M) < M // 2
    zd = torch.where(dead, z, torch.full_like(z, -torch.inf))
    vals, idx = zd.topk(3, dim=1)
    e_hat = torch.zeros_like(z).scatter(1, idx, vals.relu()) @ model.W_dec
    e = y - out.x_hat.detach()
    torch.testing.assert_close(out.losses["aux"], 0.5 * (e_hat - e).pow(2).sum() / e.pow(2).sum(), rtol=1e-5, atol=1e-6)


def test_a_transcoder_needs_its_target_and_a_skip_its_input():
    model = build_sae("skip_transcoder", sparsity="topk", d_in=D, d_sae=M, k=4)
    with pytest.raises(ValueError, match="target"):
        model(torch.randn(4, D))
    with pytest.raises(ValueError, match=r"needs its input: call decode\(f, x\)"):
        model.decode(torch.zeros(4, M))


def test_every_registered_rule_composes_once_and_rebuilds_from_its_record():
    assert set(sparsity_names()) >= {"vanilla", "topk", "batchtopk", "jumprelu"}
    assert rule_of("transcoder") is None and rule_of("clt") is None  # shapes are not rules
    for rule in RULES:
        for arch in ("transcoder", "skip_transcoder"):
            model = build_sae(arch, sparsity=rule, d_in=D, d_sae=M, generator=torch.Generator().manual_seed(3),
                              **RULES[rule])
            cls = type(model)
            assert cls is compose(SAE_REGISTRY[arch], rule) and cls.__bases__ == (rule_of(rule), SAE_REGISTRY[arch])
            assert model.arch == arch and model.rule == rule and isinstance(model, Transcoder)
            record = sae_record(model)
            assert record["arch"] == arch and record["args"]["sparsity"] == rule
            twin = sae_from_record(record)
            assert type(twin) is cls
            twin.load_state_dict(model.state_dict())
            assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="does not compose"):
        build_sae("transcoder", sparsity="clt", d_in=D, d_sae=M)


@pytest.mark.parametrize("rule", ["vanilla", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_export_fold_takes_raw_activations_without_an_input_centre(arch, rule):
    """Trained on s_in x predicting s_out y: the exported form f = rule(x W_enc' + b_enc'),
    y = f W_dec' + b_dec' + x W_skip'^T on raw x equals ours on s_in x, divided by s_out."""
    model = perturbed(build_sae(arch, sparsity=rule, d_in=D, d_sae=M, **RULES[rule]))
    if rule == "batchtopk":
        model.set_threshold(torch.rand(M) * 0.3)
    s_in, s_out = 4.0, 0.5
    w = model.export_tensors(s_in, s_out)
    want = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if rule != "vanilla" else []) + \
        (["W_skip"] if arch == "skip_transcoder" else [])
    assert list(w) == want and model.saelens_arch.endswith("transcoder")
    x = torch.randn(B, D) * 3
    with torch.no_grad():
        f = model.encode(x * s_in)
        y = model.decode(f, x * s_in) / s_out
    h = x @ w["W_enc"] + w["b_enc"]
    f_exp = torch.relu(h) * (h > w["threshold"]).to(h.dtype) if "threshold" in w else torch.relu(h)
    y_exp = f_exp @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].t() if "W_skip" in w else 0)
    keep = ((f > 0) == (f_exp > 0)).all(-1)  # a pre-activation within rounding of a threshold may flip
    assert float(keep.float().mean()) > 0.95 and bool((f > 0).any())
    torch.testing.assert_close(f_exp[keep], f[keep], rtol=1e-4, atol=1e-4)  # float32 rounding of the fold
    torch.testing.assert_close(y_exp[keep], y[keep], rtol=1e-4, atol=1e-4)


def test_topk_transcoders_have_no_exported_form():
    assert build_sae("transcoder", sparsity="topk", d_in=D, d_sae=M, k=4).saelens_arch is None


# --------------------------------------------------------------------------- CLT

L = 3


def naive_clt(model, rule, x):
    """Per layer z_l, f_l = rule(z_l); y_t = b_dec_t + sum_{l <= t} f_l W_dec_l[:, t - l]."""
    fs = []
    for l, src in enumerate(model.sources):
        z = (x[:, l] - src.b_in) @ src.W_enc + src.b_enc
        fs.append(naive_rule(rule, z, src))
    ys = []
    for t in range(L):
        y = model.b_dec[t].expand(x.shape[0], D)
        for l in range(t + 1):
            y = y + fs[l] @ model.sources[l].W_dec.view(M, L - l, D)[:, t - l]
        ys.append(y)
    return fs, torch.stack(ys, 1)


@pytest.mark.parametrize("rule", list(RULES))
def test_clt_matches_the_naive_reference(rule):
    model = perturbed(build_sae("clt", sparsity=rule, d_in=D, d_sae=M, n_layers=L, aux_coeff=0.0, **RULES[rule]))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, L, D, generator=g) * 2, torch.randn(B, L, D, generator=g)
    out = model(x, sparsity_coeff_scale=0.0, target=y)
    fs, y_ref = naive_clt(model, rule, x)
    for a, b in zip(out.latents, fs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, y_ref, rtol=1e-5, atol=1e-5)
    mse_ref = (y_ref - y).pow(2).sum((1, 2)).mean()
    torch.testing.assert_close(out.loss, mse_ref)
    params = [p for n, p in model.named_parameters() if "log_threshold" not in n]
    for (n, _), a, b in zip([(n, p) for n, p in model.named_parameters() if "log_threshold" not in n],
                            torch.autograd.grad(out.loss, params), torch.autograd.grad(mse_ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():  # encode / decode / decode_target are the same function
        f = model.encode(x)
        torch.testing.assert_close(f, torch.cat(fs, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(f), y_ref, rtol=1e-5, atol=1e-5)
        feats = {l: fs[l] for l in range(L)}
        torch.testing.assert_close(model.decode_target(feats, 2), y_ref[:, 2], rtol=1e-5, atol=1e-5)
    assert out.fired.shape == (L * M,) and out.l0.shape == (B,)
    assert {f"fvu/{t}" for t in range(L)} <= set(out.losses)


def test_clt_counters_decoder_upkeep_and_record():
    model = build_sae("clt", sparsity="topk", d_in=D, d_sae=M, n_layers=L, k=4, dead_tokens_threshold=100)
    model.train()
    x = torch.randn(2, L, D)  # 2 tokens x k = 4: at most 8 of each layer's 24 latents fire
    out = model(x, target=torch.randn(2, L, D))
    assert model.tokens_since_fired.shape == (L, M) and int(model.tokens_since_fired.max()) == 2
    assert torch.equal((model.tokens_since_fired.reshape(-1) == 0), out.fired > 0)
    model.tokens_since_fired[1].fill_(1000)  # layer 1 all dead, seen through its source's view
    assert bool(model.sources[1].dead_mask().all()) and int(model.dead_mask().sum()) == M
    assert "tokens_since_fired" not in dict(model.sources[0].named_buffers())  # saved once, as the CLT's [L, m]
    twin = sae_from_record(sae_record(model))
    twin.load_state_dict(model.state_dict())
    assert bool(twin.sources[1].dead_mask().all())  # loaded into the buffer the sources count in
    twin.to(torch.float64).to(torch.float32)
    twin.tokens_since_fired.zero_()
    assert not bool(twin.sources[1].dead_mask().any())  # still linked after .to()
    with torch.no_grad():
        for src in model.sources:
            src.W_dec.mul_(3)
    model.make_decoder_unit_norm()
    for l, src in enumerate(model.sources):  # each latent's row over every layer it writes is unit-norm
        assert src.W_dec.shape == (M, (L - l) * D)
        torch.testing.assert_close(src.W_dec.norm(dim=1), torch.ones(M))


@pytest.mark.parametrize("rule", ["topk", "jumprelu"])
def test_clt_memory_formula_counts_its_parameters(rule):
    for layers, m in [(1, 16), (3, 24), (5, 8)]:
        model = build_sae("clt", sparsity=rule, d_in=D, d_sae=m, n_layers=layers, **({"k": 4} if rule == "topk" else {}))
        est = clt_memory(layers, D, m, batch=256, thresholds=rule == "jumprelu")
        assert est.parameters == sum(p.numel() for p in model.parameters())
        assert est.parameter_bytes == 16 * est.parameters and est.batch_bytes == 4 * 256 * layers * (4 * m + 4 * D)


def test_clt_memory_refusal_names_the_numbers():
    est = clt_memory(26, 2048, 16384, batch=4096)
    assert est.parameters == 12_650_553_344  # the docstring's example: 188.5 GiB before the batch
    assert f"{est.parameter_bytes / 2**30:.1f}" == "188.5"
    check_memory(est, available=est.total, where="cpu", limit_gib=None)  # exactly fits
    with pytest.raises(MemoryLimitError) as e:
        check_memory(est, available=2**37, where="cuda:0", limit_gib=None)
    msg = str(e.value)
    assert "128.0 GiB available on cuda:0" in msg and "L(L+1)/2 md" in msg and f"{est.parameters:,}" in msg
    with pytest.raises(MemoryLimitError, match=r"more than memory_limit_gib=100"):
        check_memory(est, available=2**50, where="cpu", limit_gib=100)
