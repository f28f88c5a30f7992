"""Pre-training data and validation: one batch stream per (dataset, task), validation loaders.

`StreamMix` draws each micro-batch's stream by ratio (`pretrain.py`, and `rerank.py train` for the
cross-encoder's pre-training); validation reports per-task
losses (example-weighted), VMLM accuracy and retrieval recall of the validation datasets that
list `itm`. The tasks themselves are `utils/pipeline/pretrain_tasks/`'s registry (their names were
checked when the config loaded).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.txt_db import TxtDb
from utils.config import DatasetSpec, RunConfig, require_path
from utils.distributed import DistEnv, all_reduce
from utils.engine.loader import ResumableLoader, eval_loader, to_device
from utils.engine.trainer import MicroBatch
from utils.errors import ConfigError
from utils.pipeline.evaluation import (
    EvalSplit,
    evaluate_recall,
    open_img_db,
    open_txt_db,
)
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS, PretrainTask
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


def draw_stream(seed: int, step: int, micro: int, ratios: np.ndarray) -> int:
    """Index of the stream of micro-batch `micro` of update `step`; the same on every rank."""
    rng = np.random.default_rng([seed, step, micro])
    return int(rng.choice(len(ratios), p=ratios / ratios.sum()))


class StreamMix:
    """Streams mixed by ratio: each micro-batch draws its stream from a generator seeded by
    (seed, step, micro-batch), so every rank draws the same task and a resumed run draws what
    the uninterrupted one would."""

    def __init__(self, streams: Sequence[Stream], seed: int) -> None:
        self.streams = list(streams)
        self.seed = seed
        self.ratios = np.array([s.ratio for s in self.streams], dtype=np.float64)

    def micro_batches(self, step: int, accumulation: int) -> list[MicroBatch]:
        """The micro-batches of update `step`."""
        out = []
        for micro in range(accumulation):
            stream = self.streams[draw_stream(self.seed, step, micro, self.ratios)]
            batch = stream.loader.next_batch()
            out.append(MicroBatch(stream.task, batch, stream.loader.describe_last()))
        return out

    def stateful(self) -> dict[str, ResumableLoader]:
        """The loaders, by a name unique per stream, for the trainer's resume state."""
        return {f"stream{i}:{s.loader.name}": s.loader for i, s in enumerate(self.streams)}

    def describe(self) -> str:
        """`name xRATIO, ...` for the log."""
        return ", ".join(f"{s.loader.name} x{s.ratio:g}" for s in self.streams)


