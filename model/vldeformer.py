"""VLDeformer (arXiv 2110.11338): one UNITER body decomposed into a text and an image encoder.

A single `UniterModel` (text embeddings, region embeddings, BERT encoder; the module the
cross-encoder of `model/cross_encoder.py` uses) runs twice per pair:

* text pass: `[CLS] ids [SEP]` through the text embeddings (token type 0), no regions;
* image pass: the regions through the region embeddings (token type 1), no caption, with a
  leading [CLS] slot (type 0, position 0, as our image tower) when `image_cls` is set.

The embedding of a pass pools its last layer (`cls`: position 0; `mean`: mean over the real
positions only, so padding never changes it), optionally applies tanh (the original code
does) and an `encode_proj` projection, and with `score: cosine` is L2-normalised, so the
indexes' dot product is the cosine. `temperature` divides the contrastive loss logits only
(the contract's `loss_temperature`); retrieval ranks are unchanged by it.

The original code (github idealwhite/VLDeformer) averages over every output position of the
padded batch, padding included; `pooling: mean` here masks the padding, so an embedding does
not depend on what else is in its batch.

The model implements the retrieval contract (`model/retrieval.py`: one flat level), so
training, evaluation, mining, inference and re-ranking take it unchanged. Its state dict is UNITER's
(`uniter.*`, plus `encode_proj.*` when projected), so a UNITER checkpoint or our
cross-encoder checkpoint initialises it (`load_vldeformer_init`): the decomposition.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.packed import DEFAULT_EXECUTION, check_execution, encoder_packed, packable
from model.retrieval import RetrievalModel
from model.state_dicts import (
    CheckpointError,
    load_strict,
    rename_gamma_beta,
    select_prefix,
)
from model.towers import (
    CLS_TOKEN_ID,
    UniterModel,
    attention_bias,
    build_bert_config,
    config_from_dict,
    init_bert_weights,
    make_encode_proj,
)
from utils.region_features import FEAT_DIM

logger = logging.getLogger(__name__)

MODEL_TYPE = "vldeformer"
POOLINGS = ("cls", "mean")
SCORES = ("dot", "cosine")
# Keys of a UNITER / cross-encoder file that the decomposed model has no use for.
ITM_HEAD_PREFIXES = ("itm_output.", "rank_output.")
UNITER_PRETRAIN_HEAD_PREFIXES = ("cls.", "feat_regress.", "region_classifier.")


@dataclass
class VLDeformerConfig:
    """Everything needed to rebuild a `VLDeformer` without any external file.

    Attributes:
        bert_config: the UNITER/BERT config (e.g. uniter-base.json), inline.
        model_type: always `vldeformer`; marks the family in stored checkpoints.
        pooling: `mean` (masked mean over real positions) or `cls` (position 0).
        image_cls: put a [CLS] slot in front of the regions in the image pass.
        pool_tanh: apply tanh to the pooled state (the original code does).
        project_dim: size of an `encode_proj` head on the pooled state; 0 = none.
        score: `cosine` (L2-normalised embeddings) or `dot`.
        temperature: the contrastive loss divides its logits by this.
        dropout: when not None, overrides both dropout rates.
        img_dim: region feature size.
        attn_implementation: `sdpa` or `eager`.
        execution: `packed` (real tokens only) or `padded`: the same function.
    """

    bert_config: dict[str, Any]
    model_type: str = MODEL_TYPE
    pooling: str = "mean"
    image_cls: bool = False
    pool_tanh: bool = True
    project_dim: int = 0
    score: str = "cosine"
    temperature: float = 0.005
    dropout: float | None = None
    img_dim: int = FEAT_DIM
    attn_implementation: str = "sdpa"
    execution: str = DEFAULT_EXECUTION

    def __post_init__(self) -> None:
        check_execution(self.execution)
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.project_dim < 0:
            raise ValueError(f"project_dim must be >= 0, got {self.project_dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VLDeformerConfig:
        """Inverse of `to_dict`; unknown keys raise."""
        return config_from_dict(cls, data)


def is_vldeformer_config(model_config: Mapping[str, Any]) -> bool:
    """Whether a stored model config (checkpoint `model_config`) describes a VLDeformer."""
    return model_config.get("model_type") == MODEL_TYPE


class VLDeformer(RetrievalModel):
    """One UNITER body (`uniter`) encoding text and images separately (see the module doc)."""

    family = MODEL_TYPE

    def __init__(self, config: VLDeformerConfig) -> None:
        super().__init__()
        self.config = config
        bert_cfg = build_bert_config(config.bert_config, config.dropout, config.attn_implementation)
        self.uniter = UniterModel(bert_cfg, config.img_dim)
        self.encode_proj = make_encode_proj(bert_cfg.hidden_size, config.project_dim) if config.project_dim else None
        if self.encode_proj is not None:
            init_bert_weights(self.encode_proj, bert_cfg.initializer_range)

    @property
    def out_dim(self) -> int:
        """Size of the embeddings of both passes."""
        if self.encode_proj is not None:
            return self.encode_proj[-1].out_features
        return self.uniter.config.hidden_size

    @property
    def level_dims(self) -> list[int]:
        """One flat embedding level."""
        return [self.out_dim]

    @property
    def loss_temperature(self) -> float:
        """What the contrastive loss divides its logits by."""
        return self.config.temperature

    def _set_execution(self, execution: str) -> None:
        self.config.execution = check_execution(execution)

    # ---------------------------------------------------------------- the two passes

    def text_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, H) text-pass embeddings (token type 0, positions 0..L-1) and the (B, L) mask."""
        return self.uniter.embeddings(input_ids=input_ids), attention_mask

    def image_inputs(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, [1 +] N, H) image-pass embeddings (regions, type 1; [CLS] slot first with
        `image_cls`) and their 0/1 mask."""
        if self.config.image_cls:
            batch = img_feat.shape[0]
            cls_ids = torch.full((batch, 1), CLS_TOKEN_ID, dtype=torch.long, device=img_feat.device)
            cls_mask = torch.ones((batch, 1), dtype=img_mask.dtype, device=img_mask.device)
            return self.uniter.embed(cls_ids, cls_mask, img_feat, img_pos, img_mask, img_masked)
        type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        type_emb = self.uniter.embeddings.token_type_embeddings(type_ids)
        return self.uniter.img_embeddings(img_feat, img_pos, type_emb, img_masked), img_mask

    def hidden(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) last-layer states of the shared encoder over one pass (padded)."""
        bias = attention_bias(self.uniter.config, embeddings, mask)
        return self.uniter.encoder(embeddings, attention_mask=bias).last_hidden_state

    def pool(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, H) pooled last-layer state of one pass, by `execution` and `pooling`."""
        cls_only = self.config.pooling == "cls"
        if self.config.execution == "packed" and packable(mask):
            states, layout = encoder_packed(self.uniter.encoder, embeddings, mask, cls_only_last=cls_only)
            if cls_only:
                return states
            sums = states.new_zeros((layout.batch_size, states.shape[-1]))
            sums = sums.index_add(0, layout.batch_index, states)
            counts = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).to(states.dtype)
            return sums / counts.unsqueeze(1)
        states = self.hidden(embeddings, mask)
        if cls_only:
            return states[:, 0]
        return masked_mean(states, mask)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled state -> embedding: tanh, projection, L2 normalisation, as configured."""
        if self.config.pool_tanh:
            pooled = torch.tanh(pooled)
        if self.encode_proj is not None:
            pooled = self.encode_proj(pooled)
        if self.config.score == "cosine":
            pooled = F.normalize(pooled.float(), dim=-1).to(pooled.dtype)
        return pooled

    def encode_text_levels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """[(B, D)] text embeddings of `[CLS] ids [SEP]` rows (right-padded): one level."""
        return [self.embed(self.pool(*self.text_inputs(input_ids, attention_mask)))]

    def encode_image_levels(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """[(B, D)] image embeddings of padded regions: one level."""
        return [self.embed(self.pool(*self.image_inputs(img_feat, img_pos, img_mask, img_masked)))]


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H) mean of (B, L, H) `states` over the positions where the (B, L) `mask` is 1."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def load_vldeformer_init(model: VLDeformer, state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Fill `model.uniter` from a UNITER body: the decomposition of a cross-encoder.

    Args:
        model: the VLDeformer to initialise.
        state: an original UNITER state dict (`uniter.*`, LayerNorm `gamma`/`beta` allowed,
            ITM / pre-training heads allowed) or the `model` of our cross-encoder checkpoint.
        source: the file, for messages.

    Returns:
        `{"used": [...], "unused": [...]}`: the file's keys that filled the model and those
        dropped (the ITM head, pre-training heads). `encode_proj` keeps its initialisation.

    Raises:
        CheckpointError: no `uniter.*` keys, other stray keys, or a key / shape mismatch.
    """
    sd = rename_gamma_beta(state)
    if not any(k.startswith("uniter.") for k in sd):
        raise CheckpointError(f"{source}: no 'uniter.*' keys; not a UNITER or cross-encoder checkpoint")
    unused = sorted(k for k in sd if not k.startswith("uniter."))
    strays = [k for k in unused if not k.startswith(ITM_HEAD_PREFIXES + UNITER_PRETRAIN_HEAD_PREFIXES)]
    if strays:
        raise CheckpointError(f"{source}: unexpected keys besides uniter.* and the UNITER heads: {strays[:25]}")
    body = select_prefix(sd, "uniter.")
    load_strict(model.uniter, body, source, "VLDeformer (UNITER body)")
    used = sorted("uniter." + k for k in body)
    logger.info("%s: %d UNITER keys used; %d unused (%s)", source, len(used), len(unused),
                ", ".join(sorted({k.split(".")[0] for k in unused})) or "none")
    return {"used": used, "unused": unused}
