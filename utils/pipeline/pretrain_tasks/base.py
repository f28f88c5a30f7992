"""`PretrainTask`: one pre-training objective, everything about it in one registry entry.

A task's module (`cmr.py`, `vmlm.py`, `smrm.py`) builds its entry: the data (dataset factory,
collate, batch rule), the head the pre-training model attaches for it, the forward that turns a
batch into the loss, and the metrics logged and validated. `model.pretrain_model.PretrainModel`
attaches the heads and dispatches `forward(batch, task)` through the entry; `pretrain.py` draws
batches of the tasks a config names; validation weights each task's batch losses by its own
count.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from utils.config import DataConfig

DatasetFactory = Callable[[Sequence[Any], Sequence[Any], DataConfig, int], Any]
Outputs = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PretrainTask:
    """One pre-training objective (implements `model.pretrain_model.PretrainObjective`).

    Attributes:
        name: the task's name in configs (`tasks:` of a dataset) and in `PretrainModel.forward`.
        make_dataset: (txt_dbs, img_dbs, data settings, seed) -> the task's dataset.
        collate: its collate function.
        distinct_images: batches must not hold one image twice (contrastive tasks: another
            caption of the same image would be a false negative).
        weight_key: the output counting what a batch's loss averages over; validation means
            are weighted by it.
        train_metrics: outputs -> metrics logged beside the loss.
        forward: (pre-training model, batch) -> `loss` and the task's counts.
        needs: capabilities (`model/retrieval.py`) the bi-encoder must provide.
        head_name: the pre-training model's attribute for the task's head (its checkpoint
            keys); None: the task has no head of its own.
        make_head: (pre-training model) -> the head, when `head_name` is set.
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
    forward: Callable[[Any, Mapping[str, Any]], dict[str, torch.Tensor]]
    needs: frozenset[str] = field(default_factory=frozenset)
    head_name: str | None = None
    make_head: Callable[[Any], nn.Module] | None = None
    correct_key: str | None = None
    measures_recall: bool = False

    def build_head(self, model: Any) -> nn.Module | None:
        """The task's head for a pre-training model (None when it has none)."""
        return self.make_head(model) if self.make_head is not None else None


def no_metrics(out: Outputs) -> dict[str, torch.Tensor]:
    """Train metrics of a task that logs its loss only."""
    return {}
