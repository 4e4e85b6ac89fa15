"""The transcoder sites mlp_in and resid_mid (shared.hook_sites) on tiny GPT-2 / Llama / GPT-NeoX
(parallel) / Gemma2, plus in-memory sequential GPT-NeoX, Olmo2 (no pre-MLP norm) and GPT-J
(parallel, one shared norm): values against a hand-written norm + MLP, the exact block
invariants, names and modules, where the forward stops, splices, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.hook_sites import (
    BLOCK_ORDER, MLP_IO_KINDS, SITE_KINDS, HookSiteError, capture, find_block_list, resolve_sites, splice,
)
from tests.helpers import ARCH_FIXTURES, N_LAYERS

ARCHS = list(ARCH_FIXTURES)
SEQUENTIAL = ["gpt2", "llama", "gemma2"]  # the fixtures' neox is parallel (use_parallel_residual=True)
LAYERS = list(range(N_LAYERS))


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(2, 400, (2, 12), generator=torch.Generator().manual_seed(0))


def _extra_model(kind: str):
    """Tiny random in-memory models of the architectures the fixtures do not cover."""
    from transformers import GPTJConfig, GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=400, bos_token_id=0, eos_token_id=1)
    if kind == "neox_sequential":
        cfg = GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, use_parallel_residual=False, **common)
        return GPTNeoXForCausalLM(cfg).eval()
    if kind == "olmo2":
        cfg = Olmo2Config(num_hidden_layers=N_LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=128, **common)
        return Olmo2ForCausalLM(cfg).eval()
    cfg = GPTJConfig(n_layer=N_LAYERS, n_embd=32, n_head=4, rotary_dim=4, n_positions=128, **common)
    return GPTJForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def extra_models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _extra_model(kind)
        return cache[kind]

    return get


def _all(model, kinds, ids, layers=LAYERS):
    sites = [s for k in kinds for s in resolve_sites(model, layers, k)]
    return capture(model, sites, ids)


def _name(layer, kind):
    return f"blocks.{layer}.ln2.hook_normalized" if kind == "mlp_in" else f"blocks.{layer}.hook_{kind}"


# --------------------------------------------------------------------------- the hand-written reference


def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _rms_norm(x, norm, offset=0.0):
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * (offset + norm.weight)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _reference(arch, block, mlp_input):
    """(mlp_in, mlp_out) of `block` by hand from the residual its MLP branch reads (resid_mid, or
    resid_pre for the parallel GPT-NeoX)."""
    lin = lambda m, x: F.linear(x, m.weight, m.bias)  # noqa: E731
    if arch == "gpt2":
        h = _layer_norm(mlp_input, block.ln_2)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj  # Conv1D: x @ W + b
        return h, _gelu_tanh(h @ fc.weight + fc.bias) @ proj.weight + proj.bias
    if arch == "llama":
        h = _rms_norm(mlp_input, block.post_attention_layernorm)
        m = block.mlp
        return h, lin(m.down_proj, F.silu(lin(m.gate_proj, h)) * lin(m.up_proj, h))
    if arch == "neox":
        h = _layer_norm(mlp_input, block.post_attention_layernorm)
        m = block.mlp
        return h, lin(m.dense_4h_to_h, _gelu_erf(lin(m.dense_h_to_4h, h)))
    h = _rms_norm(mlp_input, block.pre_feedforward_layernorm, offset=1.0)  # Gemma2 norms scale by 1 + w
    m = block.mlp
    out = lin(m.down_proj, _gelu_tanh(lin(m.gate_proj, h)) * lin(m.up_proj, h))
    return h, _rms_norm(out, block.post_feedforward_layernorm, offset=1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_values_match_a_hand_written_norm_and_mlp(arch, loaded_models, input_ids):
    model = loaded_models(arch).model
    _, blocks = find_block_list(model)
    kinds = ["resid_pre", "attn_out", "mlp_in", "mlp_out"] + ([] if arch == "neox" else ["resid_mid"])
    acts = _all(model, kinds, input_ids)
    with torch.no_grad():
        for L in LAYERS:
            pre, attn = acts[_name(L, "resid_pre")], acts[_name(L, "attn_out")]
            mid = pre if arch == "neox" else pre + attn
            if arch != "neox":
                torch.testing.assert_close(acts[_name(L, "resid_mid")], mid, rtol=0, atol=0)
            mlp_in, mlp_out = _reference(arch, blocks[L], mid)
            torch.testing.assert_close(acts[_name(L, "mlp_in")], mlp_in, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(acts[_name(L, "mlp_out")], mlp_out, rtol=1e-5, atol=1e-5)
            assert acts[_name(L, "mlp_in")].abs().max() > 0.1


def _mlp_branch(block, x):
    """The block's own MLP modules applied to mlp_in (Gemma2 / Olmo2: then the post-feedforward norm)."""
    out = block.mlp(x)
    return block.post_feedforward_layernorm(out) if hasattr(block, "post_feedforward_layernorm") else out


