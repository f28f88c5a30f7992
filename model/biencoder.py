"""The LightningDOT bi-encoder: a BERT text tower and a UNITER image tower (SPEC 3).

Score = plain dot product of the two embeddings; no normalisation, no temperature.

`BiEncoderConfig.execution` (`packed` by default, or `padded`; `model/packed.py`) selects
how both towers run their encoders; the pre-training model follows its bi-encoder's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.packed import DEFAULT_EXECUTION, VarlenLayout, check_execution
from model.state_dicts import (
    drop_prefixes,
    load_strict,
    read_weights,
    rename_gamma_beta,
)
from model.towers import (
    ImageTower,
    TextTower,
    build_bert_config,
    config_from_dict,
    hf_weights_file,
    read_bert_config,
)
from utils.region_features import FEAT_DIM

logger = logging.getLogger(__name__)

CLS_CONCAT_MODES = ("add", "multiply", "none")
# Heads found in HF `BertFor*` weight files; a text tower has no use for them.
HF_HEAD_PREFIXES = ("cls.",)


@dataclass
class BiEncoderConfig:
    """Everything needed to rebuild a `BiEncoder` without any external file.

    Attributes:
        txt_config: BERT config of the text tower (HF `config.json` keys).
        img_config: BERT config of the image tower (UNITER config keys).
        project_dim: size of the `encode_proj` output; 0 = no projection.
        dropout: when not None, overrides both dropout rates of both towers.
        cls_concat: how pre-training combines one tower's [CLS] with the other's sequence
            (`add` = VMLM / SMRM of the paper, `multiply`, `none`).
        fix_txt_encoder: freeze the text tower.
        fix_img_encoder: freeze the image tower.
        img_dim: region feature size.
        attn_implementation: `sdpa` or `eager` (both towers).
        execution: `packed` (real tokens only, [CLS]-only last layer) or `padded` (every
            position of the batch): the same function, held equal by tests/test_packed.py.
            Checkpoints written before this field existed load with the default.
    """

    txt_config: dict[str, Any]
    img_config: dict[str, Any]
    project_dim: int = 768
    dropout: float | None = None
    cls_concat: str = "add"
    fix_txt_encoder: bool = False
    fix_img_encoder: bool = False
    img_dim: int = FEAT_DIM
    attn_implementation: str = "sdpa"
    execution: str = DEFAULT_EXECUTION

    def __post_init__(self) -> None:
        check_execution(self.execution)
        if self.cls_concat == "":
            # The original configs spell "no combination" as an empty string.
            self.cls_concat = "none"
        if self.cls_concat not in CLS_CONCAT_MODES:
            raise ValueError(f"cls_concat must be one of {CLS_CONCAT_MODES}, got {self.cls_concat!r}")
        if self.project_dim < 0:
            raise ValueError(f"project_dim must be >= 0, got {self.project_dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BiEncoderConfig:
        """Inverse of `to_dict`; unknown keys raise."""
        return config_from_dict(cls, data)


class BiEncoder(nn.Module):
    """Text tower `txt_model` + image tower `img_model` (original state-dict layout).

    `forward(batch)` encodes whichever of `batch["txt"]` / `batch["img"]` is present, so the
    model can sit under DDP; `encode_text` / `encode_image` are the direct entry points.
    """

    def __init__(self, config: BiEncoderConfig) -> None:
        super().__init__()
        self.config = config
        txt_cfg = build_bert_config(config.txt_config, config.dropout, config.attn_implementation)
        img_cfg = build_bert_config(config.img_config, config.dropout, config.attn_implementation)
        self.txt_model = TextTower(txt_cfg, config.project_dim, config.execution)
        self.img_model = ImageTower(img_cfg, config.project_dim, config.img_dim, config.execution)
        self._txt_fixed = False
        self._img_fixed = False
        self.fix_txt_encoder(config.fix_txt_encoder)
        self.fix_img_encoder(config.fix_img_encoder)

    @property
    def execution(self) -> str:
        """`packed` or `padded`: how both towers run (see `BiEncoderConfig.execution`)."""
        return self.config.execution

    @execution.setter
    def execution(self, execution: str) -> None:
        # The config is what checkpoints store; the towers dispatch on their own copy.
        self.config.execution = check_execution(execution)
        self.txt_model.execution = execution
        self.img_model.execution = execution

    def fix_txt_encoder(self, fixed: bool = True) -> None:
        """Freeze (or unfreeze) the whole text tower, projection included."""
        self._txt_fixed = fixed
        for param in self.txt_model.parameters():
            param.requires_grad = not fixed

    def fix_img_encoder(self, fixed: bool = True) -> None:
        """Freeze (or unfreeze) the whole image tower, projection included."""
        self._img_fixed = fixed
        for param in self.img_model.parameters():
            param.requires_grad = not fixed

    @staticmethod
    def _grad_context(fixed: bool) -> contextlib.AbstractContextManager:
        # A frozen tower needs no graph; skipping it saves the activation memory.
        return torch.no_grad() if fixed else contextlib.nullcontext()

    def text_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unprojected text states for the pre-training heads.

        Returns:
            (B, L, H) last-layer hidden states and (B, H) [CLS] hidden state.
        """
        with self._grad_context(self._txt_fixed):
            seq = self.txt_model.hidden(input_ids, attention_mask)
        return seq, seq[:, 0]

    def image_hidden(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unprojected image states for the pre-training heads.

        Returns:
            (B, 1 + N, H) last-layer hidden states (position 0 = [CLS] slot, then the boxes)
            and (B, H) position-0 hidden state.
        """
        with self._grad_context(self._img_fixed):
            seq = self.img_model.hidden(img_feat, img_pos, img_mask, img_masked)
        return seq, seq[:, 0]

    def text_cls_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) unprojected text [CLS] state, by `execution` (packed: [CLS]-only last layer)."""
        with self._grad_context(self._txt_fixed):
            return self.txt_model.cls_hidden(input_ids, attention_mask)

    def image_cls_hidden(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H) unprojected image position-0 state, by `execution`."""
        with self._grad_context(self._img_fixed):
            return self.img_model.cls_hidden(img_feat, img_pos, img_mask, img_masked)

    def text_hidden_packed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, VarlenLayout]:
        """(T, H) text states of the real tokens (packed) and their layout in the batch."""
        with self._grad_context(self._txt_fixed):
            return self.txt_model.hidden_packed(input_ids, attention_mask)

    def image_hidden_packed(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, VarlenLayout]:
        """(T, H) image states of the [CLS] slot and real boxes (packed) and their layout
        in the (B, 1 + N) sequence."""
        with self._grad_context(self._img_fixed):
            return self.img_model.hidden_packed(img_feat, img_pos, img_mask, img_masked)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, D) text embeddings: projected last-layer [CLS] hidden state."""
        with self._grad_context(self._txt_fixed):
            return self.txt_model(input_ids, attention_mask)

    def encode_image(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) image embeddings: projected last-layer hidden state at position 0."""
        with self._grad_context(self._img_fixed):
            return self.img_model(img_feat, img_pos, img_mask, img_masked)

    @staticmethod
    def score(txt_emb: torch.Tensor, img_emb: torch.Tensor) -> torch.Tensor:
        """(T, I) matrix of dot products `txt_emb @ img_emb.T`."""
        return txt_emb @ img_emb.t()

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encode the `txt` and/or `img` inputs of a batch (docs/architecture.md layout).

        Returns:
            (txt_emb or None, img_emb or None).
        """
        txt_emb = img_emb = None
        if batch.get("txt") is not None:
            txt = batch["txt"]
            txt_emb = self.encode_text(txt["input_ids"], txt["attention_mask"])
        if batch.get("img") is not None:
            img = batch["img"]
            img_emb = self.encode_image(
                img["img_feat"], img["img_pos"], img["img_mask"], img.get("img_masked")
            )
        return txt_emb, img_emb


def load_text_tower_state(tower: TextTower, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Fill `tower.bert` from a BERT state dict (HF `BertModel` or `BertFor*` layout).

    Accepts keys with or without the `bert.` prefix, old `gamma`/`beta` LayerNorm names and
    a missing `embeddings.position_ids` buffer; drops the `cls.*` heads of `BertFor*` files.
    A missing pooler is accepted with a warning: the embedding never uses it.
    """
    sd = rename_gamma_beta(state_dict)
    if any(k.startswith("bert.") for k in sd):
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    sd = drop_prefixes(sd, HF_HEAD_PREFIXES)
    if not any(k.startswith("pooler.") for k in sd):
        logger.warning("%s has no BERT pooler; the text tower keeps a random one (unused)", source)
    load_strict(tower.bert, sd, source, "text tower (BertModel)", allow_missing=("pooler.",))


def build_biencoder(
    txt_model_config: str,
    img_model_config: str,
    project_dim: int = 768,
    dropout: float | None = None,
    cls_concat: str = "add",
    fix_txt_encoder: bool = False,
    fix_img_encoder: bool = False,
    attn_implementation: str = "sdpa",
    execution: str = DEFAULT_EXECUTION,
) -> BiEncoder:
    """Build a bi-encoder from local config paths.

    Args:
        txt_model_config: a local HF model directory (its weights, if any, are loaded; a
            directory with only config.json gives a random tower) or a BERT config JSON.
            Hub names are refused: nothing is downloaded.
        img_model_config: the image tower's BERT/UNITER config JSON (weights come later from
            a UNITER or LightningDOT checkpoint, see `model/checkpoint.py`).
        project_dim: `encode_proj` output size; 0 = none.
        dropout: overrides both dropout rates of both towers when not None.
        cls_concat: `add` | `multiply` | `none` (pre-training only).
        fix_txt_encoder: freeze the text tower.
        fix_img_encoder: freeze the image tower.
        attn_implementation: `sdpa` or `eager`.
        execution: `packed` or `padded` (see `BiEncoderConfig.execution`).

    Raises:
        FileNotFoundError: a config path does not exist (hub names included).
    """
    config = BiEncoderConfig(
        txt_config=read_bert_config(txt_model_config, "txt_model_config"),
        img_config=read_bert_config(img_model_config, "img_model_config"),
        project_dim=project_dim,
        dropout=dropout,
        cls_concat=cls_concat,
        fix_txt_encoder=fix_txt_encoder,
        fix_img_encoder=fix_img_encoder,
        attn_implementation=attn_implementation,
        execution=execution,
    )
    model = BiEncoder(config)
    weights = hf_weights_file(txt_model_config)
    if weights is not None:
        load_text_tower_state(model.txt_model, read_weights(weights), str(weights))
        logger.info("text tower weights loaded from %s", weights)
    return model
