"""Which rows a run leaves out of training and evaluation: one rule, `RowMask.keep`.

A row (one token of one context) is left out when any of these holds:
    drop_bos         its context position is 0
    token_ids        its token id is one of these (config mask_token_ids, resolved at run creation:
                     "default" = the BOS / EOS ids the cache's model record names)
    norm_threshold   the L2 norm of its activation at `norm_site`, in raw (un-normalised) cache
                     units, is above this (config mask_norm_multiple x the median row norm of the
                     first <= 8 training shards, resolved at run creation into mask_norm_threshold)

The same rule serves the training store and its held-out batches (train.window_reader.kept_index:
so calibration and `train eval`'s reconstruction figures), the CE splices of `train eval`
(`SplicePositions`: a masked position keeps its clean activation, as position 0 does under
drop_bos) and `train inspect`. A store reads a shard's positions, tokens and (norm_threshold) its
activations at norm_site to apply it; the splice reads the LM's input ids and the norm site's
activation in the same forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from shared.cache import Cache

NORM_SAMPLE_SHARDS = 8  # mask_norm_multiple: the median norm is taken over the first <= 8 training shards
_NORM_CHUNK = 65536  # rows per float32 conversion when computing a shard's norms


def parse_token_ids(text: str) -> tuple[int, ...] | None:
    """mask_token_ids as written: "default" -> None (resolve from the cache), "none" or "" -> (),
    else comma-separated non-negative ints. ValueError naming the bad item."""
    text = text.strip()
    if text == "default":
        return None
    if text.lower() in ("none", ""):
        return ()
    ids = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"{item!r} is not a token id (a non-negative integer)")
        ids.append(int(item))
    return tuple(sorted(set(ids)))


def format_token_ids(ids: tuple[int, ...]) -> str:
    """The recorded form of resolved token ids: "none" or "1,2,3"."""
    return ",".join(str(i) for i in ids) if ids else "none"


def default_token_ids(cache: Cache) -> tuple[int, ...]:
    """The special token ids the cache records for its model (bos_token_id, eos_token_id; the
    tokenizer's pad id is not recorded, and equals one of these for most tokenizers)."""
    model = cache.spec.model
    return tuple(sorted({int(model[k]) for k in ("bos_token_id", "eos_token_id") if model.get(k) is not None}))


def row_norms(acts: np.ndarray) -> Tensor:
    """L2 norms float32 [rows] of storage-dtype rows [rows, d] (bfloat16 via ml_dtypes), in float32."""
    out = torch.empty(len(acts), dtype=torch.float32)
    for i in range(0, len(acts), _NORM_CHUNK):
        a = np.array(acts[i : i + _NORM_CHUNK])  # a private copy (the cache's are read-only maps)
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" else torch.from_numpy(a)
        out[i : i + len(a)] = torch.linalg.vector_norm(t.float(), dim=1)
    return out


@dataclass(frozen=True)
class RowMask:
    """The rows left out (module docstring). token_ids sorted, distinct; norm_threshold in raw units
    of norm_site (None: no norm rule)."""

    drop_bos: bool = False
    token_ids: tuple[int, ...] = ()
    norm_threshold: float | None = None
    norm_site: str | None = None

    def __post_init__(self) -> None:
        if self.norm_threshold is not None and self.norm_site is None:
            raise ValueError("a RowMask with a norm_threshold needs the norm_site its norms are taken at")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "RowMask":
        """The resolved mask of a run config (train.config.TrainConfig after `resolve_row_mask`)."""
        ids = parse_token_ids(cfg.mask_token_ids)
        if ids is None:
            raise ValueError("mask_token_ids='default' is resolved at run creation (resolve_row_mask)")
        thr = cfg.mask_norm_threshold
        return cls(bool(cfg.drop_bos), ids, None if thr is None else float(thr), cfg.site if thr is not None else None)

    @property
    def empty(self) -> bool:
        """Whether the mask keeps every row (it then reads nothing)."""
        return not self.drop_bos and self.only_positions

    @property
    def only_positions(self) -> bool:
        """Whether the mask needs nothing but the context positions (drop_bos alone, or nothing)."""
        return not self.token_ids and self.norm_threshold is None

    def keep(self, positions: Tensor, tokens: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
        """Bool tensor (the inputs' shape): True for rows kept. positions, tokens: int tensors of one
        shape; norms: float, the same shape (needed when norm_threshold is set)."""
        keep = positions != 0 if self.drop_bos else torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        if self.token_ids:
            ids = torch.tensor(self.token_ids, dtype=tokens.dtype, device=tokens.device)
            keep &= ~torch.isin(tokens, ids)
        if self.norm_threshold is not None:
            keep &= ~(norms > self.norm_threshold)
        return keep

    def shard_keep(self, cache: Cache, shard: int, acts: np.ndarray | None = None) -> np.ndarray:
        """Bool [rows] of one cache shard (reads its positions, tokens and, for the norm rule, its
        activations at norm_site unless `acts` [rows, d] gives them)."""
        pos = torch.from_numpy(np.array(cache.read_vector("positions", shard)))
        tok = torch.from_numpy(np.array(cache.read_vector("tokens", shard))) if self.token_ids else None
        norms = None
        if self.norm_threshold is not None:
            norms = row_norms(cache.read_acts(self.norm_site, shard) if acts is None else acts)
        return self.keep(pos, tok, norms).numpy()

    def kept_index(self, cache: Cache, shard: int) -> np.ndarray:
        """Rows of a shard that are kept, int64 [kept] (reads nothing without a mask)."""
        if self.empty:
            return np.arange(cache.shard_rows(shard), dtype=np.int64)
        return np.flatnonzero(self.shard_keep(cache, shard)).astype(np.int64)

    def kept_rows(self, cache: Cache, shard: int) -> int:
        """len(kept_index(...))."""
        return cache.shard_rows(shard) if self.empty else len(self.kept_index(cache, shard))

    def record(self) -> dict[str, Any]:
        """JSON description (eval.json's settings, the store's description)."""
        return {"drop_bos": self.drop_bos, "token_ids": list(self.token_ids), "norm_threshold": self.norm_threshold,
                "norm_site": self.norm_site}


def median_norm(cache: Cache, site: str, shards: list[int], mask: RowMask, progress: bool = True) -> float:
    """The median L2 norm (raw units) of `site`'s rows over `shards` kept by `mask`'s position and
    token rules (the norm rule being set is what this computes)."""
    from tqdm import tqdm

    base = RowMask(mask.drop_bos, mask.token_ids)
    norms = []
    for k in tqdm(shards, desc="median row norm", unit="shard", disable=not progress, dynamic_ncols=True):
        n = row_norms(cache.read_acts(site, k))
        norms.append(n[torch.from_numpy(base.shard_keep(cache, k))])
    allnorms = torch.cat(norms) if norms else torch.zeros(0)
    if allnorms.numel() == 0:
        raise ValueError(f"{cache.root}: no rows to take the median norm of (mask_norm_multiple)")
    v = allnorms.double().sort().values
    n = len(v)
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)  # numpy's median


def resolve_row_mask(cfg: Any, cache: Cache, progress: bool = False) -> Any:
    """cfg (a TrainConfig whose site is resolved) with its mask made concrete, as the run records
    it: mask_token_ids "default" -> the cache's BOS / EOS ids ("none" if it records none), and with
    mask_norm_multiple set (and no mask_norm_threshold yet) mask_norm_threshold = multiple x the
    median row norm of the first <= NORM_SAMPLE_SHARDS training shards (a progress bar when
    `progress`). A resolved config comes back unchanged."""
    from train.config import update_cfg
    from train.row_order import heldout_count

    ids = parse_token_ids(cfg.mask_token_ids)
    changes: dict[str, Any] = {}
    if ids is None:
        ids = default_token_ids(cache)
        changes["mask_token_ids"] = format_token_ids(ids)
    if cfg.mask_norm_multiple is not None and cfg.mask_norm_threshold is None:
        shards = cache.shards
        train = shards[: len(shards) - heldout_count(len(shards), cfg.heldout_shards, None, cache.root)]
        med = median_norm(cache, cfg.site, train[:NORM_SAMPLE_SHARDS], RowMask(bool(cfg.drop_bos), ids), progress)
        changes["mask_norm_threshold"] = cfg.mask_norm_multiple * med
    return update_cfg(cfg, **changes) if changes else cfg


# --------------------------------------------------------------------------- the CE splice


def _read_hook(site, fn):
    """A hook on `site`'s module that passes its activation [B, T, d] to fn and changes nothing."""
    if site.hook == "forward_pre":
        return lambda mod, args, kwargs: fn(args[0] if args else kwargs["hidden_states"])
    return lambda mod, args, output: fn(output[0] if isinstance(output, (tuple, list)) else output)


def register_read(lm, site, fn):
    """Register `_read_hook(site, fn)` on the LM module of HookSite `site`; returns the handle."""
    module = lm.get_submodule(site.hf_module)
    hook = _read_hook(site, fn)
    if site.hook == "forward_pre":
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    return module.register_forward_hook(hook)


class SplicePositions:
    """Which positions [B, T] of the LM's current forward an intervention replaces: `mask.keep` of
    the context positions 0..T-1, the forward's input_ids and (norm rule) the norms of the clean
    activation at `norm_site` (a HookSite) in that forward. Masked positions keep their clean
    activation. attach(lm) before the interventions' hooks, so that its hooks see clean values."""

    def __init__(self, mask: RowMask, norm_site=None):
        if mask.norm_threshold is not None and norm_site is None:
            raise ValueError("the norm rule needs the HookSite of mask.norm_site")
        self.mask, self.norm_site = mask, norm_site
        self._ids_now: Tensor | None = None
        self._where: Tensor | None = None  # bool [B, T] of the current forward, once known

    def _ids(self, ids: Tensor) -> None:
        self._ids_now = ids
        self._where = None if self.mask.norm_threshold is not None else self.mask.keep(self._positions(ids), ids)

    def _norms(self, a: Tensor) -> None:
        ids = self._ids_now
        norms = torch.linalg.vector_norm(a.detach().float(), dim=-1).to(ids.device)
        self._where = self.mask.keep(self._positions(ids), ids, norms)

    @staticmethod
    def _positions(ids: Tensor) -> Tensor:
        """Context positions [B, T] of whole contexts: 0..T-1 in every row."""
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    @contextlib.contextmanager
    def attach(self, lm) -> Iterator[None]:
        def on_forward(mod, args, kwargs):
            self._ids(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

        handles = [lm.register_forward_pre_hook(on_forward, with_kwargs=True)]
        if self.mask.norm_threshold is not None:
            handles.append(register_read(lm, self.norm_site, self._norms))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._where = self._ids_now = None

    def where(self, a: Tensor) -> Tensor:
        """Bool [B, T] for the activation a [B, T, d] of the current forward."""
        if self._where is None:
            raise RuntimeError("SplicePositions.where outside an attached forward, or before the norm site")
        return self._where.to(a.device)


def spliced_positions(mask: RowMask) -> str:
    """eval.json's description of the positions the interventions replace."""
    if mask.only_positions:
        return "1..T-1 (position 0 keeps its clean activation)" if mask.drop_bos else "all"
    left = (["position 0"] if mask.drop_bos else []) + ([f"token ids {list(mask.token_ids)}"] if mask.token_ids else [])
    if mask.norm_threshold is not None:
        left.append(f"norm of {mask.norm_site} above {mask.norm_threshold:.6g}")
    return f"all but the masked ones ({', '.join(left)}), which keep their clean activation"


def positions_of(where: "int | SplicePositions", a: Tensor) -> Tensor:
    """Bool [B, T] of the positions to replace in a [B, T, d]: positions start.. for an int `where`,
    else the SplicePositions of the current forward."""
    if isinstance(where, int):
        m = torch.zeros(a.shape[:2], dtype=torch.bool, device=a.device)
        m[:, where:] = True
        return m
    return where.where(a)
