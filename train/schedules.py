"""The training schedules: pure functions of the training tokens seen (so that a resumed run
repeats them exactly). cfg: the run's TrainConfig; tokens: training tokens before the step."""

from __future__ import annotations

import math

from train.config import TrainConfig


def lr_multiplier(cfg: TrainConfig, tokens: int) -> float:
    """Learning-rate factor after `tokens` training tokens: linear warm-up, then decay."""
    if cfg.lr_warmup_tokens and tokens < cfg.lr_warmup_tokens:
        return (tokens + cfg.batch_size) / (cfg.lr_warmup_tokens + cfg.batch_size)
    start = cfg.lr_decay_start * cfg.tokens
    if cfg.lr_decay == "none" or tokens < start or cfg.tokens <= start:
        return 1.0
    frac = min((tokens - start) / (cfg.tokens - start), 1.0)
    if cfg.lr_decay == "linear":
        return 1.0 - frac
    return 0.5 * (1 + math.cos(math.pi * frac))


def sparsity_multiplier(cfg: TrainConfig, tokens: int) -> float:
    """Sparsity-coefficient warm-up factor (vanilla L1, jumprelu L0)."""
    if not cfg.sparsity_warmup_tokens:
        return 1.0
    return min(1.0, (tokens + cfg.batch_size) / cfg.sparsity_warmup_tokens)
