"""`train inspect`: a run's SAE -> one streamed pass over cache shards -> a static feature browser.

    load the run (loading.load_target) -> stream the shards through its encoder (stream) ->
    token windows of the kept examples (contexts) -> logit effects and neighbours (logits) ->
    records (records) -> the site, written crash-safely (site)

The LM is loaded only for the logit effect (its unembedding and final norm); the contexts need only
the cache and a tokenizer. Without a loadable model the logit effect is skipped with a note; without
a tokenizer the tokens are shown as ids, with a note.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from shared.cache_spec import software_version
from train.inspector import logits as logit_mod
from train.inspector.contexts import TokenizerError, decode_tokens, load_tokenizer, token_windows, tokenizer_check
from train.inspector.loading import InspectError, Target, choose_shards, inference_encoder, load_target, resolve_device
from train.inspector.records import Records, example_rows
from train.inspector.site import check_out, js_assign, js_chunk, write_site
from train.inspector.stream import collect_stats

CHUNK_SIZE = 64  # latents per data/chunks file


@dataclass
class Settings:
    """What `train inspect` computes; CLI options of the same names.

    shards: '3,5-7' (default: the run's held-out shards); tokens: cap on encoded rows; top: top
    examples per latent; bands, per_band: activation bands and uniform samples in each; bins:
    histogram bins; before, after: context tokens shown around each example; batch_rows: rows per
    encoder batch (whole contexts); logit_tokens: promoted / suppressed tokens kept; neighbours:
    nearest latents kept."""

    shards: str | None = None
    tokens: int | None = None
    top: int = 20
    bands: int = 8
    per_band: int = 3
    bins: int = 64
    before: int = 16
    after: int = 4
    batch_rows: int = 1024
    logit_tokens: int = 10
    neighbours: int = 5
    device: str = "cpu"
    store: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    no_logits: bool = False
    token_ids: bool = False
    force: bool = False
    progress: bool = True


@dataclass
class Language:
    """The tokenizer (or None), the unembedding W_U [d, vocab] and final-norm gain (or None), and notes."""

    tokenizer: Any = None
    W_U: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    model_id: str | None = None
    notes: list[str] = field(default_factory=list)
    logits_note: str | None = None


def language_side(target: Target, s: Settings) -> Language:
    """Load what the site needs from the LM: the tokenizer always (unless token_ids), the model only
    for the logit effect (unless no_logits). An explicit --model / --tokenizer that fails is an error;
    the recorded model failing becomes a note."""
    from shared.models import ModelLoadError, load_model

    spec = target.cache.spec
    recorded = spec.model.get("id")
    out = Language(model_id=s.model or recorded)
    if s.no_logits:
        out.logits_note = "logit effect not computed (--no-logits)"
    elif not out.model_id:
        out.logits_note = "logit effect skipped: the cache records no model; pass --model"
    else:
        try:
            loaded = load_model(str(out.model_id))
        except ModelLoadError as e:
            if s.model:
                raise InspectError(str(e)) from None
            out.logits_note = f"logit effect skipped: {e}; pass --model"
        else:
            if loaded.info.d_model != spec.d_model:
                raise InspectError(f"model {out.model_id!r} has d_model={loaded.info.d_model} but the cache has "
                                   f"{spec.d_model}; pass the harvested model with --model")
            out.W_U = logit_mod.unembedding(loaded.model)
            norm = logit_mod.find_final_norm(loaded.model)
            out.gain = logit_mod.norm_gain(norm, spec.d_model) if norm is not None else None
            if norm is None:
                out.notes.append("no final norm found: the logit effect uses the bare unembedding")
            if spec.model.get("config_hash") and loaded.info.config_hash != spec.model.get("config_hash"):
                out.notes.append(f"model {out.model_id} differs from the harvested one (config hash): logit effects "
                                 "may not describe the model the SAE was trained on")
            if not s.tokenizer and not s.token_ids:
                out.tokenizer = loaded.tokenizer
            del loaded
    if s.token_ids:
        out.tokenizer = None
        out.notes.append("tokens shown as ids (--token-ids)")
    elif out.tokenizer is None:
        tok_spec = s.tokenizer or s.model or recorded
        try:
            if not tok_spec:
                raise TokenizerError("the cache records no model id")
            out.tokenizer = load_tokenizer(str(tok_spec))
        except TokenizerError as e:
            if s.tokenizer or s.model:
                raise InspectError(str(e)) from None
            out.notes.append(f"no tokenizer could be loaded ({e}): tokens are shown as ids; pass --tokenizer")
    if out.tokenizer is not None and tokenizer_check(out.tokenizer, spec.model.get("tokenizer_hash")) is False:
        raise InspectError(f"tokenizer {s.tokenizer or out.model_id!r} differs from the one the cache was harvested "
                           "with (tokenizer hash): its tokens would be wrong; pass the harvested one with --tokenizer, "
                           "or --token-ids")
    return out


def site_files(meta: dict[str, Any], stats, windows, vocab: dict[str, str], logits=None,
               near=None) -> Iterator[tuple[str, bytes]]:
    """The site's data files, (relative path, bytes), one chunk of CHUNK_SIZE latents at a time."""
    records = Records(stats, windows, logits, near)
    yield "data/meta.js", js_assign("meta", meta)
    yield "data/index.js", js_assign("index", records.index())
    yield "data/vocab.js", js_assign("vocab", vocab)
    for n, start in enumerate(range(0, stats.d_sae, CHUNK_SIZE)):
        yield f"data/chunks/{n:06d}.js", js_chunk(n, records.latents(start, min(start + CHUNK_SIZE, stats.d_sae)))


def _shards_text(shards: list[int]) -> str:
    parts, i = [], 0
    while i < len(shards):
        j = i
        while j + 1 < len(shards) and shards[j + 1] == shards[j] + 1:
            j += 1
        parts.append(str(shards[i]) if i == j else f"{shards[i]}-{shards[j]}")
        i = j + 1
    return ",".join(parts)


def inspect_checkpoint(path: str | os.PathLike, out: str | os.PathLike, settings: Settings | None = None,
                       **options: Any) -> tuple[Path, dict[str, Any]]:
    """Build the feature browser of a run folder's newest checkpoint (or one checkpoint folder) in
    `out`. options: Settings fields. Returns (the site folder, its meta record)."""
    s = settings or Settings(**options)
    if s.top < 1 or s.bands < 1 or s.per_band < 0 or s.bins < 1 or s.before < 0 or s.after < 0 or s.batch_rows < 1:
        raise InspectError("--top, --bands, --bins and --batch-rows must be positive; --per-band, --before and "
                           "--after must not be negative")
    if s.bins & (s.bins - 1) or s.bands & (s.bands - 1) or s.bands > s.bins:
        raise InspectError(f"--bins ({s.bins}) and --bands ({s.bands}) must be powers of two with bands <= bins")
    check_out(out, s.force)
    target = load_target(path, s.store)
    encode, label = inference_encoder(target.sae, target.checkpoint)
    shards = choose_shards(target, s.shards)
    device = resolve_device(s.device)
    t0 = time.perf_counter()
    lang = language_side(target, s)  # before the pass: a bad --model or --tokenizer fails at once
    sae = target.sae.to(device)
    stats, report = collect_stats(encode, sae.d_sae, target.cache, target.cfg.site, shards, scale=target.scale,
                                  mask=target.mask, before=s.before, after=s.after, top=s.top, bands=s.bands,
                                  per_band=s.per_band, bins=s.bins, batch_rows=s.batch_rows, max_rows=s.tokens,
                                  device=device, progress=s.progress)
    if stats.rows_seen == 0:
        raise InspectError(f"shards {_shards_text(shards)} hold no rows to encode; choose other --shards")
    W_dec = sae.W_dec.detach().float() / target.scale  # raw activation units
    logits = None
    if lang.W_U is not None:
        logits = logit_mod.logit_effect(W_dec, lang.W_U.to(device), lang.gain, k=s.logit_tokens)
    near = logit_mod.nearest_latents(W_dec, k=s.neighbours)
    windows = token_windows(target.cache, example_rows(stats), s.before, s.after)
    used = [windows.tokens.ravel()]
    if logits is not None:
        used += [logits.pos_ids.numpy().ravel(), logits.neg_ids.numpy().ravel()]
    vocab: dict[str, str] = {}
    if lang.tokenizer is not None:
        vocab = {str(k): v for k, v in decode_tokens(lang.tokenizer, np.concatenate(used)).items()}
    cfg = target.cfg
    meta = {
        "run_name": cfg.run_name, "run_dir": str(target.run_dir), "checkpoint": str(target.checkpoint),
        "step": target.state.get("step"), "arch": cfg.arch, "k": sae.describe()["k"],
        "d_in": sae.d_in, "d_sae": sae.d_sae, "site": cfg.site, "model": lang.model_id, "encoding": label,
        "cache": target.cache.where, "shards": shards, "shards_text": _shards_text(shards), "rows": stats.rows_seen,
        "token_cap": s.tokens, "drop_bos": target.drop_bos, "row_mask": target.mask.record(), "scaling_factor": target.scale,
        "rows_per_shard": target.cache.spec.rows_per_shard, "context_length": target.cache.spec.context_length,
        "window": {"before": s.before, "after": s.after}, "top": s.top, "bands": s.bands, "per_band": s.per_band,
        "bins": s.bins, "chunk_size": CHUNK_SIZE, "has_tokenizer": lang.tokenizer is not None,
        "has_logits": logits is not None, "logits_note": lang.logits_note,
        "notes": lang.notes + ([lang.logits_note] if lang.logits_note else []),
        "pass": {"rows": report.rows, "seconds": round(report.seconds, 3), "encode_seconds": round(report.encode_seconds, 3),
                 "tokens_per_second": round(report.rows / report.seconds, 1) if report.seconds else None,
                 "device": str(device)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software_version": software_version(),
    }

    site = write_site(out, site_files(meta, stats, windows, vocab, logits, near), force=s.force)
    meta["seconds_total"] = round(time.perf_counter() - t0, 3)
    return site, meta