@pytest.mark.parametrize("arch", SEQUENTIAL + ["neox_sequential", "neox"])
def test_block_invariants_hold_exactly(arch, loaded_models, extra_models, input_ids):
    """mlp_out == MLP(mlp_in); resid_mid == resid_pre + attn_out; resid_post == resid_mid + mlp_out
    (sequential blocks), all bit for bit, with every site of every layer captured in one pass."""
    model = extra_models(arch) if arch == "neox_sequential" else loaded_models(arch).model
    _, blocks = find_block_list(model)
    kinds = [k for k in BLOCK_ORDER if not (arch == "neox" and k == "resid_mid")]
    acts = _all(model, kinds, input_ids)
    with torch.no_grad():
        for L in LAYERS:
            a = {k: acts[_name(L, k)] for k in kinds}
            torch.testing.assert_close(_mlp_branch(blocks[L], a["mlp_in"]), a["mlp_out"], rtol=0, atol=0)
            if arch == "neox":  # parallel: the MLP reads ln2(resid_pre)
                torch.testing.assert_close(blocks[L].post_attention_layernorm(a["resid_pre"]), a["mlp_in"], rtol=0, atol=0)
                continue
            torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"], rtol=0, atol=0)
            torch.testing.assert_close(a["resid_post"], a["resid_mid"] + a["mlp_out"], rtol=0, atol=0)
    for kind in kinds:  # one pass for all sites gives what one pass per site gives
        alone = _all(model, [kind], input_ids)
        for name, x in alone.items():
            torch.testing.assert_close(acts[name], x, rtol=0, atol=0)


