"""LightningDOT pre-training (SPEC 5): CMR, VMLM, and SMRM (MRFR + MRC-kl) on a bi-encoder.

Attribute names reproduce the original `model_step_N.pt` keys: `bert` (the bi-encoder),
`cls.predictions.*`, `feat_regress.*`, `region_classifier.*`. The original's `itm_output`
head is never used and does not exist here (the checkpoint importer drops it).

`PretrainModel.execution` is its bi-encoder's (`BiEncoderConfig.execution`, saved in
checkpoints): `packed` runs both towers on real tokens only (VMLM decodes the masked packed
text rows, SMRM the masked packed region rows), `padded` every position of the batch.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from model.biencoder import BiEncoder
from model.losses import (
    hierarchical_contrastive_loss,
    mlm_loss,
    mrckl_loss,
    mrfr_loss,
)
from model.packed import packable
from model.towers import build_bert_config
from utils.region_features import NUM_LABELS

# Visual Genome 1600 object classes + background (SPEC 2 soft_labels).
TASKS = ("itm", "mlm", "mrfr", "mrckl")


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


def combine_cls(seq: torch.Tensor, other_cls: torch.Tensor, mode: str) -> torch.Tensor:
    """Inject the other tower's [CLS] hidden state into every position of `seq`.

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


def _combine_rows(rows: torch.Tensor, other_cls: torch.Tensor, mode: str) -> torch.Tensor:
    """`combine_cls` for packed rows: row i gets `other_cls[i]` (its sequence's [CLS])."""
    return combine_cls(rows.unsqueeze(1), other_cls, mode).squeeze(1)


