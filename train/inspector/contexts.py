"""Token windows around cache rows, from the cache's `tokens` and `positions` (no LM pass), and
their decoding with the tokenizer the cache was harvested with.

Contexts. A new context starts at a row whose position is not the previous row's position + 1
(position 0 always starts one; so does the first row of a shard: shards hold whole contexts). The
window of row r is rows r - before .. r + after, cut at the edges of r's context: W = before +
after + 1 slots, r itself at slot `before`, -1 in the slots outside the context.

Decoding is token by token (`tokenizer.decode([id])`, as sae_vis and Neuronpedia show tokens); a
token that is a partial UTF-8 sequence decodes to the replacement character.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.cache import Cache
from shared.errors import UserError


class TokenizerError(UserError):
    """A tokenizer could not be loaded; the message says what to do."""


def context_starts(positions: np.ndarray) -> np.ndarray:
    """[n] bool: rows that start a context (see the module docstring). positions: int [n]."""
    starts = np.ones(len(positions), dtype=bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    return starts


def window_rows(positions: np.ndarray, rows: np.ndarray, before: int, after: int) -> np.ndarray:
    """[len(rows), before + after + 1] int64: indices into `positions` of the window of each row
    (`rows`: int indices into positions), -1 outside the row's context or the array."""
    n = len(positions)
    context = np.cumsum(context_starts(positions)) - 1
    rows = np.asarray(rows, dtype=np.int64)
    t = rows[:, None] + np.arange(-before, after + 1, dtype=np.int64)[None, :]
    inside = (t >= 0) & (t < n)
    same = context[np.clip(t, 0, max(n - 1, 0))] == context[rows][:, None]
    return np.where(inside & same, t, -1)


@dataclass
class Windows:
    """Token windows of a set of global rows (unique, ascending).

    rows [N] int64 global rows; tokens [N, W] int64 token ids (-1 outside the context);
    positions [N] int64: each row's position in its context."""

    rows: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray


def token_windows(cache: Cache, rows: np.ndarray, before: int, after: int) -> Windows:
    """Windows of the given global rows (any order, duplicates allowed), read one shard at a time
    from the cache's `tokens` and `positions` vectors."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    rps = cache.spec.rows_per_shard
    W = before + after + 1
    tokens = np.full((len(rows), W), -1, dtype=np.int64)
    positions = np.zeros(len(rows), dtype=np.int64)
    shard_of = rows // rps
    for k in np.unique(shard_of).tolist():
        sel = np.flatnonzero(shard_of == k)
        local = rows[sel] - k * rps
        pos = cache.read_vector("positions", k)
        tok = cache.read_vector("tokens", k)
        win = window_rows(pos, local, before, after)
        tokens[sel] = np.where(win >= 0, tok[np.clip(win, 0, None)], -1)
        positions[sel] = pos[local]
    return Windows(rows, tokens, positions)


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a hub id, a local HF folder or a .gguf file (no network when offline).
    TokenizerError (one line) when it cannot be loaded."""
    from transformers import AutoTokenizer

    from shared.models import hub_offline_reason

    path = Path(spec).expanduser()
    try:
        if path.exists():
            path = path.resolve()
            if path.is_file():
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if spec.startswith(("/", ".", "~")):
            raise TokenizerError(f"tokenizer path {str(path)!r} does not exist")
        return AutoTokenizer.from_pretrained(spec, local_files_only=hub_offline_reason() is not None)
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load a tokenizer from {spec!r}: {first}") from None


def decode_tokens(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    """{id: text} of each distinct id, decoded one token at a time (ids outside the vocabulary
    give '<id N>')."""
    ids = sorted({int(i) for i in np.asarray(ids).ravel() if i >= 0})
    vocab = len(tokenizer)
    good = [i for i in ids if i < vocab]
    texts = tokenizer.batch_decode([[i] for i in good], clean_up_tokenization_spaces=False) if good else []
    out = dict(zip(good, texts))
    out.update({i: f"<id {i}>" for i in ids if i >= vocab})
    return out


def tokenizer_check(tokenizer: Any, recorded_hash: str | None) -> bool | None:
    """Whether the tokenizer's hash equals the cache's recorded one (None when none is recorded)."""
    from shared.models import tokenizer_hash

    return None if not recorded_hash else tokenizer_hash(tokenizer) == recorded_hash