def test_olmo2_resid_mid_is_what_its_mlp_reads(extra_models, input_ids):
    model = extra_models("olmo2")
    _, blocks = find_block_list(model)
    acts = _all(model, ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"], input_ids)
    (site,) = resolve_sites(model, [1], "resid_mid")
    assert (site.name, site.hf_module, site.hook) == ("blocks.1.hook_resid_mid", "model.layers.1.mlp", "forward_pre")
    with torch.no_grad():
        for L in LAYERS:
            mid = acts[_name(L, "resid_mid")]
            torch.testing.assert_close(mid, acts[_name(L, "resid_pre")] + acts[_name(L, "attn_out")], rtol=0, atol=0)
            torch.testing.assert_close(_mlp_branch(blocks[L], mid), acts[_name(L, "mlp_out")], rtol=0, atol=0)
            torch.testing.assert_close(acts[_name(L, "resid_post")], mid + acts[_name(L, "mlp_out")], rtol=0, atol=0)


# --------------------------------------------------------------------------- names, modules, refusals


@pytest.mark.parametrize(
    "arch,mlp_in,resid_mid",
    [
        ("gpt2", "transformer.h.2.ln_2", "transformer.h.2.ln_2"),
        ("llama", "model.layers.2.post_attention_layernorm", "model.layers.2.post_attention_layernorm"),
        ("neox", "gpt_neox.layers.2.post_attention_layernorm", None),
        ("gemma2", "model.layers.2.pre_feedforward_layernorm", "model.layers.2.pre_feedforward_layernorm"),
    ],
)
def test_site_names_and_modules(arch, mlp_in, resid_mid, loaded_models):
    model = loaded_models(arch).model
    (site,) = resolve_sites(model, [2], "mlp_in")
    assert (site.name, site.kind, site.layer, site.hf_module, site.hook, site.io) == (
        "blocks.2.ln2.hook_normalized", "mlp_in", 2, mlp_in, "forward", "output")
    model.get_submodule(site.hf_module)
    if resid_mid is None:
        return
    (site,) = resolve_sites(model, [2], "resid_mid")
    assert (site.name, site.hf_module, site.hook, site.io) == ("blocks.2.hook_resid_mid", resid_mid, "forward_pre", "input")


@pytest.mark.parametrize("arch", ["neox", "gptj"])
def test_resid_mid_is_refused_for_parallel_blocks(arch, loaded_models, extra_models):
    model = extra_models(arch) if arch == "gptj" else loaded_models(arch).model
    with pytest.raises(HookSiteError) as e:
        resolve_sites(model, [1], "resid_mid")
    msg = str(e.value)
    assert f"site resid_mid (blocks.1.hook_resid_mid) of layer 1 of model {model.config.model_type}" in msg
    assert "blocks are parallel" in msg and "harvest resid_pre" in msg and "\n" not in msg


def test_mlp_in_is_refused_without_a_pre_mlp_norm(extra_models):
    with pytest.raises(HookSiteError) as e:
        resolve_sites(extra_models("olmo2"), [3], "mlp_in")
    assert str(e.value).startswith("site mlp_in (blocks.3.ln2.hook_normalized) of layer 3 of model olmo2 has no module")
    assert "harvest resid_mid" in str(e.value)
    with pytest.raises(HookSiteError) as e:  # GPT-J: one norm (ln_1) feeds both attention and MLP
        resolve_sites(extra_models("gptj"), [0], "mlp_in")
    assert "of model gptj has no module" in str(e.value) and "ln_2" in str(e.value)


def test_site_kinds():
    assert set(SITE_KINDS) == set(BLOCK_ORDER) and set(MLP_IO_KINDS) == {"mlp_in", "resid_mid"}


# --------------------------------------------------------------------------- where the forward stops


def _count_calls(model, layer):
    _, blocks = find_block_list(model)
    calls = {("block", i): 0 for i in LAYERS} | {("mlp", i): 0 for i in LAYERS} | {"lm_head": 0}

    def bump(key):
        return lambda *a: calls.__setitem__(key, calls[key] + 1)

    handles = [b.register_forward_hook(bump(("block", i))) for i, b in enumerate(blocks)]
    handles += [b.mlp.register_forward_hook(bump(("mlp", i))) for i, b in enumerate(blocks)]
    handles.append(model.lm_head.register_forward_hook(bump("lm_head")))
    return calls, handles


@pytest.mark.parametrize("arch", SEQUENTIAL)
@pytest.mark.parametrize("kinds,mlp_runs", [(["mlp_in"], False), (["resid_mid"], False),
                                           (["resid_mid", "mlp_in"], False), (["mlp_in", "mlp_out"], True)])
def test_capture_stops_before_the_mlp_when_it_is_not_needed(arch, kinds, mlp_runs, loaded_models, input_ids):
    model = loaded_models(arch).model
    layer = 2
    calls, handles = _count_calls(model, layer)
    try:
        out = _all(model, kinds, input_ids, layers=[0, layer])
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == sorted(_name(L, k) for L in (0, layer) for k in kinds)
    assert all(calls[("block", i)] == 1 and calls[("mlp", i)] == 1 for i in range(layer)), calls
    assert calls[("mlp", layer)] == int(mlp_runs) and calls[("block", layer)] == int(mlp_runs), calls
    assert all(calls[("block", i)] == 0 for i in range(layer + 1, N_LAYERS)) and calls["lm_head"] == 0, calls


# --------------------------------------------------------------------------- splices


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", MLP_IO_KINDS)
def test_splice_identity_and_zeros(arch, kind, loaded_models, input_ids):
    model = loaded_models(arch).model
    if arch == "neox" and kind == "resid_mid":
        pytest.skip("refused: parallel blocks have no resid_mid")
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
    torch.testing.assert_close(_logits(model, input_ids), clean, rtol=0, atol=0)


@pytest.mark.parametrize("arch", SEQUENTIAL)
def test_splices_change_what_the_mlp_reads_and_what_is_added(arch, loaded_models, input_ids):
    """Replacing mlp_in changes the MLP's input only; replacing mlp_out changes what is added;
    replacing resid_mid changes the residual itself (the MLP reads it, and it is carried on)."""
    model = loaded_models(arch).model
    _, blocks = find_block_list(model)
    L, kinds = 1, ["resid_mid", "mlp_in", "mlp_out", "resid_post"]
    clean = _all(model, kinds, input_ids, layers=[L])
    a = {k: clean[_name(L, k)] for k in kinds}
    shift = torch.linspace(-1, 1, a["mlp_in"].shape[-1])

    def spliced(kind, fn):
        (site,) = resolve_sites(model, [L], kind)
        with splice(model, site, fn):
            out = _all(model, kinds, input_ids, layers=[L])
        return {k: out[_name(L, k)] for k in kinds}

    with torch.no_grad():
        s = spliced("mlp_in", lambda x: 2 * x)
        torch.testing.assert_close(s["resid_mid"], a["resid_mid"], rtol=0, atol=0)
        torch.testing.assert_close(s["mlp_in"], 2 * a["mlp_in"], rtol=0, atol=0)
        torch.testing.assert_close(s["mlp_out"], _mlp_branch(blocks[L], 2 * a["mlp_in"]), rtol=0, atol=0)
        torch.testing.assert_close(s["resid_post"], a["resid_mid"] + s["mlp_out"], rtol=0, atol=0)

        s = spliced("mlp_out", torch.zeros_like)
        torch.testing.assert_close(s["mlp_in"], a["mlp_in"], rtol=0, atol=0)
        torch.testing.assert_close(s["resid_post"], a["resid_mid"], rtol=0, atol=0)

        s = spliced("resid_mid", lambda x: x + shift)
        new_mid = a["resid_mid"] + shift
        torch.testing.assert_close(s["mlp_in"], _reference_norm(blocks[L], new_mid), rtol=0, atol=0)
        torch.testing.assert_close(s["mlp_out"], _mlp_branch(blocks[L], s["mlp_in"]), rtol=0, atol=0)
        torch.testing.assert_close(s["resid_post"], new_mid + s["mlp_out"], rtol=1e-5, atol=1e-5)
        assert (s["resid_post"] - a["resid_post"]).abs().max() > 0.1


def _reference_norm(block, x):
    for name in ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm"):
        if hasattr(block, name):
            return getattr(block, name)(x)
    raise AssertionError("no pre-MLP norm")
