"""Pre-training tasks by name: the data, the head's outputs and the metrics of each (SPEC 5).

The one place a task name means something to the pipeline. `pretrain.py` draws batches of
the tasks a config names, `PretrainModel(batch, task)` computes their loss, and validation
weights each task's batch losses by its own count. To add an objective: its dataset and
collate in `data/datasets.py`, its head and loss in `model/pretrain_heads.py` (a method that
`PretrainModel.forward` dispatches to by name), and one `PretrainTask` registered here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data.datasets import (
    RetrievalDataset,
    SmrmDataset,
    VmlmDataset,
    retrieval_collate,
    smrm_collate,
    vmlm_collate,
)
from utils.config import DataConfig

DatasetFactory = Callable[[Sequence[Any], Sequence[Any], DataConfig, int], Any]
Outputs = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PretrainTask:
    """One pre-training objective as the pipeline sees it.

    Attributes:
        name: the task's name in configs (`tasks:` of a dataset) and in `PretrainModel.forward`.
        make_dataset: (txt_dbs, img_dbs, data settings, seed) -> the task's dataset.
        collate: its collate function.
        distinct_images: batches must not hold one image twice (contrastive tasks: another
            caption of the same image would be a false negative).
        weight_key: the model output counting what a batch's loss averages over; validation
            means are weighted by it.
        train_metrics: model outputs -> metrics logged beside the loss.
        correct_key: the output counting correct predictions, for a validation accuracy
            (None: the task has none).
        measures_recall: validation also reports retrieval recall of its datasets.
    """

    name: str
    make_dataset: DatasetFactory
    collate: Callable[[list], dict[str, Any]]
    distinct_images: bool
    weight_key: str
    train_metrics: Callable[[Outputs], dict[str, torch.Tensor]]
    correct_key: str | None = None
    measures_recall: bool = False


def _cmr_metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {"acc_t2i": out["n_correct_t2i"].float() / out["n_pos"],
            "acc_i2t": out["n_correct_i2t"].float() / out["n_pos"]}


def _vmlm_metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {"acc": out["n_correct"].float() / out["n_masked"].clamp(min=1)}


def _no_metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {}


def _smrm_dataset(txt_dbs: Sequence[Any], img_dbs: Sequence[Any], data: DataConfig, seed: int) -> SmrmDataset:
    return SmrmDataset(txt_dbs, img_dbs, mrm_prob=data.mrm_prob, seed=seed)


PRETRAIN_TASKS: dict[str, PretrainTask] = {}


def register_task(task: PretrainTask) -> PretrainTask:
    """Make `task` available to configs and to `pretrain.py`."""
    PRETRAIN_TASKS[task.name] = task
    return task


register_task(PretrainTask(
    name="itm",
    make_dataset=lambda txt, img, data, seed: RetrievalDataset(txt, img),
    collate=retrieval_collate,
    distinct_images=True,
    weight_key="n_pos",
    train_metrics=_cmr_metrics,
    measures_recall=True,
))
register_task(PretrainTask(
    name="mlm",
    make_dataset=lambda txt, img, data, seed: VmlmDataset(txt, img, mask_prob=data.mask_prob, seed=seed),
    collate=vmlm_collate,
    distinct_images=False,
    weight_key="n_masked",
    train_metrics=_vmlm_metrics,
    correct_key="n_correct",
))
register_task(PretrainTask(
    name="mrfr",
    make_dataset=_smrm_dataset,
    collate=smrm_collate,
    distinct_images=False,
    weight_key="n_masked",
    train_metrics=_no_metrics,
))
register_task(PretrainTask(
    name="mrckl",
    make_dataset=_smrm_dataset,
    collate=smrm_collate,
    distinct_images=False,
    weight_key="n_masked",
    train_metrics=_no_metrics,
))
