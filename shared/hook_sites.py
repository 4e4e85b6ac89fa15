"""Hook sites: TransformerLens names mapped onto HF modules; capture (harvest) and splice (eval).

Site kinds, for decoder block L (all activations are [B, T, d_model], the raw residual-stream
basis, never the output of the final norm), in the order a block computes them:

- resid_pre:  input hidden state of block L (`blocks.L.hook_resid_pre`; equals HF
  `output_hidden_states[L]`). Hooked with a forward pre-hook on the block.
- attn_out:   what the attention branch adds to the residual stream (`blocks.L.hook_attn_out`).
- resid_mid:  the residual stream after attention, before the MLP's norm (`blocks.L.hook_resid_mid`
  = resid_pre + attn_out): the *input* of the pre-MLP norm (Gemma2: `pre_feedforward_layernorm`;
  a block with no pre-MLP norm, Olmo2: the input of the MLP itself).
- mlp_in:     what the MLP reads: the *output* of its pre-MLP norm (`blocks.L.ln2.hook_normalized`;
  GPT-2 `ln_2`, Llama/GPT-NeoX `post_attention_layernorm`, Gemma2 `pre_feedforward_layernorm`).
  Note: TransformerLens takes `ln2.hook_normalized` before the norm's weight (and bias), which its
  default `fold_ln=True` folds into the MLP's W_in; this is the HF norm's output, weight applied.
- mlp_out:    what the MLP branch adds to the residual stream (`blocks.L.hook_mlp_out`).
- resid_post: output of block L (`blocks.L.hook_resid_post`; equals `hidden_states[L+1]` for
  L < n_layers - 1; the last block's output is taken *before* the final norm).

In every supported architecture (eval mode) resid_post = resid_pre + attn_out + mlp_out, and
mlp_out = MLP(mlp_in) (with Gemma2's post-feedforward norm); for sequential blocks also
resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out, exactly.
Architecture notes:

- GPT-NeoX with `use_parallel_residual=True` (Pythia), and other parallel blocks (GPT-J, Phi,
  Cohere): attention and MLP both read resid_pre (x + attn(ln1(x)) + mlp(ln2(x))); mlp_out is the
  MLP output of that parallel branch and mlp_in is ln2(resid_pre). There is no resid_mid (nothing
  is computed between the branches; TransformerLens has no hook_resid_mid there either), so it is
  refused (HookSiteError).
- Gemma2/Gemma3/Olmo2 ("sandwich" norms: the block has `post_feedforward_layernorm`): attn_out
  and mlp_out are taken after the branch's post-norm (`post_attention_layernorm`,
  `post_feedforward_layernorm`), i.e. exactly what is added to the residual, as in
  TransformerLens. The raw `self_attn` / `mlp` outputs are not the hooked sites there. Olmo2 has
  no pre-MLP norm: its MLP reads resid_mid, and mlp_in is refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from shared.errors import UserError

STREAM_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out")  # residual stream and branch outputs
MLP_IO_KINDS = ("mlp_in", "resid_mid")  # read inside the block: a transcoder's input candidates
SITE_KINDS = STREAM_KINDS + MLP_IO_KINDS
BLOCK_ORDER = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")  # as a block computes them

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
# The norm only the MLP reads, in blocks without sandwich norms (GPT-2; Llama, Mistral, Qwen2, GPT-NeoX).
_PRE_MLP_NORMS = ("ln_2", "post_attention_layernorm")
# Architectures whose blocks are parallel (attention and MLP both read resid_pre) without a flag saying so.
_PARALLEL_ARCHS = frozenset({"gptj", "codegen", "phi", "cohere", "cohere2"})
_TL_SUFFIX = {**{k: f"hook_{k}" for k in SITE_KINDS}, "mlp_in": "ln2.hook_normalized"}
# Where a capture can stop: before the block (0), inside it before the MLP (1, 2), after it (3).
_PHASE = {"resid_pre": 0, "resid_mid": 1, "mlp_in": 2, "attn_out": 3, "mlp_out": 3, "resid_post": 3}


class HookSiteError(UserError):
    """A hook site cannot be resolved or captured; the message is one line."""


class _StopForward(Exception):
    """Raised from a hook to end the forward pass after the last needed block."""


@dataclass(frozen=True)
class HookSite:
    """One activation site: block `layer`, `kind` in SITE_KINDS, TransformerLens `name`,
    `hf_module` (dotted path in the HF model) and `hook` ("forward_pre": the module's input, or
    "forward": its output)."""

    layer: int
    kind: str
    name: str
    hf_module: str
    hook: str

    @property
    def io(self) -> str:
        """"input" or "output": which tensor of `hf_module` the site is (SiteRecord.hf_io)."""
        return "input" if self.hook == "forward_pre" else "output"


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


def _has(block: nn.Module, name: str) -> bool:
    return isinstance(getattr(block, name, None), nn.Module)


def _branch_module(model: nn.Module, block: nn.Module, layer: int, kind: str) -> str:
    """Name (relative to the block) of the module whose output is `kind` (attn_out / mlp_out)."""
    if _has(block, "post_feedforward_layernorm"):  # sandwich norms: hook the branch post-norms
        return "post_attention_layernorm" if kind == "attn_out" else "post_feedforward_layernorm"
    for name in _ATTN_NAMES if kind == "attn_out" else _MLP_NAMES:
        if _has(block, name):
            return name
    raise HookSiteError(
        f"cannot find the {kind[:-4]} module of block {layer} in architecture {_arch(model)!r}"
    )


def is_parallel_block(model: nn.Module, block: nn.Module) -> bool:
    """True when attention and MLP both read the block's input (GPT-NeoX use_parallel_residual,
    Falcon parallel_attn, GPT-J, Phi, Cohere): the block computes no resid_mid."""
    flag = getattr(block, "use_parallel_residual", None)
    if flag is not None:
        return bool(flag)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if any(getattr(cfg, key, False) is True for key in ("use_parallel_residual", "parallel_attn")):
        return True
    return _arch(model) in _PARALLEL_ARCHS


def _pre_mlp_norm(block: nn.Module) -> str | None:
    """Name of the norm whose output only the MLP reads, or None (no such norm)."""
    if _has(block, "post_feedforward_layernorm"):  # sandwich family: the pre-norm is named as such
        return "pre_feedforward_layernorm" if _has(block, "pre_feedforward_layernorm") else None
    return next((n for n in _PRE_MLP_NORMS if _has(block, n)), None)


def _mlp_io_site(model: nn.Module, block: nn.Module, path: str, layer: int, kind: str) -> HookSite:
    """The HookSite of an mlp_in or resid_mid site of block `layer` (module at `path`)."""
    name = f"blocks.{layer}.{_TL_SUFFIX[kind]}"
    where = f"site {kind} ({name}) of layer {layer} of model {_arch(model)}"
    norm = _pre_mlp_norm(block)
    if kind == "mlp_in":
        if norm is None:
            if _has(block, "post_feedforward_layernorm"):
                reads = "its MLP reads the residual stream directly: harvest resid_mid"
            else:
                looked = ", ".join(_PRE_MLP_NORMS + ("pre_feedforward_layernorm",))
                reads = f"looked for {looked}; harvest resid_pre or mlp_out"
            raise HookSiteError(f"{where} has no module: the block has no norm that only its MLP reads ({reads})")
        return HookSite(layer, kind, name, f"{path}.{norm}", "forward")
    if is_parallel_block(model, block):
        raise HookSiteError(
            f"{where} does not exist: its blocks are parallel (attention and MLP both read resid_pre, so no "
            "residual is formed between them and TransformerLens has no hook_resid_mid there); harvest resid_pre "
            "(the MLP's residual input) or mlp_in (what the MLP reads)"
        )
    reader = norm if norm is not None else next((m for m in _MLP_NAMES if _has(block, m)), None)
    if reader is None:
        raise HookSiteError(f"{where} has no module: the block has neither a pre-MLP norm nor an MLP module")
    return HookSite(layer, kind, name, f"{path}.{reader}", "forward_pre")


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
        if kind in MLP_IO_KINDS:
            sites.append(_mlp_io_site(model, blocks[layer], module, layer, kind))
            continue
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


def _register(model: nn.Module, module: str, hook: str, fn: Callable) -> torch.utils.hooks.RemovableHandle:
    mod = model.get_submodule(module)
    if hook == "forward_pre":
        return mod.register_forward_pre_hook(fn, with_kwargs=True)
    return mod.register_forward_hook(fn)


def _stop_point(model: nn.Module, sites: list[HookSite]) -> tuple[str, str]:
    """(module, hook) after which no site is needed: the block before which (resid_pre) or after
    which the last site is read, or, when the last block's latest site is read before its MLP
    (resid_mid, mlp_in), that site's own module, so the MLP of that block never runs."""
    last = max(sites, key=lambda s: (s.layer, _PHASE[s.kind]))
    if _PHASE[last.kind] in (1, 2):
        return last.hf_module, last.hook
    block = f"{find_block_list(model)[0]}.{last.layer}"
    return block, "forward_pre" if last.kind == "resid_pre" else "forward"


