"""Offline fixtures shared by the test modules: a tiny BPE tokenizer, a tiny corpus in three
formats, tiny random LMs, and the session's reference artefacts made from them (the synthetic
sparse cache, a training run on it, a harvest of the tiny Llama). Helpers that are not fixtures
live in tests/helpers.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import (  # noqa: E402
    ARCH_FIXTURES,
    D_MODEL,
    MAX_POS,
    N_LAYERS,
    build_sparse_cache,
    build_transcoder_cache,
    cfg_for,
    harvest_config,
    make_lines,
)

BOS, EOS = "<|bos|>", "<|eos|>"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Byte-level BPE (vocab 400, specials <|bos|>=0, <|eos|>=1) saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_lines(400, seed=123), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    """300 deterministic English documents as corpus.txt / .jsonl ("text") / .parquet ("text")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = make_lines(300, seed=0)
    d = tmp_path_factory.mktemp("corpus")
    paths = {"lines": lines, "txt": d / "corpus.txt", "jsonl": d / "corpus.jsonl", "parquet": d / "corpus.parquet"}
    paths["txt"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["jsonl"].write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(lines)), encoding="utf-8"
    )
    pq.write_table(pa.table({"id": list(range(len(lines))), "text": lines}), paths["parquet"])
    return paths


def _save_model(tmp_path_factory, name, config, model_cls, tokenizer_dir) -> Path:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = model_cls(config).eval()
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _common(tokenizer_dir) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=2, n_positions=MAX_POS, **_common(tiny_tokenizer_dir))
    return _save_model(tmp_path_factory, "gpt2", cfg, GPT2LMHeadModel, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=MAX_POS, **_common(tiny_tokenizer_dir))
    return _save_model(tmp_path_factory, "llama", cfg, LlamaForCausalLM, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=MAX_POS, use_parallel_residual=True, **_common(tiny_tokenizer_dir))
    return _save_model(tmp_path_factory, "neox", cfg, GPTNeoXForCausalLM, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=64, max_position_embeddings=MAX_POS, sliding_window=16,
                       **_common(tiny_tokenizer_dir))
    return _save_model(tmp_path_factory, "gemma2", cfg, Gemma2ForCausalLM, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def loaded_models(request):
    """Lazily loaded LoadedModel per architecture key of ARCH_FIXTURES, cached for the session."""
    from shared.models import load_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(str(request.getfixturevalue(ARCH_FIXTURES[arch])))
        return cache[arch]

    return get


# --------------------------------------------------------------------------- reference artefacts
# Read-only for the tests that take them (copy one before damaging it); built once per session.


@pytest.fixture(scope="session")
def sparse_cache(tmp_path_factory) -> Path:
    """The synthetic sealed cache of tests.helpers.build_sparse_cache (6 x 512 rows, d_model 16):
    x = sparse codes @ a random dictionary (+ small noise), so SAEs can learn it."""
    return build_sparse_cache(tmp_path_factory.mktemp("sparse") / "cache")


@pytest.fixture(scope="session")
def transcoder_cache(tmp_path_factory) -> Path:
    """The synthetic sealed cache of tests.helpers.build_transcoder_cache: mlp_in and mlp_out at
    layers 0 and 1 (6 x 512 rows, d_model 16), every site driven by the same sparse codes."""
    return build_transcoder_cache(tmp_path_factory.mktemp("transcoder") / "cache")


@pytest.fixture(scope="session")
def reference_run(sparse_cache, tmp_path_factory) -> Path:
    """The run folder of cfg_for's batchtopk run on sparse_cache, trained in this process."""
    from train.training import train_sae

    out = tmp_path_factory.mktemp("ref")
    _, run_dir = train_sae(None, cfg_for(sparse_cache, out, arch="batchtopk"), progress=False)
    return run_dir


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, tiny_llama_dir, tiny_corpus) -> Path:
    """The reference harvest of tests.helpers.harvest_config: tiny Llama, layer 1, 5 shards."""
    from harvest.runner import run_harvest

    out = tmp_path_factory.mktemp("ref") / "cache"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out), progress=False)
    return out


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster (and steadier on a loaded machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fault(monkeypatch):
    """Set SAEFORGE_FAULT for in-process code, with fresh hit counters."""
    from shared import faults

    def set_(spec: str | None) -> None:
        monkeypatch.setattr(faults, "_hits", {})
        if spec is None:
            monkeypatch.delenv("SAEFORGE_FAULT", raising=False)
        else:
            monkeypatch.setenv("SAEFORGE_FAULT", spec)

    return set_
