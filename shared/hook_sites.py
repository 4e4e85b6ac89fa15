"""Hook sites: TransformerLens names mapped onto HF modules; capture (harvest) and splice (eval).

Site kinds, for decoder block L (all activations are [B, T, d_model], the raw residual-stream
basis, never the output of the final norm):

- resid_pre:  input hidden state of block L (`blocks.L.hook_resid_pre`; equals HF
  `output_hidden_states[L]`). Hooked with a forward pre-hook on the block.
- resid_post: output of block L (`blocks.L.hook_resid_post`; equals `hidden_states[L+1]` for
  L < n_layers - 1; the last block's output is taken *before* the final norm).
- attn_out:   what the attention branch adds to the residual stream (`blocks.L.hook_attn_out`).
- mlp_out:    what the MLP branch adds to the residual stream (`blocks.L.hook_mlp_out`).

In every supported architecture resid_post = resid_pre + attn_out + mlp_out (eval mode).
Architecture notes:

- GPT-NeoX with `use_parallel_residual=True` (Pythia): attention and MLP both read resid_pre
  (x + attn(ln1(x)) + mlp(ln2(x))); mlp_out is the MLP output of that parallel branch, so the
  MLP input is *not* resid_pre + attn_out.
- Gemma2/Gemma3/Olmo2 ("sandwich" norms: the block has `post_feedforward_layernorm`): attn_out
  and mlp_out are taken after the branch's post-norm (`post_attention_layernorm`,
  `post_feedforward_layernorm`), i.e. exactly what is added to the residual, as in
  TransformerLens. The raw `self_attn` / `mlp` outputs are not the hooked sites there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from shared.errors import UserError

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")

# Dotted paths (relative to the model passed in) of the decoder-block ModuleList.
_BLOCK_LIST_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Gemma2, Olmo2, Phi3 (CausalLM)
    "transformer.h",  # GPT-2, GPT-J, Bloom-like
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers (Gemma3)
    "layers",  # bare base models (LlamaModel, GPTNeoXModel)
    "h",  # bare GPT2Model
)
_ATTN_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")
_TL_SUFFIX = {k: f"hook_{k}" for k in SITE_KINDS}


class HookSiteError(UserError):
    """A hook site cannot be resolved or captured; the message is one line."""


class _StopForward(Exception):
    """Raised from a hook to end the forward pass after the last needed block."""


@dataclass(frozen=True)
class HookSite:
    """One activation site: block `layer`, `kind` in SITE_KINDS, TransformerLens `name`,
    `hf_module` (dotted path in the HF model) and `hook` ("forward_pre" or "forward")."""

    layer: int
    kind: str
    name: str
    hf_module: str
    hook: str


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", None) or type(model).__name__)


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder blocks; HookSiteError if not found."""
    for path in _BLOCK_LIST_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise HookSiteError(
        f"cannot find the decoder blocks of architecture {_arch(model)!r} "
        f"({type(model).__name__}); known block paths: {', '.join(_BLOCK_LIST_PATHS)}"
    )


def _branch_module(model: nn.Module, block: nn.Module, layer: int, kind: str) -> str:
    """Name (relative to the block) of the module whose output is `kind` (attn_out / mlp_out)."""
    if hasattr(block, "post_feedforward_layernorm"):  # sandwich norms: hook the branch post-norms
        return "post_attention_layernorm" if kind == "attn_out" else "post_feedforward_layernorm"
    for name in _ATTN_NAMES if kind == "attn_out" else _MLP_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise HookSiteError(
        f"cannot find the {kind[:-4]} module of block {layer} in architecture {_arch(model)!r}"
    )


def resolve_sites(model: nn.Module, layers: list[int], kind: str) -> list[HookSite]:
    """HookSites of `kind` at each of `layers` (in the order given). HookSiteError on bad input."""
    if kind not in SITE_KINDS:
        raise HookSiteError(f"unknown hook-site kind {kind!r}; valid kinds: {', '.join(SITE_KINDS)}")
    path, blocks = find_block_list(model)
    n = len(blocks)
    sites = []
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise HookSiteError(
                f"layer {layer} is out of range: model {_arch(model)} has {n} layers (0..{n - 1})"
            )
        module = f"{path}.{layer}"
        if kind in ("attn_out", "mlp_out"):
            module += "." + _branch_module(model, blocks[layer], layer, kind)
        hook = "forward_pre" if kind == "resid_pre" else "forward"
        sites.append(HookSite(layer, kind, f"blocks.{layer}.{_TL_SUFFIX[kind]}", module, hook))
    return sites


def _first(x):
    """Element 0 of a tuple/list output, else the output itself."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _pre_hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _register(model: nn.Module, site: HookSite, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    module = model.get_submodule(site.hf_module)
    if site.hook == "forward_pre":
        return module.register_forward_pre_hook(fn, with_kwargs=True)
    return module.register_forward_hook(fn)


def capture(
    model: nn.Module,
    sites: list[HookSite],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run `model` on input_ids [B, T] and return {site.name: activation [B, T, d_model]}.

    Runs under no_grad and stops the forward pass right after the last needed block (before it,
    if that block only contributes a resid_pre site): blocks after it never run and no logits are
    computed. Hooks are always removed. The returned tensors are detached (not copied).
    """
    if not sites:
        raise HookSiteError("capture() needs at least one hook site")
    out: dict[str, Tensor] = {}
    handles = []

    def saver(name: str, pre: bool):
        if pre:
            return lambda mod, args, kwargs: out.__setitem__(name, _pre_hidden(args, kwargs).detach())
        return lambda mod, args, output: out.__setitem__(name, _first(output).detach())

    def stop(*_):
        raise _StopForward

    # Stop point: (layer, 0) = before block `layer` runs, (layer, 1) = after it.
    last = max(sites, key=lambda s: (s.layer, s.kind != "resid_pre"))
    block_path = f"{find_block_list(model)[0]}.{last.layer}"
    stop_hook = "forward_pre" if last.kind == "resid_pre" else "forward"
    stop_site = HookSite(last.layer, "", "", block_path, stop_hook)
    try:
        for s in sites:
            handles.append(_register(model, s, saver(s.name, s.hook == "forward_pre")))
        handles.append(_register(model, stop_site, stop))  # registered last: runs after the savers
        with torch.no_grad():
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in sites if s.name not in out]
    if missing:
        raise HookSiteError(f"hook sites were not reached during the forward pass: {', '.join(missing)}")
    return out


@contextlib.contextmanager
def splice(model: nn.Module, site: HookSite, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the `with` block, every forward of `model` uses fn(activation) in place of the
    activation at `site` ([B, T, d_model] -> same shape). Tuple outputs keep their structure."""

    def pre_hook(mod, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    def fwd_hook(mod, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + output[1:]
        if isinstance(output, list):
            return [fn(output[0])] + output[1:]
        return fn(output)

    handle = _register(model, site, pre_hook if site.hook == "forward_pre" else fwd_hook)
    try:
        yield
    finally:
        handle.remove()