def capture(
    model: nn.Module,
    sites: list[HookSite],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run `model` on input_ids [B, T] and return {site.name: activation [B, T, d_model]}.

    Runs under no_grad and stops the forward pass as soon as the last needed site is read: right
    after the last needed block, before it if that block only contributes a resid_pre site, or
    before its MLP if it only contributes resid_mid / mlp_in sites. Blocks after it never run and
    no logits are computed. Hooks are always removed. The returned tensors are detached (not copied).
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

    stop_module, stop_hook = _stop_point(model, sites)
    try:
        for s in sites:
            handles.append(_register(model, s.hf_module, s.hook, saver(s.name, s.hook == "forward_pre")))
        handles.append(_register(model, stop_module, stop_hook, stop))  # registered last: runs after the savers
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


def _replace_output(fn: Callable[[Tensor], Tensor]):
    """A forward hook that returns the module's output with element 0 (or the tensor) -> fn(it)."""

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + output[1:]
        if isinstance(output, list):
            return [fn(output[0])] + output[1:]
        return fn(output)

    return hook


def _replace_input(fn: Callable[[Tensor], Tensor]):
    """A forward pre-hook that gives the module fn(its hidden-state input) instead."""

    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


@contextlib.contextmanager
def splice(model: nn.Module, site: HookSite, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Inside the `with` block, every forward of `model` uses fn(activation) in place of the
    activation at `site` ([B, T, d_model] -> same shape). Tuple outputs keep their structure.

    mlp_in: the MLP reads fn(mlp_in) (the residual stream is untouched); mlp_out: fn(mlp_out) is
    added to the residual. resid_mid (not a module's tensor in HF): the MLP's norm reads
    fn(resid_mid), and the block's output gets fn(resid_mid) - resid_mid added, so resid_post =
    fn(resid_mid) + mlp_out (rounded once more than in an unspliced block; fn = identity is exact)."""
    handles = []
    if site.kind == "resid_mid":
        delta: list[Tensor] = []

        def new_mid(x: Tensor) -> Tensor:
            y = fn(x)
            delta[:] = [y - x]
            return y

        def add_delta(resid_post: Tensor) -> Tensor:
            return resid_post + delta.pop()

        block = f"{find_block_list(model)[0]}.{site.layer}"
        handles.append(_register(model, site.hf_module, "forward_pre", _replace_input(new_mid)))
        handles.append(_register(model, block, "forward", _replace_output(add_delta)))
    else:
        hook = _replace_input(fn) if site.hook == "forward_pre" else _replace_output(fn)
        handles.append(_register(model, site.hf_module, site.hook, hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
