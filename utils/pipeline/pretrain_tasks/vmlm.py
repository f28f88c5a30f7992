"""VMLM (`mlm` in configs, SPEC 5): masked text tokens predicted from the text tower's states
with the image tower's [CLS] state combined in (`cls_concat`).

BERT masking (15% chosen; of those 80% [MASK], 10% a random id of `v_range`, 10% kept; at
least one) is the dataset's (`data.datasets.VmlmDataset`). The head is dense -> GELU ->
LayerNorm -> a decoder tied to the image tower's word embeddings, plus its own bias (the
original's `cls.predictions.*` keys). Needs the bi-encoder's token states.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from data.datasets import IGNORE_INDEX, VmlmDataset, vmlm_collate
from model.packed import packable
from model.pretrain_model import combine_cls, combine_rows
from model.retrieval import TOKEN_STATES
from utils.pipeline.pretrain_tasks.base import Outputs, PretrainTask


class MLMPredictionHead(nn.Module):
    """`transform` (dense -> GELU -> LayerNorm) then the tied decoder plus an own bias."""

    def __init__(self, config: Any, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(embedding_weight.shape[1], embedding_weight.shape[0], bias=False)
        self.decoder.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(embedding_weight.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, H) hidden states -> (M, vocab) scores."""
        return self.decoder(self.transform(hidden)) + self.bias


class MLMHead(nn.Module):
    """Wrapper giving the original key names `cls.predictions.*`."""

    def __init__(self, config: Any, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.predictions = MLMPredictionHead(config, embedding_weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(M, H) hidden states -> (M, vocab) scores."""
        return self.predictions(hidden)


def check_same_width(txt_cfg: Any, img_cfg: Any) -> None:
    """The heads add one tower's [CLS] state to the other's states: the widths must match.

    Raises:
        ValueError: the towers differ in hidden size.
    """
    if txt_cfg.hidden_size != img_cfg.hidden_size:
        raise ValueError(
            f"pre-training needs towers of the same hidden size (text {txt_cfg.hidden_size}, "
            f"image {img_cfg.hidden_size})"
        )


def make_head(model: Any) -> MLMHead:
    """The VMLM head of a pre-training model, its decoder tied to the image word embeddings.

    Raises:
        ValueError: the towers differ in hidden size or vocabulary.
    """
    txt_cfg, img_cfg = model.bert.head_configs()
    check_same_width(txt_cfg, img_cfg)
    if txt_cfg.vocab_size != img_cfg.vocab_size:
        raise ValueError(
            f"VMLM decodes text with the image tower's word embeddings: the vocabularies "
            f"must match (text {txt_cfg.vocab_size}, image {img_cfg.vocab_size})"
        )
    return MLMHead(img_cfg, model.bert.tied_word_embeddings)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-token cross-entropy, a plain mean over the masked tokens.

    Args:
        logits: (M, V) scores of the masked positions (or (..., V) with -100 labels elsewhere).
        labels: (M,) target ids (or (...) with -100 where not masked).
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


MaskedTokenStates = Callable[[Any, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def masked_token_hidden(model: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """VMLM's states: text states + the image tower's [CLS] state, at the masked tokens.

    Returns:
        (M, H) states of the masked tokens and their (M,) target ids, in row-major order.
    """
    bert, mode = model.bert, model.bert.cls_concat
    txt, img = batch["txt"], batch["img"]
    labels = batch["txt_labels"]
    if bert.execution == "packed" and packable(txt["attention_mask"]):
        txt_rows, layout = bert.text_hidden_packed(txt["input_ids"], txt["attention_mask"])
        img_cls = bert.image_cls_hidden(img["img_feat"], img["img_pos"], img["img_mask"])
        # Packed rows keep the row-major order of the padded batch: selecting the masked
        # ones gives `seq[masked]` of the padded path, in the same order.
        packed_labels = labels.flatten()[layout.flat_index]
        rows = (packed_labels != IGNORE_INDEX).nonzero().squeeze(1)
        return combine_rows(txt_rows[rows], img_cls[layout.batch_index[rows]], mode), packed_labels[rows]
    txt_seq, _ = bert.text_hidden(txt["input_ids"], txt["attention_mask"])
    _, img_cls = bert.image_hidden(img["img_feat"], img["img_pos"], img["img_mask"])
    seq = combine_cls(txt_seq, img_cls, mode)
    masked = labels != IGNORE_INDEX
    return seq[masked], labels[masked]


def _metrics(out: Outputs) -> dict[str, torch.Tensor]:
    return {"acc": out["n_correct"].float() / out["n_masked"].clamp(min=1)}


def mlm_task(masked_states: MaskedTokenStates, needs: frozenset[str]) -> PretrainTask:
    """The `mlm` task over the masked tokens' states that `masked_states` gives: the bi-encoder's
    (`masked_token_hidden`, VMLM) or the cross-encoder's joint ones (`joint.py`)."""

    def forward(model: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """`loss`, `n_correct` (argmax hits) and `n_masked`."""
        hidden, targets = masked_states(model, batch)
        # Decode only the masked positions: the vocabulary projection dominates the cost.
        logits = model.cls(hidden)
        return {
            "loss": mlm_loss(logits, targets),
            "n_correct": (logits.argmax(dim=-1) == targets).sum().detach(),
            "n_masked": torch.tensor(targets.numel(), device=logits.device),
        }

    return PretrainTask(
        name="mlm",
        make_dataset=lambda txt, img, data, seed: VmlmDataset(txt, img, mask_prob=data.mask_prob, seed=seed),
        collate=vmlm_collate,
        distinct_images=False,
        weight_key="n_masked",
        train_metrics=_metrics,
        forward=forward,
        needs=needs,
        head_name="cls",
        make_head=make_head,
        correct_key="n_correct",
    )


TASK = mlm_task(masked_token_hidden, frozenset({TOKEN_STATES}))
