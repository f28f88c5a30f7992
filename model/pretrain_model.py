"""The pre-training model: a backbone (`bert`) plus the heads of its pre-training objectives.

The backbone is a bi-encoder (LightningDOT pre-training: CMR, VMLM, MRFR, MRC-kl) or the UNITER
cross-encoder (UNITER's ITM, MLM and region objectives on the joint input). The objectives
themselves (data, head, forward and loss) are the registry entries of
`utils/pipeline/pretrain_tasks/`; this module only holds them together and dispatches
`forward(batch, task)` to the task's own forward. Every objective the backbone can run (it
provides what the objective `needs`, `model/retrieval.py` capabilities) is attached, in registry
order, whatever the run trains, so a checkpoint always holds the same heads.

Attribute names reproduce the original `model_step_N.pt` keys: `bert` (the bi-encoder),
`cls.predictions.*`, `feat_regress.*`, `region_classifier.*` (each objective names its head's
attribute). The original's `itm_output` head is never used and does not exist here (the
checkpoint importer drops it).

`PretrainModel.execution` is its bi-encoder's (saved in checkpoints): `packed` runs both towers
on real tokens only, `padded` every position of the batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from model.formats import PRETRAIN_FORMAT
from utils.region_features import NUM_LABELS


@dataclass(frozen=True)
class PretrainSettings:
    """What the heads and losses need beyond the bi-encoder (stored in checkpoints).

    Attributes:
        img_label_dim: number of region classes of MRC-kl (Visual Genome 1600 + background).
        mask_duplicates: CMR removes other in-batch captions of a row's image from its
            negatives (see `model.losses.contrastive_loss`).
    """

    img_label_dim: int = NUM_LABELS
    mask_duplicates: bool = True


class PretrainBackbone(Protocol):
    """What the pre-training model needs of its backbone (a `RetrievalModel` or the cross-encoder)."""

    execution: str

    def provides(self, capability: str) -> bool: ...

    def checkpoint_config(self) -> dict[str, Any]: ...


class PretrainObjective(Protocol):
    """One pre-training objective as the model sees it (`utils/pipeline/pretrain_tasks/`)."""

    name: str
    # Capabilities (`model/retrieval.py`) the bi-encoder must provide for this objective.
    needs: frozenset[str]
    # Attribute of the pre-training model holding the objective's head; None: no head.
    head_name: str | None

    def build_head(self, model: PretrainModel) -> nn.Module | None:
        """The objective's head for `model` (its bi-encoder and settings are set)."""

    def forward(self, model: PretrainModel, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Loss and metric counts of one batch of this objective."""


def missing_capabilities(objective: PretrainObjective, backbone: PretrainBackbone) -> list[str]:
    """The capabilities `objective` needs that `backbone`'s family does not provide."""
    return sorted(c for c in objective.needs if not backbone.provides(c))


class PretrainModel(nn.Module):
    """The bi-encoder `bert` plus the heads of the objectives it can run, one task per batch.

    The heads keep PyTorch's default initialisation, as the original does (it never applies
    the BERT initialiser to them); pre-trained heads come from a checkpoint anyway.
    """

    checkpoint_format = PRETRAIN_FORMAT

    def __init__(
        self,
        backbone: PretrainBackbone,
        objectives: Sequence[PretrainObjective],
        settings: PretrainSettings | None = None,
    ) -> None:
        """Attach the heads of every objective in `objectives` that `backbone` can run.

        Args:
            backbone: the model being pre-trained (`self.bert`).
            objectives: the registered objectives, in registry order (the heads' order).
            settings: head sizes and loss options (default `PretrainSettings()`).
        """
        super().__init__()
        self.bert = backbone
        self.settings = settings or PretrainSettings()
        self.objectives: dict[str, PretrainObjective] = {}
        for objective in objectives:
            if missing_capabilities(objective, backbone):
                continue
            self.objectives[objective.name] = objective
            head = objective.build_head(self)
            if head is not None:
                self.add_module(objective.head_name, head)

    @property
    def execution(self) -> str:
        """`packed` or `padded`: the bi-encoder's `execution`, used by every task."""
        return self.bert.execution

    @execution.setter
    def execution(self, execution: str) -> None:
        self.bert.execution = execution

    def checkpoint_config(self) -> dict[str, Any]:
        """The bi-encoder's model config plus the pre-training settings (`pretrain`)."""
        return {**self.bert.checkpoint_config(), "pretrain": asdict(self.settings)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights stored in our checkpoints."""
        return self.state_dict()

    def forward(self, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        """Loss (and metric counts) of one task on one batch.

        Args:
            batch: a batch in the docs/architecture.md layout for `task`.
            task: a name of the objectives attached to this model.

        Returns:
            `loss` plus the task's counts (see its registry entry).
        """
        if task not in self.objectives:
            raise ValueError(f"unknown pre-training task {task!r}; this model runs {tuple(self.objectives)}")
        return self.objectives[task].forward(self, batch)


def combine_cls(seq: torch.Tensor, other_cls: torch.Tensor, mode: str) -> torch.Tensor:
    """Inject the other tower's [CLS] hidden state into every position of `seq` (SPEC 5).

    Args:
        seq: (B, L, H) hidden states of one tower.
        other_cls: (B, H) [CLS] hidden state of the other tower (before projection).
        mode: `add` | `multiply` | `none`.
    """
    if mode == "add":
        return seq + other_cls.unsqueeze(1)
    if mode == "multiply":
        return seq * other_cls.unsqueeze(1)
    if mode == "none":
        return seq
    raise ValueError(f"unknown cls_concat mode {mode!r}")


def combine_rows(rows: torch.Tensor, other_cls: torch.Tensor, mode: str) -> torch.Tensor:
    """`combine_cls` for packed rows: row i gets `other_cls[i]` (its sequence's [CLS])."""
    return combine_cls(rows.unsqueeze(1), other_cls, mode).squeeze(1)


def build_pretrain_model(
    backbone: PretrainBackbone,
    objectives: Sequence[PretrainObjective],
    settings: PretrainSettings | None = None,
) -> PretrainModel:
    """The pre-training model of `backbone` with the objectives it can run (see `PretrainModel`)."""
    return PretrainModel(backbone, objectives, settings)
