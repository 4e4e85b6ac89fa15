"""Token pipeline: documents (local file or hub dataset) -> fixed-length int32 contexts.

The context stream is a pure function of (documents, tokenizer, context_length, bos_policy):
context i always holds the same tokens, so shard k of a harvest always holds the same rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from shared.errors import UserError

FILE_FORMATS = (".txt", ".jsonl", ".parquet")
BOS_POLICIES = ("context", "none")
_TOKENIZE_BATCH = 256  # documents per tokenizer call


class DatasetError(UserError):
    """A corpus cannot be read or packed; the message is one line naming the file/field at fault."""


@dataclass
class Documents:
    """Iterable over the documents (str, never empty) of a corpus, always in the same order.

    identity: provenance for the cache, e.g. {"kind": "file", "path", "sha256", "format",
    "split", "text_column"} or {"kind": "hub", "id", "revision", "split", "text_column"}.
    """

    identity: dict[str, Any]
    _open: Callable[[], Iterator[str]] = field(repr=False)

    def __iter__(self) -> Iterator[str]:
        return self._open()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _iter_txt(path: Path) -> Iterator[str]:
    """One document per non-empty line (line ending stripped)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from e
            if line.strip():
                yield line


def _jsonl_text(path: Path, lineno: int, raw: bytes, column: str) -> str | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}:{lineno}: bad JSON line ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if column not in obj:
        raise DatasetError(
            f"{path}:{lineno}: no column {column!r}; available columns: {', '.join(sorted(obj)) or '(none)'}"
        )
    return _check_text(obj[column], f"{path}:{lineno}", column)