class PretrainModel(nn.Module):
    """The bi-encoder `bert` plus the VMLM / MRFR / MRC-kl heads, trained one task per batch.

    The heads keep PyTorch's default initialisation, as the original does (it never applies
    the BERT initialiser to them); pre-trained heads come from a checkpoint anyway.
    """

    def __init__(
        self,
        biencoder: BiEncoder,
        img_label_dim: int = NUM_LABELS,
        mask_duplicates: bool = True,
    ) -> None:
        """Attach the heads to `biencoder`.

        Args:
            biencoder: the model being pre-trained (`self.bert`).
            img_label_dim: number of region classes of MRC-kl.
            mask_duplicates: CMR removes other in-batch captions of a row's image from its
                negatives (see `contrastive_loss`).

        Raises:
            ValueError: the towers differ in hidden size or vocabulary (the heads add one
                tower's [CLS] to the other's states and decode text with the image tower's
                word embeddings).
        """
        super().__init__()
        cfg = biencoder.config
        head_cfg = build_bert_config(cfg.img_config)
        txt_cfg = build_bert_config(cfg.txt_config)
        if txt_cfg.hidden_size != head_cfg.hidden_size:
            raise ValueError(
                f"pre-training needs towers of the same hidden size (text {txt_cfg.hidden_size}, "
                f"image {head_cfg.hidden_size})"
            )
        if txt_cfg.vocab_size != head_cfg.vocab_size:
            raise ValueError(
                f"VMLM decodes text with the image tower's word embeddings: the vocabularies "
                f"must match (text {txt_cfg.vocab_size}, image {head_cfg.vocab_size})"
            )
        self.bert = biencoder
        self.cls_concat = cfg.cls_concat
        self.mask_duplicates = mask_duplicates
        img_bert = biencoder.img_model.bert
        self.cls = MLMHead(head_cfg, img_bert.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(
            head_cfg.hidden_size, img_bert.img_embeddings.img_linear.weight
        )
        self.region_classifier = RegionClassification(head_cfg.hidden_size, img_label_dim)

    @property
    def execution(self) -> str:
        """`packed` or `padded`: the bi-encoder's `execution`, used by every task."""
        return self.bert.execution

    @execution.setter
    def execution(self, execution: str) -> None:
        self.bert.execution = execution

    def _packed(self, txt_mask: torch.Tensor) -> bool:
        return self.bert.execution == "packed" and packable(txt_mask)

    def forward(self, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        """Loss (and metric counts) of one task on one batch.

        Args:
            batch: a batch in the docs/architecture.md layout for `task`.
            task: `itm` (CMR) | `mlm` (VMLM) | `mrfr` | `mrckl`.

        Returns:
            `loss` plus: itm -> `n_correct_t2i`, `n_correct_i2t`, `n_pos`;
            mlm -> `n_correct`, `n_masked`; mrfr / mrckl -> `n_masked`.
        """
        heads = {
            "itm": self.forward_itm,
            "mlm": self.forward_mlm,
            "mrfr": lambda b: self.forward_mrm(b, "mrfr"),
            "mrckl": lambda b: self.forward_mrm(b, "mrckl"),
        }
        if task not in heads:
            raise ValueError(f"unknown pre-training task {task!r}; expected one of {TASKS}")
        return heads[task](batch)

    def forward_itm(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """CMR: contrastive loss on the projected embeddings, negatives gathered globally
        (with a hierarchy: the weighted sum over its levels)."""
        txt_emb, img_emb = self.bert(batch)
        return self.cmr_outputs(txt_emb, img_emb, batch)

    def cmr_outputs(
        self,
        txt_levels: list[torch.Tensor],
        img_levels: list[torch.Tensor],
        batch: Mapping[str, Any],
    ) -> dict[str, torch.Tensor]:
        """CMR loss and accuracy counts from already computed embedding levels of `batch`
        (what the bi-encoder's `forward` returns): the weighted sum over the levels."""
        out = hierarchical_contrastive_loss(
            txt_levels, img_levels, self.bert.level_weights,
            num_pos=batch.get("num_pos"), txt_img_keys=batch.get("txt_img_keys"), img_keys=batch.get("img_keys"),
            mask_duplicates=self.mask_duplicates, temperature=self.bert.loss_temperature,
        )
        return {
            "loss": out.loss,
            "n_correct_t2i": out.n_correct_t2i,
            "n_correct_i2t": out.n_correct_i2t,
            "n_pos": torch.tensor(out.n_pos, device=out.loss.device),
        }

    def forward_mlm(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """VMLM: text states + the image tower's [CLS] hidden state -> masked token ids."""
        txt, img = batch["txt"], batch["img"]
        labels = batch["txt_labels"]
        if self._packed(txt["attention_mask"]):
            txt_rows, layout = self.bert.text_hidden_packed(txt["input_ids"], txt["attention_mask"])
            img_cls = self.bert.image_cls_hidden(img["img_feat"], img["img_pos"], img["img_mask"])
            # Packed rows keep the row-major order of the padded batch: selecting the masked
            # ones gives `seq[masked]` of the padded path, in the same order.
            packed_labels = labels.flatten()[layout.flat_index]
            rows = (packed_labels != -100).nonzero().squeeze(1)
            hidden = _combine_rows(txt_rows[rows], img_cls[layout.batch_index[rows]], self.cls_concat)
            targets = packed_labels[rows]
        else:
            txt_seq, _ = self.bert.text_hidden(txt["input_ids"], txt["attention_mask"])
            _, img_cls = self.bert.image_hidden(img["img_feat"], img["img_pos"], img["img_mask"])
            seq = combine_cls(txt_seq, img_cls, self.cls_concat)
            masked = labels != -100
            hidden, targets = seq[masked], labels[masked]
        # Decode only the masked positions: the vocabulary projection dominates the cost.
        logits = self.cls(hidden)
        return {
            "loss": mlm_loss(logits, targets),
            "n_correct": (logits.argmax(dim=-1) == targets).sum().detach(),
            "n_masked": torch.tensor(targets.numel(), device=logits.device),
        }

    def masked_region_hidden(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(M, H) SMRM states of the masked regions, in `img_masked.nonzero()` order."""
        txt, img = batch["txt"], batch["img"]
        img_masked = img["img_masked"]
        if self._packed(txt["attention_mask"]):
            txt_cls = self.bert.text_cls_hidden(txt["input_ids"], txt["attention_mask"])
            img_rows, layout = self.bert.image_hidden_packed(
                img["img_feat"], img["img_pos"], img["img_mask"], img_masked
            )
            # Column 0 of the tower's sequence is the [CLS] slot; img_masked covers the regions.
            slot_masked = F.pad(img_masked.bool(), (1, 0)).flatten()[layout.flat_index]
            rows = slot_masked.nonzero().squeeze(1)
            return _combine_rows(img_rows[rows], txt_cls[layout.batch_index[rows]], self.cls_concat)
        _, txt_cls = self.bert.text_hidden(txt["input_ids"], txt["attention_mask"])
        img_seq, _ = self.bert.image_hidden(
            img["img_feat"], img["img_pos"], img["img_mask"], img_masked
        )
        # Position 0 is the [CLS] slot; regions start at 1 like the columns of img_masked.
        seq = combine_cls(img_seq[:, 1:], txt_cls, self.cls_concat)
        return seq[img_masked.bool()]

    def forward_mrm(self, batch: Mapping[str, Any], task: str) -> dict[str, torch.Tensor]:
        """SMRM: MRFR (feature regression, MSE) or MRC-kl (soft-label KL)."""
        hidden = self.masked_region_hidden(batch)
        if task == "mrfr":
            loss = mrfr_loss(self.feat_regress(hidden), batch["feat_targets"])
        else:
            loss = mrckl_loss(self.region_classifier(hidden), batch["label_targets"])
        return {"loss": loss, "n_masked": torch.tensor(hidden.shape[0], device=hidden.device)}
