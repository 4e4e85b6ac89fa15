"""Documents from .txt/.jsonl/.parquet, deterministic context packing, BOS policies, errors."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from shared.tokens import BOS_POLICIES, DatasetError, load_documents, pack_contexts, policy_record

L = 32


def _stream(lines, tok, sep):
    """Reference token stream: doc0 sep doc1 sep doc2 ..."""
    out = []
    for i, line in enumerate(lines):
        if i:
            out.append(sep)
        out.extend(tok.encode(line, add_special_tokens=False))
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_formats_give_same_documents(fmt, tiny_corpus):
    docs = load_documents(str(tiny_corpus[fmt]))
    assert list(docs) == tiny_corpus["lines"]
    assert list(docs) == list(docs)  # re-iterable, same order
    ident = docs.identity
    assert ident["kind"] == "file" and ident["path"] == str(tiny_corpus[fmt].resolve())
    assert ident["sha256"] == hashlib.sha256(tiny_corpus[fmt].read_bytes()).hexdigest()
    assert (ident["split"], ident["text_column"], ident["format"]) == ("train", "text", fmt)


def test_txt_skips_blank_lines_and_jsonl_null_text(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\n\n   \nsecond doc\r\n", encoding="utf-8")
    assert list(load_documents(str(p))) == ["first doc", "second doc"]
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": null}\n{"text": ""}\n{"text": "two"}\n', encoding="utf-8")
    assert list(load_documents(str(j))) == ["one", "two"]


@pytest.mark.parametrize("policy", BOS_POLICIES)
def test_pack_is_deterministic_and_resumable(policy, tiny_corpus, tiny_tokenizer):
    docs = load_documents(str(tiny_corpus["txt"]))
    a = list(pack_contexts(docs, tiny_tokenizer, L, policy))
    b = list(pack_contexts(load_documents(str(tiny_corpus["parquet"])), tiny_tokenizer, L, policy))
    assert len(a) > 50
    assert all(c.dtype == np.int32 and c.shape == (L,) for c in a)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    for start in (1, 7, len(a) - 1, len(a)):
        tail = list(pack_contexts(docs, tiny_tokenizer, L, policy, start_context=start))
        assert len(tail) == len(a) - start
        if tail:
            np.testing.assert_array_equal(np.stack(tail), np.stack(a[start:]))


def test_bos_policy_context_layout(tiny_corpus, tiny_tokenizer):
    lines = tiny_corpus["lines"]
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    ctxs = np.stack(list(pack_contexts(lines, tiny_tokenizer, L, "context")))
    assert (ctxs[:, 0] == bos).all()
    assert not (ctxs[:, 1:] == bos).any()
    stream = _stream(lines, tiny_tokenizer, eos)
    n = len(ctxs)
    assert n == len(stream) // (L - 1)  # partial final context dropped
    np.testing.assert_array_equal(ctxs[:, 1:].reshape(-1), stream[: n * (L - 1)])
    assert (ctxs == eos).sum() > 0  # document separators present


def test_bos_policy_none_layout(tiny_corpus, tiny_tokenizer):
    lines = tiny_corpus["lines"]
    eos = tiny_tokenizer.eos_token_id
    ctxs = np.stack(list(pack_contexts(lines, tiny_tokenizer, L, "none")))
    stream = _stream(lines, tiny_tokenizer, eos)
    assert len(ctxs) == len(stream) // L
    np.testing.assert_array_equal(ctxs.reshape(-1), stream[: len(ctxs) * L])
    assert not (ctxs == tiny_tokenizer.bos_token_id).any()


def test_policy_record(tiny_tokenizer):
    rec = policy_record(tiny_tokenizer, "context")
    assert rec["context_start_token_id"] == tiny_tokenizer.bos_token_id
    assert rec["context_start_token"] == "<|bos|>"
    assert (rec["separator_token_id"], rec["separator_token"]) == (tiny_tokenizer.eos_token_id, "<|eos|>")
    rec = policy_record(tiny_tokenizer, "none")
    assert rec["bos_policy"] == "none" and rec["context_start_token_id"] is None
    assert json.loads(json.dumps(rec)) == rec
    with pytest.raises(ValueError, match="context, none"):
        policy_record(tiny_tokenizer, "always")


def test_tokenizer_without_bos_uses_eos(tiny_tokenizer_dir, tiny_corpus):
    """GPT-2 style: no BOS token, so EOS starts each context and separates documents."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.bos_token = None
    assert tok.bos_token_id is None
    eos = tok.eos_token_id
    rec = policy_record(tok, "context")
    assert rec["context_start_token_id"] == rec["separator_token_id"] == eos
    ctxs = np.stack(list(pack_contexts(tiny_corpus["lines"], tok, L, "context")))
    assert (ctxs[:, 0] == eos).all()
    np.testing.assert_array_equal(ctxs[:, 1:].reshape(-1), _stream(tiny_corpus["lines"], tok, eos)[: len(ctxs) * (L - 1)])


def test_too_small_corpus(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="corpus has 0 tokens, fewer than one context of 32"):
        list(pack_contexts(load_documents(str(empty)), tiny_tokenizer, L, "context"))
    short = tmp_path / "short.txt"
    short.write_text("a red boat\n", encoding="utf-8")
    n = len(tiny_tokenizer.encode("a red boat", add_special_tokens=False))
    with pytest.raises(DatasetError, match=f"corpus has {n} tokens, fewer than one context of 32"):
        list(pack_contexts(load_documents(str(short)), tiny_tokenizer, L, "none"))
    with pytest.raises(ValueError, match="valid policies"):
        list(pack_contexts(["x"], tiny_tokenizer, L, "sometimes"))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DatasetError, match="missing.jsonl.* does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"))
    other = tmp_path / "data.csv"
    other.write_text("text\nhello\n")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.csv'"):
        load_documents(str(other))


def test_missing_column(tiny_corpus):
    for fmt in ("jsonl", "parquet"):
        with pytest.raises(DatasetError) as e:
            load_documents(str(tiny_corpus[fmt]), text_column="content")
        msg = str(e.value)
        assert "'content'" in msg and "id, text" in msg and str(tiny_corpus[fmt].resolve()) in msg


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', encoding="utf-8")
    docs = load_documents(str(p))  # the first record is valid
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3: bad JSON line"):
        list(docs)
    p.write_text('{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: bad JSON line"):
        load_documents(str(p))
    p.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="holds int, expected a string"):
        list(load_documents(str(p)))


def test_unreadable_files(tmp_path):
    pq = tmp_path / "broken.parquet"
    pq.write_bytes(b"this is not parquet")
    with pytest.raises(DatasetError, match=r"broken\.parquet: not a readable parquet file"):
        load_documents(str(pq))
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"good line\ncaf\xe9\n")
    with pytest.raises(DatasetError, match=r"latin1\.txt:2: not valid UTF-8"):
        list(load_documents(str(txt)))
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(DatasetError, match="is not a regular file"):
        load_documents(str(folder))


@pytest.mark.parametrize("dataset", ["roneneldan/TinyStories", "wikitext"])
def test_hub_dataset_offline_fails_fast(dataset):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        load_documents(dataset)
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert "\n" not in msg and repr(dataset) in msg and "offline" in msg
    assert ".txt/.jsonl/.parquet" in msg
