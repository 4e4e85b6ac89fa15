"""Hook sites on tiny GPT-2 / Llama / GPT-NeoX / Gemma2: capture, early stop, splice, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.hook_sites import SITE_KINDS, STREAM_KINDS, HookSiteError, capture, find_block_list, resolve_sites, splice
from tests.helpers import ARCH_FIXTURES, N_LAYERS

ARCHS = list(ARCH_FIXTURES)
FINAL_NORM = {"gpt2": "transformer.ln_f", "llama": "model.norm", "neox": "gpt_neox.final_layer_norm",
              "gemma2": "model.norm"}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(2, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_pre_and_post_match_hidden_states(arch, loaded_models, input_ids):
    model = loaded_models(arch).model
    hs = _hidden_states(model, input_ids)
    assert len(hs) == N_LAYERS + 1
    layers = list(range(N_LAYERS))
    pre = capture(model, resolve_sites(model, layers, "resid_pre"), input_ids)
    post = capture(model, resolve_sites(model, layers, "resid_post"), input_ids)
    for L in layers:
        assert pre[f"blocks.{L}.hook_resid_pre"].shape == (2, 12, 32)
        torch.testing.assert_close(pre[f"blocks.{L}.hook_resid_pre"], hs[L], rtol=0, atol=0)
    for L in layers[:-1]:
        torch.testing.assert_close(post[f"blocks.{L}.hook_resid_post"], hs[L + 1], rtol=0, atol=0)
    # The last block's output is the raw residual, not the post-final-norm hidden_states[-1] ...
    last = post[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    assert (last - hs[-1]).abs().max() > 1e-3
    # ... and applying the final norm to it gives hidden_states[-1].
    with torch.no_grad():
        normed = model.get_submodule(FINAL_NORM[arch])(last)
    torch.testing.assert_close(normed, hs[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_branch_outputs_sum_to_resid_post(arch, loaded_models, input_ids):
    model = loaded_models(arch).model
    layers = list(range(N_LAYERS))
    acts = {}
    for kind in STREAM_KINDS:
        acts.update(capture(model, resolve_sites(model, layers, kind), input_ids))
    for L in layers:
        total = acts[f"blocks.{L}.hook_resid_pre"] + acts[f"blocks.{L}.hook_attn_out"] + acts[f"blocks.{L}.hook_mlp_out"]
        torch.testing.assert_close(total, acts[f"blocks.{L}.hook_resid_post"], rtol=1e-5, atol=1e-5)
        assert acts[f"blocks.{L}.hook_attn_out"].abs().max() > 0
        assert acts[f"blocks.{L}.hook_mlp_out"].abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,layer", [("resid_pre", 2), ("resid_post", 1), ("mlp_out", 1), ("attn_out", 0)])
def test_capture_stops_after_last_needed_block(arch, kind, layer, loaded_models, input_ids):
    model = loaded_models(arch).model
    _, blocks = find_block_list(model)
    calls = {i: 0 for i in range(N_LAYERS)}
    calls["lm_head"] = 0
    handles = [b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    handles.append(model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)))
    try:
        out = capture(model, resolve_sites(model, [layer], kind), input_ids)
    finally:
        for h in handles:
            h.remove()
    assert list(out) == [f"blocks.{layer}.hook_{kind}"]
    last_run = layer - 1 if kind == "resid_pre" else layer  # resid_pre stops before its block runs
    assert all(calls[i] == 1 for i in range(last_run + 1))
    assert all(calls[i] == 0 for i in range(last_run + 1, N_LAYERS)), calls
    assert calls["lm_head"] == 0


def test_capture_mixed_sites_and_attention_mask(loaded_models, input_ids):
    model = loaded_models("llama").model
    sites = resolve_sites(model, [3], "resid_pre") + resolve_sites(model, [0, 2], "mlp_out")
    out = capture(model, sites, input_ids, attention_mask=torch.ones_like(input_ids))
    ref = capture(model, sites, input_ids)
    assert sorted(out) == sorted(s.name for s in sites)
    for name in out:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)
        assert not out[name].requires_grad


def test_capture_removes_hooks_even_on_error(loaded_models, input_ids):
    model = loaded_models("gpt2").model
    before = _n_hooks(model)
    capture(model, resolve_sites(model, [1], "resid_post"), input_ids)
    assert _n_hooks(model) == before
    with pytest.raises(IndexError):  # token id beyond the vocab fails inside the embedding
        capture(model, resolve_sites(model, [1], "resid_post"), input_ids + 10_000)
    assert _n_hooks(model) == before


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("gpt2", {"resid_pre": "transformer.h.2", "resid_post": "transformer.h.2",
                  "mlp_out": "transformer.h.2.mlp", "attn_out": "transformer.h.2.attn"}),
        ("llama", {"resid_pre": "model.layers.2", "resid_post": "model.layers.2",
                   "mlp_out": "model.layers.2.mlp", "attn_out": "model.layers.2.self_attn"}),
        ("neox", {"resid_pre": "gpt_neox.layers.2", "resid_post": "gpt_neox.layers.2",
                  "mlp_out": "gpt_neox.layers.2.mlp", "attn_out": "gpt_neox.layers.2.attention"}),
        ("gemma2", {"resid_pre": "model.layers.2", "resid_post": "model.layers.2",
                    "mlp_out": "model.layers.2.post_feedforward_layernorm",
                    "attn_out": "model.layers.2.post_attention_layernorm"}),
    ],
)
def test_site_names_and_modules(arch, expected, loaded_models):
    model = loaded_models(arch).model
    for kind in STREAM_KINDS:
        (site,) = resolve_sites(model, [2], kind)
        assert site.layer == 2 and site.kind == kind
        assert site.name == f"blocks.2.hook_{kind}"
        assert site.hf_module == expected[kind]
        assert site.hook == ("forward_pre" if kind == "resid_pre" else "forward")
        model.get_submodule(site.hf_module)  # resolves to a real module


def test_resolve_errors(loaded_models):
    model = loaded_models("llama").model
    with pytest.raises(HookSiteError) as e:
        resolve_sites(model, [40], "resid_pre")
    assert str(e.value) == "layer 40 is out of range: model llama has 4 layers (0..3)"
    with pytest.raises(HookSiteError, match="layer -1 is out of range"):
        resolve_sites(model, [-1], "resid_post")
    with pytest.raises(HookSiteError) as e:
        resolve_sites(model, [0], "resid_middle")
    assert "resid_middle" in str(e.value) and all(k in str(e.value) for k in SITE_KINDS)
    with pytest.raises(HookSiteError, match="decoder blocks of architecture 'Sequential'"):
        resolve_sites(nn.Sequential(nn.Linear(2, 2)), [0], "resid_pre")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_splice_identity_and_zeros(arch, kind, loaded_models, input_ids):
    model = loaded_models(arch).model
    (site,) = resolve_sites(model, [1], kind)
    clean = _logits(model, input_ids)
    expected = capture(model, [site], input_ids)[site.name]
    seen = []

    def identity(x):
        seen.append(x.detach().clone())
        return x

    with splice(model, site, identity):
        same = _logits(model, input_ids)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)

    with splice(model, site, torch.zeros_like):
        zeroed = _logits(model, input_ids)
    assert (zeroed - clean).abs().max() > 1e-4
    # The hook is gone after the block: logits are clean again.
    torch.testing.assert_close(_logits(model, input_ids), clean, rtol=0, atol=0)
