"""Learning-rate schedules: linear warm-up, then linear, constant or cosine decay.

Step convention (UNITER's): the n-th optimizer update, counting from 1, uses
`learning_rate * lr_multiplier(n, ...)`. So warm-up reaches the full rate at update
`warmup_steps` and linear decay reaches zero at update `total_steps`. With
`train.warmup_from_zero` (the original LightningDOT `train_itm.py`) update n uses
`lr_multiplier(n - 1, ...)`: the first update runs at learning rate 0.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from utils.config import TrainConfig
from utils.errors import ConfigError

DECAYS = ("linear", "constant", "cosine")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, decay: str = "linear") -> float:
    """Multiplier of the base learning rate at optimizer update `step` (1-based).

    Args:
        step: the update about to be applied, counting from 1.
        warmup_steps: updates over which the rate rises linearly from 1/warmup to 1.
        total_steps: the run's total number of updates (end of the decay).
        decay: `linear` to 0 at `total_steps`, `constant`, or `cosine` to 0 at `total_steps`.

    Returns:
        A value in [0, 1].
    """
    if decay not in DECAYS:
        raise ValueError(f"train.decay must be one of {DECAYS}, got {decay!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if decay == "constant":
        return 1.0
    remaining = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / remaining, 0.0), 1.0)
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier`; call `.step()` once after every optimizer update.

    Args:
        optimizer: the optimizer whose groups' `lr` is scheduled.
        cfg: the train section (`warmup_steps`, `decay`).
        total_steps: total optimizer updates of the run.
    """
    if total_steps <= 0:
        raise ValueError(f"the schedule needs a positive number of steps, got {total_steps}")
    warmup, decay = cfg.warmup_steps, cfg.decay
    # LambdaLR evaluates its lambda at the number of updates already done; the next update
    # is that plus one (or that itself, under the original train_itm.py's convention).
    shift = 0 if cfg.warmup_from_zero else 1
    return LambdaLR(optimizer, lambda done: lr_multiplier(done + shift, warmup, total_steps, decay))


def resolve_run_length(cfg: TrainConfig, updates_per_epoch: int | None) -> TrainConfig:
    """The train section with the run's step counts made explicit.

    Resolves the total number of updates (from `num_train_epochs` when `num_train_steps` is
    0), the warm-up (`warmup_ratio` of the total when set) and the validation interval (one
    epoch when `valid_steps` is 0), so the saved config shows the values the run uses.

    Args:
        cfg: the train section as loaded.
        updates_per_epoch: optimizer updates in one pass over the training data; None where
            a run has no epochs (pre-training mixes streams by ratio).

    Raises:
        ConfigError: no positive length, or an epoch-based setting without epochs.
    """
    total = cfg.num_train_steps
    if total <= 0:
        if cfg.num_train_epochs <= 0 or updates_per_epoch is None:
            what = "num_train_steps or num_train_epochs" if updates_per_epoch is not None else "num_train_steps"
            raise ConfigError(f"set train.{what} to a positive number")
        total = cfg.num_train_epochs * updates_per_epoch
    if total <= 0:
        raise ConfigError(f"the run has no optimizer updates: {updates_per_epoch} per epoch")
    valid_steps = cfg.valid_steps
    if valid_steps <= 0:
        if updates_per_epoch is None:
            raise ConfigError("train.valid_steps must be positive here: this run has no epochs")
        valid_steps = updates_per_epoch
    warmup = int(cfg.warmup_ratio * total) if cfg.warmup_ratio > 0 else cfg.warmup_steps
    return dataclasses.replace(cfg, num_train_steps=total, warmup_steps=warmup, valid_steps=valid_steps)
