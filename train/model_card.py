"""The model card (README.md) `train export --format saelens` writes beside cfg.json and
sae_weights.safetensors, and the upload of that folder (`--push-to-hub REPO`).

The card is Markdown with YAML front matter the Hugging Face hub reads (library_name: saelens,
tags; base_model and datasets only when the cache recorded hub ids: local paths are not hub
metadata). Its body: the architecture and training recipe (the run's config), the model, hook
site and dataset with the hashes of the cache's provenance (the spec in the cache's zarr.json:
model config / tokenizer sha256, revision, dataset sha256 or revision) and the cache identity
(train.row_order.cache_identity), the training tokens, and the figures of `train eval` when an
eval.json of this very checkpoint sits in the run or checkpoint folder (else how to get them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.errors import UserError
from train.layout import EVAL
from train.saebench import SAEBENCH_FILENAME

CARD_FILENAME = "README.md"
RECIPE_KEYS = ("arch", "d_in", "dict_size", "expansion", "k", "l1_coeff", "l0_coeff", "aux_k", "aux_coeff",
               "lr", "beta1", "beta2", "lr_warmup_tokens", "lr_decay", "batch_size", "tokens", "normalize",
               "drop_bos", "mask_token_ids", "mask_norm_threshold", "b_dec_init", "threshold_kind", "seed", "heldout_shards")
EVAL_ROWS = (  # (title, key in eval.json's primary encoding or "lm.<key>", format)
    ("explained variance", "explained_variance", ".4f"), ("MSE (raw units)", "mse_raw", ".4g"),
    ("cosine similarity", "cosine_similarity", ".4f"), ("L0", "l0", ".2f"), ("L1", "l1", ".4g"),
    ("dead latents (fraction)", "dead_fraction", ".2%"), ("dense latents (fraction)", "dense_fraction", ".2%"),
    ("CE clean", "lm.ce_clean", ".4f"), ("CE with the SAE spliced in", "ce_spliced", ".4f"),
    ("CE zero-ablated", "lm.ce_zero_ablation", ".4f"), ("CE-loss score", "ce_loss_score", ".4f"),
    ("KL(clean, spliced)", "kl_spliced", ".4g"), ("KL-div score", "kl_div_score", ".4f"),
    # a transcoder's (train.transcoder_eval): its target's FVU, the LM with the covered MLP outputs replaced
    ("FVU of the target", "fvu", ".4f"), ("CE with the MLP output replaced", "ce_replaced", ".4f"),
    ("KL(clean, replaced)", "kl_replaced", ".4g"),
)


def recipe_keys(arch: str) -> list[str]:
    """RECIPE_KEYS, then the keys the variant `arch` reads beyond them (train.sae: config_keys,
    late_config_keys), e.g. matryoshka_widths, target_l0."""
    from train.sae.registry import sae_class

    cls = sae_class(arch)
    own = [*cls.config_keys.values(), *(key for key, _ in cls.late_config_keys.values())]
    return [*RECIPE_KEYS, *(k for k in dict.fromkeys(own) if k not in RECIPE_KEYS)]


class HubError(UserError):
    """The export folder could not be uploaded; the message says why and how to upload it later."""


def find_eval(checkpoint: Path, run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """(eval.json's results, its path) of `checkpoint`, from the checkpoint or the run folder, or None."""
    for folder in (checkpoint, run_dir):
        path = folder / EVAL
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str(results.get("checkpoint")) == str(checkpoint):
            return results, path
    return None


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


def front_matter(arch: str, trained_arch: str, spec) -> str:
    """The card's YAML metadata (strings JSON-quoted, which YAML reads as they are)."""
    lines = ["---", "library_name: saelens"]
    tags = ["saelens", "sparse-autoencoder", "mechanistic-interpretability", "saeforge", trained_arch, arch]
    lines += _yaml_list("tags", list(dict.fromkeys(tags)))
    if spec.model.get("source") == "hub" and spec.model.get("id"):
        lines.append(f"base_model: {json.dumps(spec.model['id'])}")
    dataset = spec.dataset or {}
    if dataset.get("kind") == "hub" and dataset.get("id"):
        lines += _yaml_list("datasets", [dataset["id"]])
    return "\n".join(lines + ["---", ""])


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    for k, v in rows:
        text = json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else str(v)
        out.append(f"| {k} | `{text}` |" if text else f"| {k} | |")
    return out


def _fig(results: dict[str, Any], key: str, spec: str) -> str | None:
    src = results["lm"] if key.startswith("lm.") else results["encodings"][results["primary"]]
    v = src.get(key.removeprefix("lm."))
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return format(v, spec)


def eval_section(found: tuple[dict[str, Any], Path] | None, checkpoint: Path) -> list[str]:
    """The card's evaluation section: eval.json's primary-encoding figures, or how to get them."""
    out = ["## Evaluation", ""]
    if found is None:
        return out + ["This checkpoint has not been evaluated. `train eval " + str(checkpoint) + "` writes eval.json "
                      f"and {SAEBENCH_FILENAME} (SAEBench's core layout); export again to put its figures here.", ""]
    results, path = found
    enc = results["encodings"][results["primary"]]
    settings = results.get("settings", {})
    out += [f"`train eval` of this checkpoint, encoding `{results['primary']}` ({enc.get('label')}), on "
            f"{enc.get('rows')} held-out cache rows (shards {settings.get('heldout_shards')})"
            + ("" if "skipped" in results["lm"] else
               f" and {results['lm'].get('contexts')} held-out contexts of {results['lm'].get('context_length')} "
               f"tokens with `{results['lm'].get('model')}`") + ".", ""]
    rows = [(title, v) for title, key, spec in EVAL_ROWS if (v := _fig(results, key, spec)) is not None]
    out += ["| figure | value |", "|---|---|"] + [f"| {t} | {v} |" for t, v in rows]
    if "skipped" in results["lm"]:
        out += ["", "The LM figures were skipped (`--skip-lm`)."]
    out.append("")
    if (path.parent / SAEBENCH_FILENAME).exists():
        out += [f"The same evaluation in SAEBench's core-eval layout is in `{SAEBENCH_FILENAME}` in this folder.", ""]
    return out


def model_card(config: dict[str, Any], cfg, spec, *, cache_id: str, found: tuple[dict[str, Any], Path] | None,
               checkpoint: Path) -> str:
    """README.md text for an export whose cfg.json is `config` (train.export.saelens_config)."""
    meta = config["metadata"]
    ours = meta["saeforge"]
    arch, trained = config["architecture"], ours["trained_arch"]
    site = ours["site"]
    model, dataset = spec.model or {}, spec.dataset or {}
    recipe = cfg.to_dict()
    lines = [front_matter(arch, trained, spec),
             f"# {trained} SAE on {model.get('id')} at {site['name']}"
             + (f" -> {meta['hook_name_out']}" if meta.get("hook_name_out") else ""), "",
             f"A sparse autoencoder of {config['d_sae']} latents on the {site['kind']} activations of layer "
             f"{site['layer']} (d_in {config['d_in']}), trained with saeforge {ours['software_version']} and "
             f"exported in SAELens {meta['sae_lens_version']}'s format as `{arch}`. It takes raw activations "
             f"(the dataset scaling factor {ours['folded_scaling_factor']:.6g} is folded into the weights).", "",
             "```python", "from huggingface_hub import snapshot_download", "from sae_lens import SAE", "",
             "sae = SAE.load_from_disk(snapshot_download(\"REPO_ID\"))  # or the folder of this file", "```", "",
             "## Architecture and recipe", ""]
    calibrated = [("calibrated threshold", ours["threshold_kind"])] if ours.get("threshold_kind") else []
    lines += _table([("architecture (SAELens)", arch), ("trained as", trained)] + calibrated
                    + [(k, recipe[k]) for k in recipe_keys(cfg.arch) if k in recipe])
    lines += ["", "The full training config is `metadata.saeforge.train_config` in cfg.json.", "",
              "## Model, hook and data", ""]
    lines += _table([("model", model.get("id")), ("model source", model.get("source")),
                     ("model revision", model.get("revision")), ("model config sha256", model.get("config_hash")),
                     ("tokenizer sha256", model.get("tokenizer_hash")), ("LM compute dtype", model.get("compute_dtype")),
                     ("hook (SAELens hook_name)", meta["hook_name"]), ("hooked module", f"{site['hf_module']}"),
                     ("context length", spec.context_length), ("BOS policy", spec.bos_policy)]
                    + [(f"dataset {k}", v) for k, v in dataset.items()]
                    + [("activation cache identity (xxh3-128)", cache_id), ("cache dtype", spec.dtype)])
    tokens = ours.get("tokens_trained")
    trained_on = f"{tokens:,} training tokens" if isinstance(tokens, int) else "Training tokens: not recorded"
    lines += ["", "## Training", "", f"{trained_on} (step {ours.get('step')}, run `{ours.get('run_name')}`).", ""]
    lines += eval_section(found, checkpoint)
    return "\n".join(lines)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_repo_id(repo: str) -> None:
    """HubError unless `repo` is a valid hub repository id (checked before anything is written)."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise HubError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise HubError(f"--push-to-hub {repo!r} is not a hub repository id: {str(e).splitlines()[0]}") from None


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload the export folder to the hub model repository `repo` (created if needed); its URL.
    HubError, one line, when offline or when the upload fails: the folder stays as written."""
    later = f"the export is complete in {folder}; upload it later with `hf upload {repo} {folder}`"
    if _offline():
        raise HubError(f"--push-to-hub {repo}: the hub is offline (HF_HUB_OFFLINE is set); {later}")
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="saeforge export")
    except Exception as e:  # noqa: BLE001 - network, auth, hub errors: one line, the files stay
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"--push-to-hub {repo}: upload failed ({first}); {later}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
