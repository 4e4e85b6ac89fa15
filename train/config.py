"""Training configuration: one typed dataclass, loadable from TOML and overridable by key=value.

The seed's names are kept: `get_default_cfg()`, `update_cfg(cfg, **changes)`,
`post_init_cfg(cfg, d_in=...)`. Building a config has no side effects (no I/O, no random ids).
Unknown keys, wrong types and impossible values raise ConfigError naming the key.

Everything about a key is said once, where the key is declared: its type (a `Literal[...]` lists
its choices, which update_cfg checks), its default, its docstring (the help of `train config` and
of `train run`'s options) and its facts, kept as field metadata (`_key(...)`, read back with
`key_facts`):

    identity      part of the run identity (config_hash, the run name's suffix): True; False for
                  how a run is observed or how fast it computes; "when_set" for keys added after
                  runs were named: they enter the hash only when they differ from their default,
                  so that every older run name stays valid
    resumable     `train resume` may change it (how the run is observed, its budget, its device)
    sweep_shared  every SAE of a sweep has the same value (they read one data stream); a sweep's
                  grid may not vary it
    choices       the valid values when the type cannot list them: `arch` takes the names
                  registered in train.sae (variants register themselves)
    count         a number of tokens: it takes the spellings of shared.counts (20k, 50M, 1e6)
                  wherever it is given (a `train run` option, --set, a TOML file, a sweep spec)
    aliases       older spellings of a value, accepted and stored as the value
    sequence      a comma-separated list held as one string (a TOML list is joined into it)
    legacy        for a key added after runs were made whose default computes something new: the
                  value that computes what runs made before computed; a saved config without the
                  key (`cfg_from_saved`, used to resume) takes it, so old runs resume unchanged

What depends on the architecture is declared by its class (train.sae): the variant checks its own
keys (`config_error`, e.g. k <= dict_size) and names its part of the default run name
(`run_label`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

from shared.autocast import AUTOCAST_ALIASES
from shared.counts import EXAMPLES as COUNT_EXAMPLES, parse_count
from shared.devices import DeviceError, parse_device
from shared.errors import UserError
from train.row_mask import parse_token_ids
from train.sae.registry import arch_names, sae_class
from train.sae.transcoder import sparsity_names


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names the key and what to do."""


