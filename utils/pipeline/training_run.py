"""One training run's set-up, shared by pre-training, fine-tuning and the re-ranker trainer.

`TrainingRun.open` resolves the run length (total updates from steps or epochs, warm-up,
validation interval; `optim/schedule.py`), applies the output-directory rules and writes the
resolved config; `TrainingRun.trainer` builds the optimiser (wrapped for Horovod before the
schedule holds it) and the schedule, reseeds the global RNGs per rank (dropout and anything
else random differs per rank from there on) and hands everything to the `Trainer`, which
restores a resumed state. The cadence and best-checkpoint rules are `utils/engine/cadence.py`'s.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import make_checkpoint
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler, resolve_run_length
from utils.config import RunConfig, config_to_dict
from utils.distributed import DistEnv, wrap_optimizer
from utils.engine.run_dir import open_run_dir
from utils.engine.trainer import Stateful, Trainer
from utils.files import atomic_torch_save
from utils.precision import Precision
from utils.rng import derive_seed, seed_everything


def save_model(model: torch.nn.Module, path: Path, cfg: RunConfig, extra: Mapping[str, Any], env: DistEnv) -> None:
    """Our self-describing checkpoint (model config + run config + weights), rank 0 only."""
    if env.is_main:
        atomic_torch_save(make_checkpoint(model, config_to_dict(cfg), extra), path)


@dataclass
class TrainingRun:
    """A run whose length is resolved and whose output directory is ready."""

    cfg: RunConfig
    env: DistEnv
    out: Path
    resume_from: Path | None
    accumulation: int

    @classmethod
    def open(
        cls,
        cfg: RunConfig,
        env: DistEnv,
        *,
        batches_per_epoch: int | None,
        resume: bool,
        overwrite: bool,
        extra_artifacts: Sequence[str] = (),
    ) -> TrainingRun:
        """Resolve `cfg.train`'s run length (in place) and prepare the output directory.

        Args:
            cfg: the loaded run config; its train section is replaced by the resolved one.
            env: the distributed environment (rank 0 writes the config).
            batches_per_epoch: the training loader's micro-batches per epoch on this rank;
                None where a run has no epochs (pre-training mixes streams by ratio).
            resume, overwrite: the command line's output-directory flags.
            extra_artifacts: files besides the engine's that mark a directory as a run.
        """
        accumulation = max(1, cfg.train.gradient_accumulation_steps)
        updates = None if batches_per_epoch is None else math.ceil(batches_per_epoch / accumulation)
        cfg.train = resolve_run_length(cfg.train, updates)
        out, resume_from = open_run_dir(cfg, env, resume=resume, overwrite=overwrite,
                                        extra_artifacts=extra_artifacts)
        return cls(cfg, env, out, resume_from, accumulation)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.num_train_steps

    def trainer(
        self,
        model: torch.nn.Module,
        precision: Precision,
        stateful: Mapping[str, Stateful],
        on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    ) -> Trainer:
        """Optimiser, schedule, per-rank reseed and the `Trainer` (which restores a resumed state).

        Args:
            model: the initial model, on its device (identical on every rank).
            precision: the run's precision.
            stateful: objects whose state rides in the training state (loader positions, ...).
            on_step: called after every optimizer update with (step, metrics).
        """
        train = self.cfg.train
        # Horovod swaps in its own optimizer object: wrap before the scheduler holds it.
        optimizer = wrap_optimizer(build_optimizer(model, train), model, self.env, self.accumulation)
        scheduler = build_scheduler(optimizer, train, self.total_steps)
        # Dropout and anything else random differs per rank from here on.
        seed_everything(derive_seed(train.seed, self.env.rank))
        return Trainer(
            model, optimizer, scheduler, precision, self.env, train,
            total_steps=self.total_steps, output_dir=self.out, run_config=config_to_dict(self.cfg),
            stateful=dict(stateful), resume_from=self.resume_from, on_step=on_step,
        )