def _check_text(value: Any, where: str, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise DatasetError(f"{where}: column {column!r} holds {type(value).__name__}, expected a string")


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                text = _jsonl_text(path, lineno, raw, column)
                if text:
                    yield text


def _parquet_file(path: Path, column: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise DatasetError(f"{path}: no column {column!r}; available columns: {', '.join(names)}")
    return pf


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    pf = _parquet_file(path, column)
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            text = _check_text(value, str(path), column)
            if text:
                yield text


def _load_file(path: Path, split: str, text_column: str) -> Documents:
    fmt = path.suffix.lower()
    if fmt not in FILE_FORMATS:
        raise DatasetError(f"{path}: unsupported file type {fmt!r}; use one of {', '.join(FILE_FORMATS)}")
    if not path.exists():
        raise DatasetError(f"dataset file {str(path)!r} does not exist")
    if not path.is_file():
        raise DatasetError(f"dataset path {str(path)!r} is not a regular file; pass a file")
    try:
        digest = _sha256_file(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
    if fmt == ".jsonl":  # validate the first record now, not mid-harvest
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    _jsonl_text(path, lineno, raw, text_column)
                    break
        opener = lambda: _iter_jsonl(path, text_column)  # noqa: E731
    elif fmt == ".parquet":
        _parquet_file(path, text_column)
        opener = lambda: _iter_parquet(path, text_column)  # noqa: E731
    else:
        opener = lambda: _iter_txt(path)  # noqa: E731
    identity = {"kind": "file", "path": str(path), "sha256": digest, "format": fmt.lstrip("."),
                "split": split, "text_column": text_column}
    return Documents(identity, opener)


def _load_hub(dataset: str, split: str, text_column: str, revision: str | None) -> Documents:
    from shared.models import hub_offline_reason

    hint = "pass a local .txt/.jsonl/.parquet file instead"
    reason = hub_offline_reason()
    if reason is not None:
        raise DatasetError(f"cannot stream hub dataset {dataset!r}: {reason}; {hint}")
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True, revision=revision)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"cannot stream hub dataset {dataset!r} split {split!r}: {first}; {hint}") from e
    names = list(ds.features) if ds.features is not None else None
    if names is not None and text_column not in names:
        raise DatasetError(
            f"hub dataset {dataset!r}: no column {text_column!r}; available columns: {', '.join(names)}"
        )
    sha = revision
    try:
        import huggingface_hub

        sha = huggingface_hub.HfApi().dataset_info(dataset, revision=revision).sha
    except Exception:  # noqa: BLE001 - provenance only; keep the requested revision
        pass

    def opener() -> Iterator[str]:
        for i, row in enumerate(ds):
            text = _check_text(row.get(text_column), f"{dataset}[{i}]", text_column)
            if text:
                yield text

    identity = {"kind": "hub", "id": dataset, "revision": sha, "split": split, "text_column": text_column}
    return Documents(identity, opener)


def _is_local(dataset: str) -> bool:
    p = Path(dataset)
    return p.exists() or p.suffix.lower() in FILE_FORMATS or dataset.startswith(("/", ".", "~"))


def load_documents(
    dataset: str, split: str = "train", text_column: str = "text", revision: str | None = None
) -> Documents:
    """Documents of a local .txt (one per non-empty line), .jsonl (field `text_column`) or
    .parquet (column `text_column`) file, or of hub dataset `dataset` (streamed, split `split`).

    Empty or null texts are skipped in every format. Raises DatasetError (one line).
    """
    if _is_local(dataset):
        return _load_file(Path(dataset).expanduser().absolute(), split, text_column)
    return _load_hub(dataset, split, text_column, revision)


def _special_ids(tokenizer) -> tuple[int | None, int]:
    """(leading BOS id or EOS fallback, document separator: EOS id or BOS fallback)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise DatasetError(
            "tokenizer has neither a BOS nor an EOS token; cannot mark context or document boundaries"
        )
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def _check_policy(bos_policy: str) -> None:
    if bos_policy not in BOS_POLICIES:
        raise ValueError(f"unknown bos_policy {bos_policy!r}; valid policies: {', '.join(BOS_POLICIES)}")


def policy_record(tokenizer, bos_policy: str) -> dict[str, Any]:
    """Concrete description of `bos_policy` for provenance (token ids and strings)."""
    _check_policy(bos_policy)
    lead, sep = _special_ids(tokenizer)
    lead = lead if bos_policy == "context" else None
    tok = tokenizer.convert_ids_to_tokens
    return {
        "bos_policy": bos_policy,
        "context_start_token_id": lead,
        "context_start_token": tok(lead) if lead is not None else None,
        "separator_token_id": sep,
        "separator_token": tok(sep),
        "separator": "between documents",
    }


def _token_pieces(documents: Iterable[str], tokenizer, sep: int) -> Iterator[np.ndarray]:
    """Stream doc0, [sep], doc1, [sep], doc2, ... as int32 arrays (batched tokenisation)."""
    sep_arr = np.array([sep], dtype=np.int32)
    first = True
    batch: list[str] = []

    def flush():
        nonlocal first
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for doc in ids:
            if not first:
                yield sep_arr
            first = False
            yield np.asarray(doc, dtype=np.int32)
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) >= _TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def pack_contexts(
    documents: Iterable[str], tokenizer, context_length: int, bos_policy: str, start_context: int = 0
) -> Iterator[np.ndarray]:
    """Yield contexts i = start_context, start_context+1, ... as int32 arrays [context_length].

    The documents are tokenised (no special tokens) and joined into one stream with a separator
    token between documents (EOS, or BOS if there is no EOS). bos_policy "context": each context
    is [BOS] + the next context_length-1 stream tokens (EOS if there is no BOS); "none": each
    context is the next context_length stream tokens. The partial final context is dropped.
    Raises DatasetError if the corpus cannot fill a single context.
    """
    _check_policy(bos_policy)
    lead, sep = _special_ids(tokenizer)
    body = context_length - 1 if bos_policy == "context" else context_length
    if body < 1 or start_context < 0:
        raise ValueError(f"context_length {context_length} / start_context {start_context} out of range")
    head = np.array([lead], dtype=np.int32) if bos_policy == "context" else np.zeros(0, np.int32)
    skip = start_context * body  # stream tokens before the first yielded context
    total, pending, n_pending = 0, [], 0
    for piece in _token_pieces(documents, tokenizer, sep):
        total += len(piece)
        if skip:
            cut = min(skip, len(piece))
            piece, skip = piece[cut:], skip - cut
        if not len(piece):
            continue
        pending.append(piece)
        n_pending += len(piece)
        if n_pending >= body:
            flat = np.concatenate(pending)
            n_full = len(flat) // body
            for i in range(n_full):
                yield np.concatenate([head, flat[i * body:(i + 1) * body]])
            rest = flat[n_full * body:]
            pending, n_pending = [rest], len(rest)
    if total < body:
        raise DatasetError(
            f"corpus has {total} tokens, fewer than one context of {context_length} "
            f"({body} corpus tokens per context with bos_policy {bos_policy!r}); use a larger corpus"
        )
