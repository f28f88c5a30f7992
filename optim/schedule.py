"""Learning-rate schedules: linear warm-up, then linear, constant or cosine decay.

Step convention (UNITER's): the n-th optimizer update, counting from 1, uses
`learning_rate * lr_multiplier(n, ...)`. So warm-up reaches the full rate at update
`warmup_steps` and linear decay reaches zero at update `total_steps`.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from utils.config import TrainConfig

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
    # is that plus one.
    return LambdaLR(optimizer, lambda done: lr_multiplier(done + 1, warmup, total_steps, decay))