def _key(default: Any, *, identity: bool | Literal["when_set"] = True, resumable: bool = False,
         sweep_shared: bool = False, choices: Callable[[], tuple[str, ...]] | None = None,
         aliases: dict[str, str] | None = None, count: bool = False, sequence: bool = False,
         **legacy: Any) -> Any:
    """A TrainConfig field declared with its facts (module docstring) where they differ from the
    usual ones: part of the run identity, fixed on resume, free to vary in a sweep, any value of
    its type. `legacy=VALUE` declares the value older runs computed with."""
    extra = {"legacy": legacy["legacy"]} if "legacy" in legacy else {}
    return field(default=default, metadata={"identity": identity, "resumable": resumable, "sweep_shared": sweep_shared,
                                            "choices": choices, "aliases": aliases or {}, "count": count,
                                            "sequence": sequence, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    store: str = _key("", sweep_shared=True)
    """Path or URL of a sealed activation cache (made by `harvest run`)."""
    allow_unsealed: bool = _key(False, identity="when_set")
    """Train on the shards an unfinished harvest has committed so far (their statistics; the last
    of them held out). A resume then needs the same committed shards: finish the harvest first and
    start a new run to use them all."""
    site: str | None = None
    """Hook site to train on (TransformerLens name); default: the cache's first site. A
    transcoder's is the (first) site its encoder reads, set from in_site."""
    in_site: str | None = _key(None, identity="when_set")
    """Transcoders (arch transcoder, skip_transcoder, clt): the site the encoder reads, a name
    (blocks.3.ln2.hook_normalized) or a kind (mlp_in, resid_mid, resid_pre, ...) taken at the
    target's layer; default mlp_in. A clt: a kind, taken at every layer the cache has both kinds
    at, or its layers' site names, comma-separated."""
    out_site: str | None = _key(None, identity="when_set")
    """Transcoders: the site the decoder predicts, a name or a kind (default mlp_out); a clt: a kind
    or its layers' site names, comma-separated (one per input site, in layer order)."""
    batch_size: int = _key(4096, sweep_shared=True, count=True)
    """Tokens per optimiser step (the global batch)."""
    micro_batch_size: int | None = _key(None, count=True)
    """Tokens per forward/backward; gradients of batch_size / micro_batch_size micro-batches are summed."""
    tokens: int = _key(10_000_000, resumable=True, sweep_shared=True, count=True)
    """Training tokens in total (epochs over the cache continue seamlessly)."""
    window_shards: int = _key(4, sweep_shared=True)
    """Shuffle buffer, in shards read together (all shards = exact global shuffle)."""
    store_threads: int = _key(1, identity=False, resumable=True)
    """torch threads of each of the store's two background threads (window reads, batch gathers).
    1 leaves the cores to a CPU training step; raise it when the step runs on a GPU and the CPU has
    idle cores (2 threads served batches about 1.3x faster on the 2-core development machine:
    pipelines/bench_store.py --store-threads 2). The data and its order do not change."""
    store_io: Literal["auto", "map", "copy"] = _key("auto", identity=False, resumable=True)
    """How the store reads a window of shards: "map" gathers straight from the chunk files
    memory-mapped (no copy; 1.2-1.4x the batches/s on the development machine), "copy" copies them
    into private memory first (compressed caches and shards that are not whole pages always do),
    "auto" maps when it can. The data and its order do not change."""
    heldout_shards: int = _key(1, sweep_shared=True)
    """Last shards of the cache kept for evaluation and threshold calibration, never trained on."""
    normalize: bool = _key(True, sweep_shared=True)
    """Scale activations so that E||x||^2 = d_in (folded into exported weights)."""
    drop_bos: bool = _key(True, sweep_shared=True)
    """Skip rows at context position 0 (the BOS token, whose activations are outliers)."""
    mask_token_ids: str = _key("default", identity="when_set", sweep_shared=True, sequence=True, legacy="none")
    """Token ids whose rows are left out of training and evaluation (train.row_mask), besides
    drop_bos: "default" (the BOS and EOS ids the cache's model record names), "none", or ids
    comma-separated (a TOML list is accepted). Resolved into the ids at run creation."""
    mask_norm_multiple: float | None = _key(None, identity="when_set", sweep_shared=True)
    """Leave out rows whose activation norm (raw units, at the run's site) is above this multiple
    (> 1) of the median row norm of the first 8 training shards; None: off."""
    mask_norm_threshold: float | None = _key(None, identity="when_set", sweep_shared=True)
    """Derived from mask_norm_multiple at run creation: the absolute norm above which rows are left out."""
    # --- the SAE
    arch: str = _key("topk", choices=arch_names)
    """SAE architecture: one of the names registered in train.sae (the choices of `train run --arch`)."""
    d_in: int | None = None
    """Input width; derived from the cache."""
    dict_size: int | None = None
    """Number of latents; default expansion * d_in."""
    expansion: int = 8
    """dict_size = expansion * d_in when dict_size is not set."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka)."""
    k_anneal_tokens: int = _key(0, identity="when_set")
    """k annealing (topk, batchtopk, matryoshka; 0: off): training starts at k_anneal_start and k
    decays linearly to k over this many training tokens (sparsify's k decay)."""
    k_anneal_start: int | None = _key(None, identity="when_set")
    """k at the start of k annealing; default min(dict_size, 10 * d_in), as sparsify."""
    matryoshka_widths: str = _key("1/16,1/4", identity="when_set", sequence=True)
    """matryoshka: the nested prefix widths, comma-separated (a TOML list is accepted), each a
    fraction of dict_size (1/16, 0.25) or a number of latents (288); increasing; the whole
    dictionary is always the last prefix."""
    l1_coeff: float = 5.0
    """L1 coefficient (vanilla), on decoder-norm-weighted activations."""
    l0_coeff: float = 1.0
    """L0 (or tanh) sparsity coefficient (jumprelu)."""
    jumprelu_sparsity: Literal["l0", "tanh"] = "l0"
    """jumprelu sparsity penalty: l0 (step on the pre-activation) or tanh."""
    jumprelu_bandwidth: float = 0.05
    """Rectangle-kernel width of JumpReLU's pseudo-derivatives."""
    threshold_init: float = 0.001
    """Initial JumpReLU threshold (every latent's, unless jumprelu_init_l0 sets them from data)."""
    target_l0: float | None = _key(None, identity="when_set")
    """jumprelu: the L0 to reach, with the quadratic penalty l0_coeff * mean_B (2 / T) (L0_b - T)^2
    (Gemma Scope 2) instead of l0_coeff * L0; also the default of jumprelu_init_l0."""
    jumprelu_init_l0: float | None = _key(None, identity="when_set", legacy=0.0)
    """jumprelu: start at about this many active latents per token: each latent's threshold is set
    from the first training batch so that it fires on init_l0 / dict_size of it. Default (None):
    target_l0 when set, else min(32, dict_size / 16) unless threshold_init is set to another value
    than its default; 0: off, every threshold is threshold_init (what runs made before this key
    computed)."""
    jumprelu_pre_act_coeff: float = _key(0.03, identity="when_set", legacy=0.0)
    """jumprelu: Anthropic's pre-activation loss, coeff * mean_B sum_i relu(theta_i - z_i) ||W_dec,i||
    (pulls below-threshold pre-activations up, so that latents which never fire still learn); 0:
    off, what runs made before it was a default computed with."""
    jumprelu_pre_act_silent_tokens: int = _key(20_000, identity="when_set", count=True, legacy=0)
    """jumprelu: apply the pre-activation loss only to latents that have not fired for at least this
    many training tokens (0: to every latent), so that it revives silent latents without pulling up
    the pre-activations of the ones that fire. With the 0.03 default coefficient, 1M tokens of
    SmolLM2 layer 8 at 4608 latents: 2.9% never fired on held-out rows, against 34.9% without."""
    jumprelu_freq_coeff: float = _key(0.0, identity="when_set")
    """jumprelu: frequency penalty, coeff * sum_i relu(p_i - jumprelu_freq_max), p_i = the batch's
    firing rate of latent i (0: off)."""
    jumprelu_freq_max: float = _key(0.1, identity="when_set")
    """jumprelu: the firing rate above which the frequency penalty applies."""
    jumprelu_threshold_lr_scale: float = _key(10.0, identity="when_set", legacy=1.0)
    """jumprelu: the thresholds' learning rate is lr times this (Adam moves log_threshold by about
    lr per step: at 4e-4 too slowly for the L0 penalty to steer L0 in a short run); runs made
    before this key used 1."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; default d_in // 2."""
    aux_coeff: float = 1 / 32
    """AuxK loss coefficient (topk, batchtopk)."""
    dead_tokens_threshold: int = _key(1_000_000, count=True)
    """A latent is dead after this many tokens without firing."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder bias init from a data sample: geometric_median, mean or zeros (a transcoder's
    input centre and output bias from its input and target sites)."""
    sparsity: str | None = _key(None, identity="when_set", choices=sparsity_names)
    """Sparsity rule of a transcoder or clt, one of the SAE variants whose rule composes with
    another shape (its keys apply: k, l1_coeff, l0_coeff, ...); default topk. SAEs choose theirs
    with arch."""
    # --- optimisation
    lr: float = 4e-4
    """Adam learning rate."""
    beta1: float = 0.9
    """Adam beta1 (decay of the gradient's running mean)."""
    beta2: float = 0.999
    """Adam beta2 (decay of the squared gradient's running mean)."""
    lr_warmup_tokens: int = _key(0, count=True)
    """Linear learning-rate warm-up, in tokens."""
    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Decay after lr_decay_start: none, linear (to 0) or cosine."""
    lr_decay_start: float = 0.8
    """Fraction of training after which the learning rate decays."""
    sparsity_warmup_tokens: int = _key(0, count=True)
    """Linear warm-up of the sparsity coefficient (vanilla L1, jumprelu L0), in tokens."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping by global norm; None disables it."""
    seed: int = _key(0, sweep_shared=True)
    """Seeds the SAE init and the data order."""
    device: str = _key("auto", identity=False, resumable=True)
    """auto (CUDA when present), cpu, cuda, cuda:1 ..."""
    autocast: Literal["none", "tf32", "bf16", "auto"] = _key("none", identity="when_set", aliases=AUTOCAST_ALIASES)
    """Precision of the SAE's matrix products in training (train.precision): none (exact float32),
    tf32 (float32 tensors, matrix products on TF32 tensor cores: CUDA of compute capability >= 8.0
    only, refused elsewhere), bf16 (bfloat16 autocast; weights, Adam state, the loss, the sparse
    gradients and JumpReLU's threshold stay float32) or auto: chosen once when the run is created:
    on CUDA whichever of none, tf32 and bf16 (those the GPU has) a few timed steps of this run's
    model found fastest, tf32 or bf16 only when under 0.95x float32's step; on a CPU none without
    bf16 matrix units (AMX), else the faster of none and bf16 by the same rule. config.json records
    the choice, so a resume computes the same; precision.json the timings. Evaluation computes
    without autocast or TF32 (torch's default precision) whatever the run trained in. Off by
    default: exact float32, and bf16 measured slower on CPUs without bf16 matrix units
    (pipelines/bench_train_step.py --compare-precision)."""
    sparse_kernels: bool = _key(True, identity=False)
    """TopK/BatchTopK: train through the sparse kernels (backward and decode over the B*k active
    latents; 4-6x SAELens' step on CPU). false uses the dense reference path (same function,
    float rounding aside), which may be the faster one on a GPU for small dictionaries: on an H100
    the sparse TopK step at 768 x 6144 measured 20 ms where the dense Vanilla step took 7 ms."""
    sparse_fraction: float = _key(0.05, identity=False, legacy=0.0)
    """vanilla, jumprelu (and transcoders with their rules), with sparse_kernels: a training step
    goes through the sparse kernels when the batch's latents above the rule's floor (ReLU: z > 0;
    JumpReLU: z > threshold - bandwidth, which covers the pseudo-gradient's kernel) number at most
    this fraction of batch x dict_size (mean L0 against the width), else the dense path; the same
    function up to float rounding. 0: always dense (what runs made before this key computed)."""
    deterministic: bool = _key(True, identity=False)
    """On CUDA, torch's deterministic kernels (no atomic adds in the sparse backward) and cuBLAS's
    fixed workspace, so that a run repeats and resumes bit for bit. Process-wide: it stays on in
    the process after the run (torch.use_deterministic_algorithms(True, warn_only=True)). False
    trades that for speed (1.10-1.13x on an H100 at 32x); no effect on CPU, whose kernels are
    deterministic already."""
    memory_limit_gib: float | None = _key(None, identity=False, resumable=True)
    """Memory (GiB) a clt's training may take (parameters, gradients, Adam state, one batch's
    activations; formula in train.sae.clt); default: what the device has available. A clt that
    does not fit is refused before training, with the numbers."""
    compile: bool = _key(False, identity=False)
    """torch.compile the SAE's forward (and so its backward). Off by default: the first steps pay
    the compile time; measure with pipelines/bench_train_step.py --compile before switching it on."""
    # --- thresholds (batchtopk)
    threshold_kind: Literal["global", "per_feature"] = "global"
    """BatchTopK inference threshold: global or per_feature."""
    threshold_batches: int = 20
    """Held-out batches used to calibrate the threshold."""
    # --- evaluation during training
    eval_every: int = _key(0, identity=False, count=True)
    """Tokens between held-out reconstruction evaluations logged as eval/* (0: only at the end)."""
    eval_batches: int = _key(10, identity=False)
    """Held-out batches per evaluation during training."""
    # --- checkpoints and logs
    out: str = _key("runs", identity=False, sweep_shared=True)
    """Folder under which each run gets its own checkpoint folder."""
    checkpoint_every: int = _key(5_000_000, resumable=True, sweep_shared=True, count=True)
    """Tokens between checkpoints (and one at the end)."""
    keep_checkpoints: int = _key(2, resumable=True)
    """How many most recent checkpoints to keep."""
    log_every: int = _key(10, identity=False, resumable=True)
    """Steps between logged metrics."""
    density_every: int = 500
    """Steps between feature-density statistics."""
    wandb_mode: Literal["online", "offline", "disabled"] = _key("offline", identity=False, resumable=True)
    """wandb: online, offline or disabled (online without a key falls back to offline)."""
    wandb_project: str = _key("saeforge", identity=False, resumable=True)
    """wandb project of the run."""
    wandb_group: str | None = _key(None, identity=False, resumable=True)
    """wandb group of the run; a sweep's runs default to the sweep's name."""
    run_name: str | None = _key(None, identity=False)
    """Derived: a readable name from arch, site, width and k or coefficient."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def get_default_cfg() -> TrainConfig:
    return TrainConfig()


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


class KeyFacts(NamedTuple):
    """What is declared about a config key (module docstring): its value type (bool, int, float or
    str; None may be allowed besides), its choices (None: any value of that type), its part in
    run names, resumes and sweeps, and whether it is a token count."""

    type: type
    choices: tuple[str, ...] | None
    identity: bool | str
    resumable: bool
    sweep_shared: bool
    aliases: dict[str, str]
    count: bool


def key_facts(key: str) -> KeyFacts:
    """The facts of config key `key`, read from its declaration."""
    meta, annotation = _FIELDS[key].metadata, _TYPES[key]
    if isinstance(annotation, types.UnionType):  # X | None
        annotation = next(t for t in typing.get_args(annotation) if t is not type(None))
    if typing.get_origin(annotation) is Literal:
        value_type, choices = str, typing.get_args(annotation)
    else:
        value_type, choices = annotation, meta["choices"]() if meta.get("choices") else None
    return KeyFacts(value_type, choices, meta.get("identity", True), meta.get("resumable", False),
                    meta.get("sweep_shared", False), meta.get("aliases", {}), meta.get("count", False))


def resumable_keys() -> set[str]:
    """The keys `train resume` may change: how the run is observed, its budget, where it runs."""
    return {k for k in field_names() if key_facts(k).resumable}


def sweep_shared_keys() -> set[str]:
    """The keys every SAE of a sweep shares (one data stream and schedule): a grid may not vary them."""
    return {k for k in field_names() if key_facts(k).sweep_shared}


def field_help() -> dict[str, str]:
    """Docstring of each field (the string literal after it), used as CLI help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, field_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(field_names())}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert `value` to the field's type; strings (from --set) are parsed. A Literal's
    value must be a str here (validate checks it is one of the choices)."""
    types_ = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    types_ = tuple(str if typing.get_origin(t) is Literal else t for t in types_)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in types_):
        if type(None) in types_:
            return None
        raise ConfigError(f"config key {key!r} cannot be None")
    if _FIELDS[key].metadata.get("count") and not isinstance(value, bool):
        try:
            return parse_count(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} must be a number of tokens ({COUNT_EXAMPLES}, 1e6), "
                              f"got {value!r}") from None
    for t in types_:
        if t is type(None):
            continue
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(float(value)) if float(value).is_integer() else int(value)
                except ValueError:
                    pass
        elif t is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif t is str:
            if isinstance(value, str):
                return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in types_)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


_TYPES = typing.get_type_hints(TrainConfig)
_FIELDS = {f.name: f for f in fields(TrainConfig)}


def update_cfg(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A new config with `changes` applied and validated (unknown keys and bad values are errors)."""
    clean = {}
    for key, value in changes.items():
        if key not in _TYPES:
            raise _unknown_key(key)
        if _FIELDS[key].metadata.get("sequence") and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        value = _coerce(key, value, _TYPES[key])
        clean[key] = key_facts(key).aliases.get(value, value) if isinstance(value, str) else value
    new = dataclasses.replace(cfg, **clean)
    validate(new)
    return new


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}{hint}")


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError for impossible combinations, naming the keys."""
    for key in field_names():
        choices = key_facts(key).choices
        if choices is not None and getattr(cfg, key) is not None:
            _choice(key, getattr(cfg, key), choices)
    try:
        parse_device(cfg.device)
    except DeviceError:
        raise ConfigError(f"device={cfg.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    positive = ["batch_size", "tokens", "window_shards", "store_threads", "expansion", "k", "checkpoint_every", "keep_checkpoints",
                "log_every", "density_every", "threshold_batches", "dead_tokens_threshold"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key in field_names():
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    for key in ["beta1", "beta2"]:
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be in [0, 1) (Adam's decay rate)")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        raise ConfigError(f"max_grad_norm={cfg.max_grad_norm} must be positive (or none to disable clipping)")
    for key in ["lr", "jumprelu_bandwidth", "threshold_init"]:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be positive")
    for key in ["l1_coeff", "l0_coeff", "aux_coeff", "lr_warmup_tokens", "sparsity_warmup_tokens", "heldout_shards",
                "eval_every", "eval_batches"]:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must not be negative")
    if not 0 <= cfg.lr_decay_start <= 1:
        raise ConfigError(f"lr_decay_start={cfg.lr_decay_start} must be a fraction in [0, 1]")
    if not 0 <= cfg.sparse_fraction <= 1:
        raise ConfigError(f"sparse_fraction={cfg.sparse_fraction} must be a fraction in [0, 1] (0: always dense)")
    if cfg.micro_batch_size is not None and (cfg.micro_batch_size <= 0 or cfg.batch_size % cfg.micro_batch_size):
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by micro_batch_size={cfg.micro_batch_size}"
        )
    if cfg.dict_size is not None:
        if cfg.dict_size <= 0:
            raise ConfigError(f"dict_size={cfg.dict_size} must be positive")
    try:
        parse_token_ids(cfg.mask_token_ids)
    except ValueError as e:
        raise ConfigError(f"mask_token_ids={cfg.mask_token_ids!r}: {e}; use default, none or ids like 0,50256") from None
    if cfg.mask_norm_multiple is not None and cfg.mask_norm_multiple <= 1:
        raise ConfigError(f"mask_norm_multiple={cfg.mask_norm_multiple} must be above 1 (a multiple of the median "
                          "row norm), or none to keep every norm")
    if cfg.mask_norm_threshold is not None and cfg.mask_norm_threshold <= 0:
        raise ConfigError(f"mask_norm_threshold={cfg.mask_norm_threshold} must be positive")
    if cfg.memory_limit_gib is not None and cfg.memory_limit_gib <= 0:
        raise ConfigError(f"memory_limit_gib={cfg.memory_limit_gib} must be positive")
    cls = sae_class(cfg.arch)
    if getattr(cls, "site_layout", "single") == "single":
        given = [k for k in ("in_site", "out_site", "sparsity") if getattr(cfg, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for transcoders (arch "
                              f"transcoder, skip_transcoder, clt); the {cfg.arch} SAE reads `site` and its "
                              "sparsity is its arch")
    problem = cls.config_error(cfg)
    if problem:
        raise ConfigError(problem)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a flat dict of keys (a [train] table is also accepted)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: table [{key}] is not a config key; use flat keys")
    return data


def parse_set(items: list[str]) -> dict[str, str]:
    """['lr=1e-3', 'k=64'] -> {'lr': '1e-3', 'k': '64'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def post_init_cfg(cfg: TrainConfig, d_in: int, site: str) -> TrainConfig:
    """Fill derived fields: d_in and site from the store, dict_size from expansion, run name."""
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ConfigError(f"d_in={cfg.d_in} in the config, but site {site!r} of the store has d_model={d_in}")
    dict_size = cfg.dict_size or cfg.expansion * d_in
    cfg = update_cfg(cfg, d_in=d_in, site=site, dict_size=dict_size)
    if cfg.run_name is None:
        cfg = dataclasses.replace(cfg, run_name=default_run_name(cfg))
    return cfg


def sparsity_label(cfg: TrainConfig) -> str:
    """The variant's part of the run name, e.g. k32, l1_5 or l0_1 (its class's run_label)."""
    return sae_class(cfg.arch).run_label(cfg)


def config_hash(cfg: TrainConfig) -> str:
    """Short hash of the keys that define a run (their `identity` fact: names, paths, logging and
    the choice of kernels are excluded; keys added later enter it only when set)."""
    data = {}
    for key in field_names():
        identity, value = key_facts(key).identity, getattr(cfg, key)
        if identity is True or (identity == "when_set" and value != _FIELDS[key].default):
            data[key] = value
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def default_run_name(cfg: TrainConfig) -> str:
    """e.g. topk_blocks.8.hook_resid_pre_4608_k32_3fa9c1d2 (a transcoder names both its sites)."""
    sites = sae_class(cfg.arch).site_label(cfg)
    return f"{cfg.arch}_{sites}_{cfg.dict_size}_{sparsity_label(cfg)}_{config_hash(cfg)}"


def cfg_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validated config from a dict (e.g. a saved config.json)."""
    return update_cfg(get_default_cfg(), **data)


def cfg_from_saved(data: dict[str, Any]) -> TrainConfig:
    """A run's saved config (config.json): keys it lacks that declare a `legacy` value take that
    value (what the run computed when it was made), the others their default."""
    legacy = {f.name: f.metadata["legacy"] for f in fields(TrainConfig) if "legacy" in f.metadata}
    return cfg_from_dict({**{k: v for k, v in legacy.items() if k not in data}, **data})
