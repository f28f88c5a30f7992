"""LightningDOT pre-training: CMR, VMLM and SMRM over several datasets (SPEC 5).

    python pretrain.py --config configs/pretrain/paper.yaml [--output_dir DIR]
                       [--resume | --overwrite] [key=value ...]
    torchrun --nproc_per_node N pretrain.py ...        horovodrun -np N python pretrain.py ...

Every (dataset, task) pair of `train_datasets` is a stream of batches with a mix ratio. Each
micro-batch draws its stream by ratio from a generator seeded by (seed, step, micro-batch),
so every rank draws the same task and a resumed run draws what the uninterrupted one would
(`utils.pipeline.pretrain_data.StreamMix`).
Tasks: `itm` (CMR, contrastive), `mlm` (VMLM), `mrfr` and `mrckl` (SMRM). Validation reports
per-task losses, VMLM accuracy and retrieval recall of the validation datasets that list
`itm`. Original UNITER / LightningDOT JSON configs load unchanged (batches then count tokens).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from utils.config import RunConfig, add_config_args
from utils.distributed import init_distributed, shutdown
from utils.engine.cadence import after_update
from utils.engine.run_dir import add_run_args
from utils.errors import run_cli
from utils.original_programs import LIGHTNINGDOT_PRETRAIN
from utils.pipeline.model_setup import build_pretrain_model_for_run, check_model_paths
from utils.pipeline.pretrain_data import (
    StreamMix,
    build_streams,
    build_val_data,
    check_dataset_paths,
    summary,
    task_loss,
    validate,
)
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS
from utils.pipeline.run_config import PRETRAIN, run_config_from_args
from utils.pipeline.training_run import TrainingRun, save_model
from utils.precision import resolve_precision
from utils.rng import seed_everything
from utils.run_files import CKPT_DIR, PRETRAIN_FINAL

logger = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: config, output dir, resume/overwrite, key=value overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_run_args(parser)
    return parser.parse_args(argv)


def check_paths(cfg: RunConfig) -> None:
    """Fail before any heavy work, naming the config key whose path is missing."""
    check_dataset_paths(cfg)
    check_model_paths(cfg.model, pretrain=True)


def build_model(cfg: RunConfig, tasks: Sequence[str] = ()) -> torch.nn.Module:
    """The initial model (the bi-encoder with the heads of every task its family can run;
    `tasks`, those the run trains, must be among them): identical on every rank, a function
    of `train.seed` alone."""
    seed_everything(cfg.train.seed)
    return build_pretrain_model_for_run(cfg.model, tasks)


def main(
    argv: list[str] | None = None,
    *,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run pre-training; returns the step reached and the last validation metrics.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).
        on_step: called after every optimizer step with (step, metrics); tests use it.
    """
    args = parse_args(argv)
    cfg = run_config_from_args(args, LIGHTNINGDOT_PRETRAIN, PRETRAIN)
    check_paths(cfg)

    # ---- device, precision and distribution: every such decision is made here, once ----
    env = init_distributed(cfg.train.distributed, cfg.train.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s")
    precision = resolve_precision(cfg.train.precision, env.device)
    pin_memory = cfg.data.pin_mem and env.device.type == "cuda"
    logger.info("device %s, %s, %d rank(s), precision %s", env.device, env.backend, env.world_size, precision.name)

    try:
        # Pre-training mixes streams by ratio: it has steps, no epochs.
        run = TrainingRun.open(cfg, env, batches_per_epoch=None, resume=args.resume, overwrite=args.overwrite)
        out = run.out
        mix = StreamMix(build_streams(cfg, env, pin_memory), cfg.train.seed)
        val = build_val_data(cfg, env, pin_memory)
        logger.info("streams: %s", mix.describe())

        model = build_model(cfg, sorted({s.task for s in mix.streams})).to(env.device)
        trainer = run.trainer(model, precision, mix.stateful(), on_step=on_step)
        val_metrics: dict[str, Any] = {}

        def validate_now() -> None:
            nonlocal val_metrics
            if val.loaders:
                val_metrics = validate(model, val, env, precision, cfg)
                trainer.log(val_metrics, "val")
                logger.info("step %d: validation %s", trainer.step, summary(val_metrics))

        def save() -> None:
            save_model(model, out / CKPT_DIR / f"model_step_{trainer.step}.pt", cfg, {"step": trainer.step}, env)
            trainer.save_state()

        try:
            while not trainer.done:
                trainer.train_step(mix.micro_batches(trainer.step, run.accumulation), task_loss(PRETRAIN_TASKS))
                after_update(trainer, cfg.train, validate_now, save)
            save_model(model, out / CKPT_DIR / PRETRAIN_FINAL, cfg, {"step": trainer.step}, env)
        finally:
            trainer.close()
        return {"step": trainer.step, "val": val_metrics}
    finally:
        shutdown(env)


if __name__ == "__main__":
    sys.exit(run_cli(main))
