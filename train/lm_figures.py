"""Model-performance figures of an SAE: the LM's loss with the SAE spliced in at its hook site.

On held-out token contexts: the `tokens` vectors of the run's held-out shards, reshaped
[n_contexts, context_length]: exactly the contexts whose activations were harvested. The LM
recorded in the cache (spec.model["id"], or --model) runs on them clean and with the hook site
replaced (shared.hook_sites.splice) by
    spliced   the SAE reconstruction decode(encode(x * s)) / s  (s = the run's scaling factor)
    zero      zeros
    mean      the cache's mean activation of the site (Cache.stats(site).mean)
and we report the mean next-token cross-entropy of each (ce_clean, ce_spliced, ce_zero_ablation,
ce_mean_ablation), ce_loss_score = (ce_zero - ce_spliced) / (ce_zero - ce_clean) (SAEBench's
definition), ce_degradation = ce_spliced - ce_clean, kl_spliced = KL(clean || spliced) of the
next-token distributions (and kl_zero_ablation, kl_mean_ablation, kl_div_score =
(kl_zero - kl_spliced) / kl_zero).

Masked positions (train.row_mask): the SAE never saw the rows the run's mask leaves out (position
0 under drop_bos, the default; the mask's token ids; rows above its norm threshold), so those
positions keep their clean activation in *all three* interventions (spliced, zero, mean): the
interventions touch exactly the positions the SAE was trained on, and the score compares like with
like (train.row_mask.SplicePositions reads each forward's token ids and, for the norm rule, the
site's clean activation). Without a mask every position is replaced. The loss itself covers every
next-token prediction of a context (positions 0..T-2 predicting tokens 1..T-1); nothing is excluded.
With position 0 kept clean, the prediction made at position 0 is identical in every run (causal
attention), so it adds the same amount to each CE and nothing to the KL.

train.evaluation assembles these per encoding into eval.json.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from shared.autocast import autocast_dtype as resolve_autocast
from shared.cache import Cache
from train.errors import EvalError
from train.row_mask import SplicePositions, positions_of

DEFAULT_LM_BATCH_SIZE = 8  # contexts per LM forward pass


def heldout_contexts(cache: Cache, shards: list[int], max_contexts: int | None) -> Tensor:
    """Token contexts [n, context_length] (int64) of the given shards, in cache order."""
    ctx = cache.spec.context_length
    out: list[np.ndarray] = []
    have = 0
    for k in shards:
        tokens = cache.read_vector("tokens", k)
        positions = cache.read_vector("positions", k)
        if len(tokens) % ctx or not np.array_equal(positions, np.tile(np.arange(ctx, dtype=positions.dtype), len(tokens) // ctx)):
            raise EvalError(f"{cache.root}: shard {k} does not hold whole contexts of {ctx} tokens")
        out.append(tokens.reshape(-1, ctx))
        have += out[-1].shape[0]
        if max_contexts is not None and have >= max_contexts:
            break
    if not out:
        raise EvalError(f"{cache.root}: no held-out shard to take token contexts from")
    ids = np.concatenate(out)[:max_contexts]
    return torch.from_numpy(ids.astype(np.int64))


def splice_fn(replace: Callable[[Tensor], Tensor], where: "int | SplicePositions") -> Callable[[Tensor], Tensor]:
    """Activation hook [B, T, d] -> [B, T, d]: the positions `where` names (an int: positions
    start..; a train.row_mask.SplicePositions: the run's unmasked positions of this forward) become
    replace(rows [N, d] float32), the rows in row-major order; the others keep their activation.

    Runs with autocast off so the SAE computes in float32 whatever the LM's compute dtype."""

    def fn(a: Tensor) -> Tensor:
        out = a.clone()
        m = positions_of(where, a)
        with torch.autocast(a.device.type, enabled=False):
            new = replace(a[m].float())
        out[m] = new.to(a.dtype)
        return out

    return fn


@torch.no_grad()
def lm_losses(model, site, contexts: Tensor, interventions: dict[str, Callable[[Tensor], Tensor]],
              batch_size: int = DEFAULT_LM_BATCH_SIZE, autocast_dtype: torch.dtype | None = None,
              positions: SplicePositions | None = None) -> dict[str, Any]:
    """Mean next-token CE of the clean model and of each intervention (a splice hook on `site`, or
    an object whose attach(model) is a context manager placing its own hooks: train.replacement),
    and the mean KL(clean || intervened) of the next-token distributions. contexts: [n, T] int64.

    positions: the SplicePositions the interventions were built with (attached here, before them).

    Returns {"clean": {"ce"}, name: {"ce", "kl"}, "predictions": n * (T - 1)}.
    """
    device = next(model.parameters()).device
    sums = {"clean": {"ce": 0.0}, **{k: {"ce": 0.0, "kl": 0.0} for k in interventions}}
    n_pred = 0

    def run(ids: Tensor) -> Tensor:
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            logits = model(input_ids=ids, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    with positions.attach(model) if positions is not None else _null():
        for i in range(0, contexts.shape[0], batch_size):
            _batch_losses(contexts[i : i + batch_size].to(device), run, interventions, model, site, sums)
            n_pred += contexts[i : i + batch_size, 1:].numel()
    out: dict[str, Any] = {k: {m: v / n_pred for m, v in d.items()} for k, d in sums.items()}
    out["predictions"] = n_pred
    return out


def _batch_losses(ids: Tensor, run, interventions, model, site, sums) -> None:
    """Add one batch's CE (and KL) sums of the clean run and each intervention into `sums`."""
    from shared.hook_sites import splice

    targets = ids[:, 1:].unsqueeze(-1)
    logp_clean = run(ids)
    sums["clean"]["ce"] += float(-logp_clean.gather(-1, targets).double().sum())
    p_clean = logp_clean.exp()
    for name, fn in interventions.items():
        with fn.attach(model) if hasattr(fn, "attach") else splice(model, site, fn):
            logp = run(ids)
        sums[name]["ce"] += float(-logp.gather(-1, targets).double().sum())
        # per-prediction KL is >= 0; clamp the float32 rounding noise of near-identical distributions
        sums[name]["kl"] += float((p_clean * (logp_clean - logp)).sum(-1).clamp_min(0).double().sum())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def ce_loss_score(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """SAEBench's CE-loss score (L_zero - L_sae) / (L_zero - L_clean): 1 = perfect, 0 = as bad as zeros."""
    den = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / den if den != 0 else float("nan")


def autocast_dtype(choice: str, compute_dtype: str | None, device: torch.device) -> torch.dtype | None:
    """The LM's autocast dtype for --autocast `choice` (shared.autocast; auto: bfloat16 on CUDA when
    the cache was harvested so, i.e. its compute_dtype is bfloat16)."""
    auto = torch.bfloat16 if device.type == "cuda" and compute_dtype == "bfloat16" else None
    return resolve_autocast(choice, auto)


def load_lm(cache: Cache, site_name: str, model: str | None, device: torch.device):
    """(model, HookSite, model_check) for the cache's LM (or `model`), checked against the provenance."""
    from shared.models import load_model

    spec = cache.spec
    model_id = model or spec.model.get("id")
    if not model_id:
        raise EvalError(f"{cache.root} records no model id; pass --model, or --skip-lm")
    loaded = load_model(str(model_id), device=str(device))
    info = loaded.info
    if info.d_model != spec.d_model:
        raise EvalError(f"model {model_id!r} has d_model={info.d_model} but the cache has {spec.d_model}; "
                        "pass the harvested model with --model")
    check = {"model": str(model_id),
             "config_hash_matches": info.config_hash == spec.model.get("config_hash"),
             "tokenizer_hash_matches": info.tokenizer_hash == spec.model.get("tokenizer_hash")}
    if spec.model.get("tokenizer_hash") and not check["tokenizer_hash_matches"]:
        raise EvalError(f"model {model_id!r} has a different tokenizer from the one the cache was harvested with; "
                        "its token ids would be meaningless: pass the harvested model with --model")
    if spec.model.get("config_hash") and not check["config_hash_matches"]:
        warnings.warn(f"model {model_id!r} has a different config hash from the harvested model; CE figures may not "
                      "describe the model the SAE was trained on")
    return loaded.model, cache_site(loaded.model, cache, site_name), check


def cache_site(model, cache: Cache, site_name: str):
    """The HookSite of the cache's site `site_name` in `model`, checked to hook the module the cache hooked."""
    from shared.hook_sites import resolve_sites

    record = next(s for s in cache.spec.sites if s.name == site_name)
    site = resolve_sites(model, [record.layer], record.kind)[0]
    if site.hf_module != record.hf_module:
        raise EvalError(f"site {site_name} resolves to module {site.hf_module} in this model, but the cache hooked "
                        f"{record.hf_module}; pass the harvested model with --model")
    return site