def task_loss(tasks: Mapping[str, PretrainTask]) -> Callable[[torch.nn.Module, Mapping[str, Any], str], dict]:
    """The trainer's loss function for a pre-training model: the task's loss plus its metrics."""
    def compute(model: torch.nn.Module, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        out = model(batch, task)
        return {"loss": out["loss"], **tasks[task].train_metrics(out)}
    return compute


def check_dataset_paths(cfg: RunConfig) -> None:
    """Fail before any heavy work when `train_datasets` is empty or names a missing database."""
    if not cfg.data.train_datasets:
        require_path(None, "train_datasets")
    for key in ("train_datasets", "val_datasets"):
        for i, spec in enumerate(getattr(cfg.data, key)):
            if len(spec.db) != len(spec.img) or not spec.db:
                raise ConfigError(
                    f"{key}[{i}] ({spec.name!r}): 'db' has {len(spec.db)} entries and 'img' "
                    f"{len(spec.img)}; give one img_db per txt_db (at least one)"
                )
            for j, path in enumerate(spec.db):
                require_path(path, f"{key}[{i}].db[{j}]", "dir")
            for j, path in enumerate(spec.img):
                require_path(path, f"{key}[{i}].img[{j}]", "dir")


def summary(metrics: Mapping[str, Any]) -> str:
    """One log line of validation metrics (losses, accuracies, RSUM of recall splits)."""
    parts = [f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    parts += [f"{k} RSUM {v['rsum']:.1f}" for k, v in metrics.items() if isinstance(v, Mapping)]
    return ", ".join(parts)


def dataset_tasks(spec: DatasetSpec, keep: Sequence[str], key: str) -> list[tuple[str, float]]:
    """(task, mix ratio) pairs of a dataset, restricted to `keep` when it is not empty."""
    ratios = list(spec.mix_ratio) or [1.0] * len(spec.tasks)
    if len(ratios) != len(spec.tasks):
        raise ConfigError(
            f"{key} ({spec.name!r}): {len(spec.tasks)} tasks but {len(ratios)} mix_ratio entries"
        )
    return [(t, float(r)) for t, r in zip(spec.tasks, ratios) if not keep or t in keep]


def _task_data(spec: PretrainTask, txt_dbs: list[TxtDb], img_dbs: list, cfg: RunConfig, seed: int) -> tuple[Any, Any]:
    return spec.make_dataset(txt_dbs, img_dbs, cfg.data, seed), spec.collate


def _sampler(spec: PretrainTask, dataset: Any, batch_size: int, cfg: RunConfig, env: DistEnv, seed: int,
             shuffle: bool) -> Any:
    distinct = spec.distinct_images
    return make_batch_sampler(
        dataset.lens, batch_size, cfg.train.batch_size_unit, env, seed=seed, shuffle=shuffle,
        img_names=dataset.img_names if distinct else None,
        allow_duplicate_images=cfg.data.duplicate_images == "mask",
    )


def _open_dbs(spec: DatasetSpec, cfg: RunConfig) -> tuple[list[TxtDb], list]:
    return ([open_txt_db(p, cfg.data) for p in spec.db],
            [open_img_db(p, cfg.data) for p in spec.img])


def build_streams(cfg: RunConfig, env: DistEnv, pin_memory: bool,
                  tasks: Mapping[str, PretrainTask] = PRETRAIN_TASKS) -> list[Stream]:
    """One resumable loader per (train dataset, kept task); `tasks` is the registry the task
    names mean (the bi-encoder's, or the cross-encoder's `CROSS_ENCODER_TASKS`)."""
    streams = []
    for i, spec in enumerate(cfg.data.train_datasets):
        kept = dataset_tasks(spec, cfg.data.pretrain_tasks, f"train_datasets[{i}]")
        if not kept:
            continue
        txt_dbs, img_dbs = _open_dbs(spec, cfg)
        for task, ratio in kept:
            seed = derive_seed(cfg.train.seed, len(streams))
            dataset, collate = _task_data(tasks[task], txt_dbs, img_dbs, cfg, seed)
            sampler = _sampler(tasks[task], dataset, cfg.train.train_batch_size, cfg, env, seed, shuffle=True)
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


def build_val_data(cfg: RunConfig, env: DistEnv, pin_memory: bool,
                   tasks: Mapping[str, PretrainTask] = PRETRAIN_TASKS) -> ValData:
    """Deterministic validation loaders (masks drawn from a fixed seed) and recall splits."""
    loaders, splits = [], []
    for i, spec in enumerate(cfg.data.val_datasets):
        kept = [t for t, _ in dataset_tasks(spec, cfg.data.pretrain_tasks, f"val_datasets[{i}]")]
        if not kept:
            continue
        txt_dbs, img_dbs = _open_dbs(spec, cfg)
        for task in kept:
            dataset, collate = _task_data(tasks[task], txt_dbs, img_dbs, cfg, seed=cfg.train.seed)
            sampler = _sampler(tasks[task], dataset, cfg.train.val_batch_size, cfg, env, cfg.train.seed, shuffle=False)
            loaders.append((task, eval_loader(dataset, collate, sampler, cfg.data.n_workers, pin_memory)))
        if any(tasks[t].measures_recall for t in kept):
            for k, (tdb, idb) in enumerate(zip(txt_dbs, img_dbs)):
                name = spec.name if len(txt_dbs) == 1 else f"{spec.name}.{k}"
                splits.append(EvalSplit.from_dbs(name, tdb, idb))
    return ValData(loaders, splits)


@torch.no_grad()
def validate(
    model: torch.nn.Module, val: ValData, env: DistEnv, precision: Precision, cfg: RunConfig,
    tasks: Mapping[str, PretrainTask] = PRETRAIN_TASKS,
) -> dict[str, Any]:
    """Per-task losses (example-weighted), VMLM accuracy and recall (every rank calls)."""
    model.eval()
    sums: dict[str, dict[str, torch.Tensor]] = {}
    for task, loader in val.loaders:
        for batch in loader:
            batch = to_device(batch, env.device)
            with precision.autocast():
                out = model(batch, task)
            spec = tasks[task]
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
