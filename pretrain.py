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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.txt_db import TxtDb
from model.checkpoint import make_checkpoint
from model.pretrain_heads import PretrainModel
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler, resolve_run_length
from utils.config import (
    ConfigError,
    DatasetSpec,
    RunConfig,
    add_config_args,
    config_from_args,
    config_to_dict,
    require_path,
    save_config,
)
from utils.distributed import (
    DistEnv,
    all_reduce,
    init_distributed,
    shutdown,
    wrap_optimizer,
)
from utils.engine.training import (
    MicroBatch,
    ResumableLoader,
    Trainer,
    add_run_args,
    eval_loader,
    prepare_output_dir,
    to_device,
)
from utils.errors import run_cli
from utils.files import atomic_torch_save
from utils.original_programs import LIGHTNINGDOT_PRETRAIN
from utils.pipeline.evaluation import (
    EvalSplit,
    evaluate_recall,
    open_img_db,
    open_txt_db,
)
from utils.pipeline.model_setup import build_pretrain_model_for_run, check_model_paths
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS
from utils.pipeline.samplers import make_batch_sampler
from utils.precision import Precision, resolve_precision
from utils.rng import derive_seed, seed_everything
from utils.run_files import CKPT_DIR, CONFIG_FILE, PRETRAIN_FINAL

logger = logging.getLogger("pretrain")



@dataclass
class Stream:
    """One (dataset, task) source of batches."""

    dataset: str
    task: str
    ratio: float
    loader: ResumableLoader


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


def dataset_tasks(spec: DatasetSpec, keep: Sequence[str], key: str) -> list[tuple[str, float]]:
    """(task, mix ratio) pairs of a dataset, restricted to `keep` when it is not empty."""
    ratios = list(spec.mix_ratio) or [1.0] * len(spec.tasks)
    if len(ratios) != len(spec.tasks):
        raise ConfigError(
            f"{key} ({spec.name!r}): {len(spec.tasks)} tasks but {len(ratios)} mix_ratio entries"
        )
    for task in list(spec.tasks) + list(keep):
        if task not in PRETRAIN_TASKS:
            raise ConfigError(
                f"{key} ({spec.name!r}): unknown task {task!r}; expected one of {tuple(PRETRAIN_TASKS)}"
            )
    return [(t, float(r)) for t, r in zip(spec.tasks, ratios) if not keep or t in keep]


def _task_data(task: str, txt_dbs: list[TxtDb], img_dbs: list, cfg: RunConfig, seed: int) -> tuple[Any, Any]:
    spec = PRETRAIN_TASKS[task]
    return spec.make_dataset(txt_dbs, img_dbs, cfg.data, seed), spec.collate


def _sampler(task: str, dataset: Any, batch_size: int, cfg: RunConfig, env: DistEnv, seed: int, shuffle: bool) -> Any:
    distinct = PRETRAIN_TASKS[task].distinct_images
    return make_batch_sampler(
        dataset.lens, batch_size, cfg.train.batch_size_unit, env, seed=seed, shuffle=shuffle,
        img_names=dataset.img_names if distinct else None,
        allow_duplicate_images=cfg.data.duplicate_images == "mask",
    )


def _open_dbs(spec: DatasetSpec, cfg: RunConfig) -> tuple[list[TxtDb], list]:
    return ([open_txt_db(p, cfg.data) for p in spec.db],
            [open_img_db(p, cfg.data) for p in spec.img])


def build_streams(cfg: RunConfig, env: DistEnv, pin_memory: bool) -> list[Stream]:
    """One resumable loader per (train dataset, kept task)."""
    streams = []
    for i, spec in enumerate(cfg.data.train_datasets):
        tasks = dataset_tasks(spec, cfg.data.pretrain_tasks, f"train_datasets[{i}]")
        if not tasks:
            continue
        txt_dbs, img_dbs = _open_dbs(spec, cfg)
        for task, ratio in tasks:
            seed = derive_seed(cfg.train.seed, len(streams))
            dataset, collate = _task_data(task, txt_dbs, img_dbs, cfg, seed)
            sampler = _sampler(task, dataset, cfg.train.train_batch_size, cfg, env, seed, shuffle=True)
            loader = ResumableLoader(dataset, sampler, collate, seed=seed, num_workers=cfg.data.n_workers,
                                     pin_memory=pin_memory, name=f"{spec.name}/{task}")
            streams.append(Stream(spec.name, task, ratio, loader))
    if not streams:
        raise ConfigError(
            f"no pre-training task left: data.pretrain_tasks={cfg.data.pretrain_tasks} keeps none of "
            f"the tasks of train_datasets"
        )
    return streams


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


@dataclass
class ValData:
    """Validation batches per (dataset, task) and the retrieval splits of the `itm` datasets."""

    loaders: list[tuple[str, Any]]
    splits: list[EvalSplit]


def build_val_data(cfg: RunConfig, env: DistEnv, pin_memory: bool) -> ValData:
    """Deterministic validation loaders (masks drawn from a fixed seed) and recall splits."""
    loaders, splits = [], []
    for i, spec in enumerate(cfg.data.val_datasets):
        tasks = [t for t, _ in dataset_tasks(spec, cfg.data.pretrain_tasks, f"val_datasets[{i}]")]
        if not tasks:
            continue
        txt_dbs, img_dbs = _open_dbs(spec, cfg)
        for task in tasks:
            dataset, collate = _task_data(task, txt_dbs, img_dbs, cfg, seed=cfg.train.seed)
            sampler = _sampler(task, dataset, cfg.train.val_batch_size, cfg, env, cfg.train.seed, shuffle=False)
            loaders.append((task, eval_loader(dataset, collate, sampler, cfg.data.n_workers, pin_memory)))
        if any(PRETRAIN_TASKS[t].measures_recall for t in tasks):
            for k, (tdb, idb) in enumerate(zip(txt_dbs, img_dbs)):
                name = spec.name if len(txt_dbs) == 1 else f"{spec.name}.{k}"
                splits.append(EvalSplit.from_dbs(name, tdb, idb))
    return ValData(loaders, splits)


