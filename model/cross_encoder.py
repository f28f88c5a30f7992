"""UNITER cross-encoder for re-ranking (SPEC 4, 8).

Attribute names reproduce UNITER's `UniterForImageTextRetrieval` keys: `uniter.*`,
`itm_output` (Linear(H, 2)) and `rank_output` (Linear(H, 1)).

The retrieval score is `itm_output.weight[1] . tanh(pooler.dense(h[:, 0])) + itm_output.bias[1]`:
the original re-ties `rank_output` to row 1 of `itm_output` at load and inference, and while
fine-tuning the two share storage, so row 1 of `itm_output` is the one true parameter. We
score with that row directly and keep `rank_output` as a frozen mirror (re-tied by
`tie_rank_output`) only so that state dicts keep the original layout.

`CrossEncoderConfig.execution` (`packed` by default, or `padded`; `model/packed.py`)
selects how `score` runs UNITER: packed drops the caption padding between text and regions
and runs the last layer for the [CLS] row alone (the score reads nothing else).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.formats import CROSS_ENCODER_FORMAT
from model.losses import hinge_ranking_loss, softmax_ranking_loss
from model.packed import DEFAULT_EXECUTION, check_execution, packable
from model.retrieval import JOINT_STATES
from model.towers import (
    UniterModel,
    build_bert_config,
    config_from_dict,
    read_bert_config,
)
from utils.region_features import FEAT_DIM

RANK_LOSSES = ("hinge", "softmax")


@dataclass
class CrossEncoderConfig:
    """Everything needed to rebuild a `UniterCrossEncoder` without any external file.

    Attributes:
        bert_config: UNITER/BERT config (e.g. reference_configs/uniter/uniter-base.json).
        dropout: when not None, overrides both dropout rates.
        img_dim: region feature size.
        rank_loss: `hinge` (UNITER's triplet loss on sigmoid scores) or `softmax`.
        margin: hinge margin.
        attn_implementation: `sdpa` or `eager`.
        execution: `packed` or `padded`: the same scores, held equal by tests/test_packed.py.
            Checkpoints written before this field existed load with the default.
    """

    bert_config: dict[str, Any]
    dropout: float | None = None
    img_dim: int = FEAT_DIM
    rank_loss: str = "hinge"
    margin: float = 0.2
    attn_implementation: str = "sdpa"
    execution: str = DEFAULT_EXECUTION

    def __post_init__(self) -> None:
        check_execution(self.execution)
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {RANK_LOSSES}, got {self.rank_loss!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CrossEncoderConfig:
        """Inverse of `to_dict`; unknown keys raise."""
        return config_from_dict(cls, data)


class UniterCrossEncoder(nn.Module):
    """Scores (caption, image) pairs jointly: `[CLS] ids [SEP]` + regions through UNITER."""

    checkpoint_format = CROSS_ENCODER_FORMAT
    # UNITER's pre-training objectives run on its joint states (`model/retrieval.py`).
    capabilities = frozenset({JOINT_STATES})

    def __init__(self, config: CrossEncoderConfig) -> None:
        super().__init__()
        self.config = config
        bert_cfg = build_bert_config(config.bert_config, config.dropout, config.attn_implementation)
        self.uniter = UniterModel(bert_cfg, config.img_dim)
        self.itm_output = nn.Linear(bert_cfg.hidden_size, 2)
        self.rank_output = nn.Linear(bert_cfg.hidden_size, 1)
        std = bert_cfg.initializer_range
        for head in (self.itm_output, self.rank_output):
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        self.rank_output.requires_grad_(False)
        self.tie_rank_output()

    @property
    def execution(self) -> str:
        """`packed` or `padded`: how `score` runs UNITER (see `CrossEncoderConfig.execution`)."""
        return self.config.execution

    @execution.setter
    def execution(self, execution: str) -> None:
        self.config.execution = check_execution(execution)

    def checkpoint_config(self) -> dict[str, Any]:
        """The model config stored in our checkpoints."""
        return self.config.to_dict()

    def provides(self, capability: str) -> bool:
        """Whether the model implements the optional interface `capability`."""
        return capability in self.capabilities

    # ------------------------------------------------------------ joint states (JOINT_STATES)

    def joint_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L + N, H) last-layer states of `[CLS] ids [SEP]` (positions 0..L-1, padded)
        followed by the N regions; `img_masked` regions get the mask embedding (SMRM)."""
        return self.uniter(input_ids, attention_mask, img_feat, img_pos, img_mask, img_masked)

    def itm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 2) ITM logits (no match, match) of `joint_hidden` states; column 1 is `score`'s."""
        return self.itm_output(self.uniter.pooler(hidden))

    def head_configs(self) -> tuple[Any, Any]:
        """(text, image) BERT configs the pre-training heads are sized from: UNITER's, twice."""
        config = build_bert_config(self.config.bert_config)
        return config, config

    @property
    def tied_word_embeddings(self) -> nn.Parameter:
        """The word embeddings the MLM decoder shares."""
        return self.uniter.embeddings.word_embeddings.weight

    @property
    def tied_region_projection(self) -> nn.Parameter:
        """`img_linear.weight`, which MRFR regresses through."""
        return self.uniter.img_embeddings.img_linear.weight

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights stored in our checkpoints, `rank_output` re-tied first."""
        self.tie_rank_output()
        return self.state_dict()

    @torch.no_grad()
    def tie_rank_output(self) -> None:
        """Copy row 1 of `itm_output` into `rank_output` (call after changing `itm_output`)."""
        self.rank_output.weight.copy_(self.itm_output.weight[1:])
        self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) matching scores of B (caption, image) pairs.

        Args:
            input_ids: (B, L) `[CLS] ids [SEP]`, right-padded.
            attention_mask: (B, L) 1 for real tokens.
            img_feat: (B, N, img_dim) region features.
            img_pos: (B, N, 7) box features.
            img_mask: (B, N) 1 for real regions.
        """
        if self.config.execution == "packed" and packable(attention_mask):
            cls = self.uniter.cls_packed(input_ids, attention_mask, img_feat, img_pos, img_mask)
            pooled = self.uniter.pooler(cls.unsqueeze(1))
        else:
            hidden = self.uniter(input_ids, attention_mask, img_feat, img_pos, img_mask)
            pooled = self.uniter.pooler(hidden)
        return F.linear(pooled, self.itm_output.weight[1:], self.itm_output.bias[1:]).squeeze(-1)

    @torch.no_grad()
    def score_batched(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Score many pairs in chunks of `batch_size`, without gradient.

        A side given with one row is paired with every row of the other side (one query
        against its M candidates), without copying it M times up front.

        Returns:
            (B,) scores on the device of the inputs.
        """
        n_txt, n_img = input_ids.shape[0], img_feat.shape[0]
        total = max(n_txt, n_img)
        if n_txt not in (1, total) or n_img not in (1, total):
            raise ValueError(f"cannot pair {n_txt} captions with {n_img} images")
        scores = []
        for start in range(0, total, batch_size):
            chunk = slice(start, min(start + batch_size, total))
            scores.append(
                self.score(
                    _rows(input_ids, chunk),
                    _rows(attention_mask, chunk),
                    _rows(img_feat, chunk),
                    _rows(img_pos, chunk),
                    _rows(img_mask, chunk),
                )
            )
        return torch.cat(scores) if scores else img_feat.new_zeros(0)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Training step on groups of `batch["group_size"]` rows, the positive pair first.

        Args:
            batch: `txt` and `img` inputs with one row per pair (docs/architecture.md) and
                `group_size` (int, 1 positive + N negatives per group).

        Returns:
            `loss` (the configured ranking loss) and `scores` (B,).
        """
        txt, img = batch["txt"], batch["img"]
        scores = self.score(
            txt["input_ids"], txt["attention_mask"], img["img_feat"], img["img_pos"], img["img_mask"]
        )
        group_size = int(batch["group_size"])
        if self.config.rank_loss == "hinge":
            loss = hinge_ranking_loss(scores, group_size, self.config.margin)
        else:
            loss = softmax_ranking_loss(scores, group_size)
        return {"loss": loss, "scores": scores}


def _rows(x: torch.Tensor, chunk: slice) -> torch.Tensor:
    """Rows `chunk` of `x`, or its single row broadcast to the chunk's length."""
    if x.shape[0] == 1:
        return x.expand(chunk.stop - chunk.start, *x.shape[1:])
    return x[chunk]


def cross_encoder_from_config(config: CrossEncoderConfig) -> UniterCrossEncoder:
    """A randomly initialised cross-encoder of `config` (weights: model/checkpoint.py)."""
    return UniterCrossEncoder(config)


def build_cross_encoder(
    model_config: str,
    dropout: float | None = None,
    rank_loss: str = "hinge",
    margin: float = 0.2,
    attn_implementation: str = "sdpa",
    execution: str = DEFAULT_EXECUTION,
) -> UniterCrossEncoder:
    """A randomly initialised cross-encoder from a UNITER config JSON (weights: checkpoint.py).

    Args:
        model_config: UNITER/BERT config JSON (or a directory holding config.json).
        dropout: overrides both dropout rates when not None.
        rank_loss: `hinge` or `softmax`.
        margin: hinge margin.
        attn_implementation: `sdpa` or `eager`.
        execution: `packed` or `padded` (see `CrossEncoderConfig.execution`).
    """
    config = CrossEncoderConfig(
        bert_config=read_bert_config(model_config, "model_config"),
        dropout=dropout,
        rank_loss=rank_loss,
        margin=margin,
        attn_implementation=attn_implementation,
        execution=execution,
    )
    return cross_encoder_from_config(config)
