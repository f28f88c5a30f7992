"""LightningDOT pre-training: CMR, VMLM and SMRM over several datasets (SPEC 5).

    python pretrain.py --config configs/pretrain/paper.yaml [--output_dir DIR]
                       [--resume | --overwrite] [key=value ...]
    torchrun --nproc_per_node N pretrain.py ...        horovodrun -np N python pretrain.py ...

Every (dataset, task) pair of `train_datasets` is a stream of batches with a mix ratio. Each
micro-batch draws its stream by ratio from a generator seeded by (seed, step, micro-batch),
so every rank draws the same task and a resumed run draws what the uninterrupted one would.
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

import numpy as np
import torch

from model.pretrain_heads import PretrainModel
from utils.config import (
    ConfigError,
    DatasetSpec,
    RunConfig,
    add_config_args,
    config_from_args,
    require_path,
)
from utils.distributed import init_distributed, shutdown
from utils.engine.cadence import after_update
from utils.engine.run_dir import add_run_args
from utils.engine.trainer import MicroBatch
from utils.errors import run_cli
from utils.original_programs import LIGHTNINGDOT_PRETRAIN
from utils.pipeline.model_setup import build_pretrain_model_for_run, check_model_paths
from utils.pipeline.pretrain_data import build_streams, build_val_data, validate
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS
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


def _check_dataset_paths(specs: Sequence[DatasetSpec], key: str) -> None:
    for i, spec in enumerate(specs):
        if len(spec.db) != len(spec.img) or not spec.db:
            raise ConfigError(
                f"{key}[{i}] ({spec.name!r}): 'db' has {len(spec.db)} entries and 'img' "
                f"{len(spec.img)}; give one img_db per txt_db (at least one)"
            )
        for j, path in enumerate(spec.db):
            require_path(path, f"{key}[{i}].db[{j}]", "dir")
        for j, path in enumerate(spec.img):
            require_path(path, f"{key}[{i}].img[{j}]", "dir")


def check_paths(cfg: RunConfig) -> None:
    """Fail before any heavy work, naming the config key whose path is missing."""
    if not cfg.data.train_datasets:
        require_path(None, "train_datasets")
    _check_dataset_paths(cfg.data.train_datasets, "train_datasets")
    _check_dataset_paths(cfg.data.val_datasets, "val_datasets")
    check_model_paths(cfg.model, pretrain=True)
    if cfg.cross_encoder.checkpoint:
        # Our earlier configs spelled the pre-training start `model.checkpoint`, which is now
        # the cross-encoder's (and the original pretrain.py never read `checkpoint`).
        logger.warning(
            "cross_encoder.checkpoint (model.checkpoint / checkpoint in older configs) = %s has no "
            "effect in pre-training; set model.pretrain_checkpoint to start from a pre-training "
            "checkpoint", cfg.cross_encoder.checkpoint,
        )


def build_model(cfg: RunConfig) -> PretrainModel:
    """The initial model: identical on every rank, a function of `train.seed` alone."""
    seed_everything(cfg.train.seed)
    return build_pretrain_model_for_run(cfg.model)


def draw_stream(seed: int, step: int, micro: int, ratios: np.ndarray) -> int:
    """Index of the stream of micro-batch `micro` of update `step`; the same on every rank."""
    rng = np.random.default_rng([seed, step, micro])
    return int(rng.choice(len(ratios), p=ratios / ratios.sum()))


def pretrain_loss(model: torch.nn.Module, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
    """The task's loss plus its accuracy where it has one."""
    out = model(batch, task)
    return {"loss": out["loss"], **PRETRAIN_TASKS[task].train_metrics(out)}


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
    cfg = config_from_args(args, LIGHTNINGDOT_PRETRAIN)
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
        streams = build_streams(cfg, env, pin_memory)
        ratios = np.array([s.ratio for s in streams], dtype=np.float64)
        val = build_val_data(cfg, env, pin_memory)
        logger.info("streams: %s", ", ".join(f"{s.loader.name} x{s.ratio:g}" for s in streams))

        model = build_model(cfg).to(env.device)
        trainer = run.trainer(model, precision, {f"stream{i}:{s.loader.name}": s.loader for i, s in enumerate(streams)},
                              on_step=on_step)
        val_metrics: dict[str, Any] = {}

        def validate_now() -> None:
            nonlocal val_metrics
            if val.loaders:
                val_metrics = validate(model, val, env, precision, cfg)
                trainer.log(val_metrics, "val")
                logger.info("step %d: validation %s", trainer.step, _summary(val_metrics))

        def save() -> None:
            save_model(model, out / CKPT_DIR / f"model_step_{trainer.step}.pt", cfg, {"step": trainer.step}, env)
            trainer.save_state()

        try:
            while not trainer.done:
                micro_batches = []
                for micro in range(run.accumulation):
                    stream = streams[draw_stream(cfg.train.seed, trainer.step, micro, ratios)]
                    batch = stream.loader.next_batch()
                    micro_batches.append(MicroBatch(stream.task, batch, stream.loader.describe_last()))
                trainer.train_step(micro_batches, pretrain_loss)
                after_update(trainer, cfg.train, validate_now, save)
            save_model(model, out / CKPT_DIR / PRETRAIN_FINAL, cfg, {"step": trainer.step}, env)
        finally:
            trainer.close()
        return {"step": trainer.step, "val": val_metrics}
    finally:
        shutdown(env)


def _summary(metrics: Mapping[str, Any]) -> str:
    parts = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    parts += [f"{k} RSUM {v['rsum']:.1f}" for k, v in metrics.items() if isinstance(v, Mapping)]
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(run_cli(main))
