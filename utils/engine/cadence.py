"""When a trainer validates and saves, and which checkpoint is the best: one rule for all three.

Model-free like the rest of the engine. `utils/pipeline/training_run.py` adds what needs the
optimiser floor (run length, optimiser, schedule) and builds the `Trainer`.

Cadence (one rule for pre-training, fine-tuning and the re-ranker): validate every
`train.valid_steps` updates and after the last one; save the resume state at every validation
when `train.save_steps` is 0, else every `save_steps` updates and after the last one.
`BestCheckpoint` keeps the best validation value of one metric and saves its checkpoint.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from utils.config import TrainConfig
from utils.engine.trainer import Trainer


def validation_due(trainer: Trainer, cfg: TrainConfig) -> bool:
    """Validate after this update: every `valid_steps` and after the last one."""
    return trainer.every(cfg.valid_steps) or trainer.done


def save_due(trainer: Trainer, cfg: TrainConfig) -> bool:
    """Save the resume state after this update: at every validation when `save_steps` is 0,
    else every `save_steps` and after the last one."""
    if cfg.save_steps <= 0:
        return validation_due(trainer, cfg)
    return trainer.every(cfg.save_steps) or trainer.done


def after_update(
    trainer: Trainer,
    cfg: TrainConfig,
    validate: Callable[[], Any],
    save: Callable[[], Any] | None = None,
) -> None:
    """The cadence after one optimizer update: `validate()` when due, then `save()` when due.

    Args:
        trainer: the run's trainer (its step and `done`).
        cfg: the train section (`valid_steps`, `save_steps`).
        validate: evaluates, logs and keeps the best checkpoint (every rank calls it).
        save: writes what a save point writes; default `trainer.save_state`.
    """
    if validation_due(trainer, cfg):
        validate()
    if save_due(trainer, cfg):
        (save or trainer.save_state)()


class BestCheckpoint:
    """The best validation value of one metric so far, its step and metrics (a `Stateful`).

    `update` calls `save(metrics, step)` whenever the value improves (every rank calls
    `update`; `save` decides who writes). Its state rides in the training state, so a
    resumed run keeps the best of the whole run.
    """

    def __init__(
        self,
        metric: str,
        save: Callable[[Mapping[str, Any], int], None],
        *,
        higher_is_better: bool = True,
    ) -> None:
        self.metric = metric
        self.save = save
        self.higher_is_better = higher_is_better
        self.value = -math.inf if higher_is_better else math.inf
        self.step = -1
        self.metrics: dict[str, Any] = {}

    def improves(self, value: float) -> bool:
        return value > self.value if self.higher_is_better else value < self.value

    def update(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Record `metrics` and save the checkpoint if their metric beats the best; True when it does."""
        value = float(metrics[self.metric])
        if not self.improves(value):
            return False
        self.value, self.step, self.metrics = value, step, dict(metrics)
        self.save(metrics, step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step, "metrics": json.dumps(self.metrics)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # States written before this class keyed the value by the metric's name.
        self.value = float(state["value"] if "value" in state else state[self.metric])
        self.step = int(state["step"])
        self.metrics = json.loads(state.get("metrics", "{}"))

