"""Pre-training data and validation: one batch stream per (dataset, task), validation loaders.

`pretrain.py` mixes the streams by ratio (`draw_stream` there); validation reports per-task
losses (example-weighted), VMLM accuracy and retrieval recall of the validation datasets that
list `itm`. The tasks themselves are `utils/pipeline/pretrain_tasks.py`'s registry.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.txt_db import TxtDb
from model.pretrain_heads import PretrainModel
from utils.config import ConfigError, DatasetSpec, RunConfig
from utils.distributed import DistEnv, all_reduce
from utils.engine.loader import ResumableLoader, eval_loader, to_device
from utils.pipeline.evaluation import (
    EvalSplit,
    evaluate_recall,
    open_img_db,
    open_txt_db,
)
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS
from utils.pipeline.samplers import make_batch_sampler
from utils.precision import Precision
from utils.rng import derive_seed


@dataclass
class Stream:
    """One (dataset, task) source of batches."""

    dataset: str
    task: str
    ratio: float
    loader: ResumableLoader


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