@torch.no_grad()
def validate(
    model: PretrainModel, val: ValData, env: DistEnv, precision: Precision, cfg: RunConfig
) -> dict[str, Any]:
    """Per-task losses (example-weighted), VMLM accuracy and recall (every rank calls)."""
    model.eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for task, loader in val.loaders:
        for batch in loader:
            batch = to_device(batch, env.device)
            with precision.autocast():
                out = model(batch, task)
            spec = PRETRAIN_TASKS[task]
            weight = out[spec.weight_key].float()
            acc = sums.setdefault(task, {})
            for key, value in (("loss", out["loss"].float() * weight), ("n", weight)):
                acc[key] = acc.get(key, 0.0) + value
            if spec.correct_key is not None:
                acc["n_correct"] = acc.get("n_correct", 0.0) + out[spec.correct_key].float()
    metrics: dict[str, Any] = {}
    for task in sorted(sums):
        keys = sorted(sums[task])
        reduced = dict(zip(keys, all_reduce(torch.stack([torch.as_tensor(sums[task][k]) for k in keys])).tolist()))
        metrics[f"{task}/loss"] = reduced["loss"] / max(reduced["n"], 1.0)
        if "n_correct" in reduced:
            metrics[f"{task}/acc"] = reduced["n_correct"] / max(reduced["n"], 1.0)
    for split in val.splits:
        metrics[f"recall/{split.name}"] = evaluate_recall(model.bert, split, env, precision, cfg.train, cfg.data)
    model.train()
    return metrics


def save_model(model: PretrainModel, path: Path, cfg: RunConfig, step: int, env: DistEnv) -> None:
    """Our self-describing checkpoint (model config + run config + weights), rank 0 only."""
    if env.is_main:
        atomic_torch_save(make_checkpoint(model, config_to_dict(cfg), {"step": step}), path)


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
    # Pre-training mixes streams by ratio: it has steps, no epochs.
    cfg.train = resolve_run_length(cfg.train, None)

    # ---- device, precision and distribution: every such decision is made here, once ----
    env = init_distributed(cfg.train.distributed, cfg.train.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s")
    precision = resolve_precision(cfg.train.precision, env.device)
    pin_memory = cfg.data.pin_mem and env.device.type == "cuda"
    logger.info("device %s, %s, %d rank(s), precision %s", env.device, env.backend, env.world_size, precision.name)

    try:
        out = Path(cfg.output_dir)
        resume_from = prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, env=env)
        if env.is_main:
            save_config(cfg, out / CONFIG_FILE)

        streams = build_streams(cfg, env, pin_memory)
        ratios = np.array([s.ratio for s in streams], dtype=np.float64)
        val = build_val_data(cfg, env, pin_memory)
        logger.info("streams: %s", ", ".join(f"{s.loader.name} x{s.ratio:g}" for s in streams))

        model = build_model(cfg).to(env.device)
        accumulation = max(1, cfg.train.gradient_accumulation_steps)
        # Horovod swaps in its own optimizer object: wrap before the scheduler holds it.
        optimizer = wrap_optimizer(build_optimizer(model, cfg.train), model, env, accumulation)
        total_steps = cfg.train.num_train_steps
        scheduler = build_scheduler(optimizer, cfg.train, total_steps)
        # Dropout and anything else random differs per rank from here on.
        seed_everything(derive_seed(cfg.train.seed, env.rank))

        trainer = Trainer(
            model, optimizer, scheduler, precision, env, cfg.train,
            total_steps=total_steps, output_dir=out, run_config=config_to_dict(cfg),
            stateful={f"stream{i}:{s.loader.name}": s.loader for i, s in enumerate(streams)},
            resume_from=resume_from, on_step=on_step,
        )
        val_metrics: dict[str, Any] = {}
        try:
            while not trainer.done:
                micro_batches = []
                for micro in range(accumulation):
                    stream = streams[draw_stream(cfg.train.seed, trainer.step, micro, ratios)]
                    batch = stream.loader.next_batch()
                    micro_batches.append(MicroBatch(stream.task, batch, stream.loader.describe_last()))
                trainer.train_step(micro_batches, pretrain_loss)

                if trainer.every(cfg.train.valid_steps) or trainer.done:
                    if val.loaders:
                        val_metrics = validate(model, val, env, precision, cfg)
                        trainer.log(val_metrics, "val")
                        logger.info("step %d: validation %s", trainer.step, _summary(val_metrics))
                    if cfg.train.save_steps == 0:
                        save_model(model, out / CKPT_DIR / f"model_step_{trainer.step}.pt", cfg, trainer.step, env)
                        trainer.save_state()
                if cfg.train.save_steps > 0 and (trainer.every(cfg.train.save_steps) or trainer.done):
                    save_model(model, out / CKPT_DIR / f"model_step_{trainer.step}.pt", cfg, trainer.step, env)
                    trainer.save_state()
            save_model(model, out / CKPT_DIR / PRETRAIN_FINAL, cfg, trainer.step, env)
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
