"""SMRM (SPEC 5): masked regions predicted from the image tower's states with the text tower's
[CLS] state combined in (`cls_concat`). Two tasks share its data and hidden states:

* MRFR (`mrfr`): dense -> GELU -> LayerNorm -> `h @ img_linear.weight + bias` (the weight tied
  to the image tower's region projection), MSE against the original 2048-d features;
* MRC-kl (`mrckl`): dense -> GELU -> LayerNorm -> Linear(1601), KL(soft_labels || softmax).

Boxes are masked with probability `mrm_prob` (at least one; `data.datasets.SmrmDataset`); the
losses are plain means, as in the original. Both need the bi-encoder's token states.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.datasets import SmrmDataset, smrm_collate
from model.packed import packable
from model.pretrain_model import combine_cls, combine_rows
from model.retrieval import TOKEN_STATES
from utils.config import DataConfig
from utils.pipeline.pretrain_tasks.base import PretrainTask, no_metrics
from utils.pipeline.pretrain_tasks.vmlm import check_same_width


class RegionFeatureRegression(nn.Module):
    """dense -> GELU -> LayerNorm, then `h @ img_linear.weight + bias` (weight tied)."""

    def __init__(self, hidden_size: int, img_linear_weight: nn.Parameter) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=1e-12)
        )
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(img_linear_weight.shape[1]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, H) -> (M, img_dim) predicted region features."""
        return F.linear(self.net(hidden), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """dense -> GELU -> LayerNorm -> Linear(label_dim)."""

    def __init__(self, hidden_size: int, label_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Linear(hidden_size, label_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, H) -> (M, label_dim) class logits."""
        return self.net(hidden)


def image_width(model: Any) -> int:
    """The hidden size the region heads work in (the towers must agree on it)."""
    txt_cfg, img_cfg = model.bert.head_configs()
    check_same_width(txt_cfg, img_cfg)
    return img_cfg.hidden_size


def make_regression_head(model: Any) -> RegionFeatureRegression:
    """The MRFR head of a pre-training model, tied to its backbone's region projection."""
    return RegionFeatureRegression(image_width(model), model.bert.tied_region_projection)


def make_classification_head(model: Any) -> RegionClassification:
    """The MRC-kl head of a pre-training model."""
    return RegionClassification(image_width(model), model.settings.img_label_dim)


def mrfr_loss(pred_feat: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
    """Masked region feature regression: MSE, a plain mean over all elements."""
    return F.mse_loss(pred_feat.float(), target_feat.float())


def mrckl_loss(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Masked region classification, KL(soft_labels || softmax(logits)).

    As in the original, a plain mean over every element, i.e. also over the 1601 classes.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(log_probs, soft_labels.float(), reduction="none").mean()


def masked_region_hidden(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """(M, H) SMRM states of the masked regions, in `img_masked.nonzero()` order."""
    bert, mode = model.bert, model.bert.cls_concat
    txt, img = batch["txt"], batch["img"]
    img_masked = img["img_masked"]
    if bert.execution == "packed" and packable(txt["attention_mask"]):
        txt_cls = bert.text_cls_hidden(txt["input_ids"], txt["attention_mask"])
        img_rows, layout = bert.image_hidden_packed(img["img_feat"], img["img_pos"], img["img_mask"], img_masked)
        # Column 0 of the tower's sequence is the [CLS] slot; img_masked covers the regions.
        slot_masked = F.pad(img_masked.bool(), (1, 0)).flatten()[layout.flat_index]
        rows = slot_masked.nonzero().squeeze(1)
        return combine_rows(img_rows[rows], txt_cls[layout.batch_index[rows]], mode)
    _, txt_cls = bert.text_hidden(txt["input_ids"], txt["attention_mask"])
    img_seq, _ = bert.image_hidden(img["img_feat"], img["img_pos"], img["img_mask"], img_masked)
    # Position 0 is the [CLS] slot; regions start at 1 like the columns of img_masked.
    seq = combine_cls(img_seq[:, 1:], txt_cls, mode)
    return seq[img_masked.bool()]


def smrm_dataset(txt_dbs: Sequence[Any], img_dbs: Sequence[Any], data: DataConfig, seed: int) -> SmrmDataset:
    return SmrmDataset(txt_dbs, img_dbs, mrm_prob=data.mrm_prob, seed=seed)


MaskedRegionStates = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def region_tasks(masked_states: MaskedRegionStates, needs: frozenset[str]) -> tuple[PretrainTask, PretrainTask]:
    """The `mrfr` and `mrckl` tasks over the (M, H) masked regions' states that `masked_states`
    gives, in `img_masked.nonzero()` order: the bi-encoder's (`masked_region_hidden`, SMRM) or
    the cross-encoder's joint ones (`joint.py`)."""

    def mrfr_forward(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """MRFR loss and the number of masked regions."""
        hidden = masked_states(model, batch)
        loss = mrfr_loss(model.feat_regress(hidden), batch["feat_targets"])
        return {"loss": loss, "n_masked": torch.tensor(hidden.shape[0], device=hidden.device)}

    def mrckl_forward(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """MRC-kl loss and the number of masked regions."""
        hidden = masked_states(model, batch)
        loss = mrckl_loss(model.region_classifier(hidden), batch["label_targets"])
        return {"loss": loss, "n_masked": torch.tensor(hidden.shape[0], device=hidden.device)}

    mrfr = PretrainTask(
        name="mrfr",
        make_dataset=smrm_dataset,
        collate=smrm_collate,
        distinct_images=False,
        weight_key="n_masked",
        train_metrics=no_metrics,
        forward=mrfr_forward,
        needs=needs,
        head_name="feat_regress",
        make_head=make_regression_head,
    )
    mrckl = PretrainTask(
        name="mrckl",
        make_dataset=smrm_dataset,
        collate=smrm_collate,
        distinct_images=False,
        weight_key="n_masked",
        train_metrics=no_metrics,
        forward=mrckl_forward,
        needs=needs,
        head_name="region_classifier",
        make_head=make_classification_head,
    )
    return mrfr, mrckl


MRFR, MRCKL = region_tasks(masked_region_hidden, frozenset({TOKEN_STATES}))
