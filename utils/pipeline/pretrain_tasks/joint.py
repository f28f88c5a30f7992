"""UNITER's pre-training objectives on the cross-encoder's joint input (`rerank.py train` with
`cross_encoder.mode: pretrain`): `[CLS] caption [SEP]` and the regions through one encoder.

* ITM (`itm`): the caption with its image or, with probability `data.itm_negative_prob`,
  another image; cross-entropy of the ITM head (`itm_output`, whose row 1 is the retrieval score)
  against match / no match;
* MLM (`mlm`): BERT-masked caption tokens predicted from their joint states (the decoder tied
  to the word embeddings, as UNITER's `cls.predictions`);
* MRFR (`mrfr`) and MRC-kl (`mrckl`): masked regions predicted from their joint states (the
  regression tied to `img_linear`, UNITER's `feat_regress` and `region_classifier`).

The heads are the same modules as the bi-encoder's VMLM and SMRM heads (`vmlm.py`, `smrm.py`),
sized from and tied to the cross-encoder. They need the cross-encoder's `JOINT_STATES`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from data.datasets import IGNORE_INDEX, ItmDataset, itm_collate
from model.retrieval import JOINT_STATES
from utils.pipeline.pretrain_tasks.base import Outputs, PretrainTask
from utils.pipeline.pretrain_tasks.smrm import region_tasks
from utils.pipeline.pretrain_tasks.vmlm import mlm_task

NEEDS = frozenset({JOINT_STATES})


def _joint(model: Any, batch: Mapping[str, Any], img_masked: torch.Tensor | None = None) -> torch.Tensor:
    txt, img = batch["txt"], batch["img"]
    return model.bert.joint_hidden(txt["input_ids"], txt["attention_mask"], img["img_feat"], img["img_pos"],
                                   img["img_mask"], img_masked)


def itm_forward(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Binary ITM: match / no-match cross-entropy of the ITM head.

    Returns:
        `loss`, `n_correct` (argmax hits) and `n_pairs`.
    """
    logits = model.bert.itm_logits(_joint(model, batch)).float()
    labels = batch["labels"].to(logits.device)
    return {
        "loss": F.cross_entropy(logits, labels),
        "n_correct": (logits.argmax(dim=-1) == labels).sum().detach(),
        "n_pairs": torch.tensor(labels.numel(), device=logits.device),
    }


def masked_token_states(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, H) joint states of the masked caption tokens and their (M,) target ids."""
    labels = batch["txt_labels"]
    text_states = _joint(model, batch)[:, : labels.shape[1]]
    masked = labels != IGNORE_INDEX
    return text_states[masked], labels[masked]


def masked_region_states(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """(M, H) joint states of the masked regions, in `img_masked.nonzero()` order."""
    img_masked = batch["img"]["img_masked"]
    hidden = _joint(model, batch, img_masked)
    region_states = hidden[:, hidden.shape[1] - img_masked.shape[1]:]
    return region_states[img_masked.bool()]


def _itm_metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {"acc": out["n_correct"].float() / out["n_pairs"].clamp(min=1)}


ITM = PretrainTask(
    name="itm",
    make_dataset=lambda txt, img, data, seed: ItmDataset(txt, img, neg_prob=data.itm_negative_prob, seed=seed),
    collate=itm_collate,
    distinct_images=False,
    weight_key="n_pairs",
    train_metrics=_itm_metrics,
    forward=itm_forward,
    needs=NEEDS,
    correct_key="n_correct",
)
MLM = mlm_task(masked_token_states, NEEDS)
MRFR, MRCKL = region_tasks(masked_region_states, NEEDS)
