"""CMR (`itm` in configs, SPEC 5): in-batch contrastive loss on the projected embeddings.

Negatives are gathered over all ranks; with an embedding hierarchy the loss is the weighted sum
over its levels (`model.losses.hierarchical_contrastive_loss`; a flat model is one level). Any
model family can run it: it needs only the retrieval contract.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from data.datasets import RetrievalDataset, retrieval_collate
from model.losses import hierarchical_contrastive_loss
from utils.pipeline.pretrain_tasks.base import Outputs, PretrainTask


def cmr_forward(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """CMR loss and accuracy counts of a retrieval batch (`model` is the pre-training model)."""
    bert = model.bert
    txt_levels, img_levels = bert(batch)
    out = hierarchical_contrastive_loss(
        txt_levels, img_levels, bert.level_weights,
        num_pos=batch.get("num_pos"), txt_img_keys=batch.get("txt_img_keys"), img_keys=batch.get("img_keys"),
        mask_duplicates=model.settings.mask_duplicates, temperature=bert.loss_temperature,
    )
    return {
        "loss": out.loss,
        "n_correct_t2i": out.n_correct_t2i,
        "n_correct_i2t": out.n_correct_i2t,
        "n_pos": torch.tensor(out.n_pos, device=out.loss.device),
    }


def _metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {"acc_t2i": out["n_correct_t2i"].float() / out["n_pos"],
            "acc_i2t": out["n_correct_i2t"].float() / out["n_pos"]}


TASK = PretrainTask(
    name="itm",
    make_dataset=lambda txt, img, data, seed: RetrievalDataset(txt, img),
    collate=retrieval_collate,
    distinct_images=True,
    weight_key="n_pos",
    train_metrics=_metrics,
    forward=cmr_forward,
    measures_recall=True,
)
