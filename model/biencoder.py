"""The LightningDOT bi-encoder: a BERT text tower and a UNITER image tower (SPEC 3).

Score = plain dot product of the two embeddings; no normalisation, no temperature.

`BiEncoderConfig.execution` (`packed` by default, or `padded`; `model/packed.py`) selects
how both towers run their encoders; the pre-training model follows its bi-encoder's.

`BiEncoderConfig.hierarchy` (`utils/hierarchy.py`, off by default) trains the embedding at
several sizes: `encode_*_levels` return one embedding per level (a flat model has one), and
`encode_text` / `encode_image` return the full embedding (the last level).

The model implements the retrieval contract (`model/retrieval.py`) and its `TOKEN_STATES`
capability (the towers' per-token states, for the VMLM and SMRM pre-training tasks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.packed import DEFAULT_EXECUTION, VarlenLayout, check_execution
from model.retrieval import TOKEN_STATES, RetrievalModel, TokenStates
from model.state_dicts import (
    CheckpointError,
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
    init_bert_weights,
    read_bert_config,
)
from utils.hierarchy import Hierarchy
from utils.region_features import FEAT_DIM

logger = logging.getLogger(__name__)

CLS_CONCAT_MODES = ("add", "multiply", "none")
# Heads found in HF `BertFor*` weight files; a text tower has no use for them.
HF_HEAD_PREFIXES = ("cls.",)
# Attribute of each tower holding the level heads of `heads` mode: keys
# `txt_model.level_proj.<level>.weight`, the last level being `encode_proj` itself.
LEVEL_HEADS = "level_proj"
# The learned temperature of a `learn_temperature` hierarchy (log space).
LEVEL_TEMPERATURE = "level_log_temperature"


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
        hierarchy: the embedding hierarchy, or None: one flat embedding. Checkpoints store
            `Hierarchy.to_dict()` (weights filled in); those written before this field
            existed are flat.
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
    hierarchy: Hierarchy | None = None

    def __post_init__(self) -> None:
        check_execution(self.execution)
        if self.hierarchy is not None and not isinstance(self.hierarchy, Hierarchy):
            # The stored (checkpoint) form.
            self.hierarchy = Hierarchy.from_dict(self.hierarchy)
        if self.hierarchy is not None:
            self.hierarchy.check_full_dim(self.project_dim or self.txt_config.get("hidden_size", 768))
        if self.cls_concat == "":
            # The original configs spell "no combination" as an empty string.
            self.cls_concat = "none"
        if self.cls_concat not in CLS_CONCAT_MODES:
            raise ValueError(f"cls_concat must be one of {CLS_CONCAT_MODES}, got {self.cls_concat!r}")
        if self.project_dim < 0:
            raise ValueError(f"project_dim must be >= 0, got {self.project_dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what checkpoints store)."""
        data = dataclasses.asdict(self)
        data["hierarchy"] = self.hierarchy.to_dict() if self.hierarchy is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BiEncoderConfig:
        """Inverse of `to_dict`; unknown keys raise."""
        return config_from_dict(cls, data)


class BiEncoder(RetrievalModel, TokenStates):
    """Text tower `txt_model` + image tower `img_model` (original state-dict layout).

    `forward(batch)` returns the levels of whichever of `batch["txt"]` / `batch["img"]` is
    present (the contract's); `encode_text` / `encode_image` compute the full embedding only.
    """

    family = "lightningdot"
    capabilities = frozenset({TOKEN_STATES})

    def __init__(self, config: BiEncoderConfig) -> None:
        super().__init__()
        self.config = config
        txt_cfg = build_bert_config(config.txt_config, config.dropout, config.attn_implementation)
        img_cfg = build_bert_config(config.img_config, config.dropout, config.attn_implementation)
        self.txt_model = TextTower(txt_cfg, config.project_dim, config.execution)
        self.img_model = ImageTower(img_cfg, config.project_dim, config.img_dim, config.execution)
        # The config holds the checked spec (BiEncoderConfig.__post_init__).
        self.hierarchy = config.hierarchy
        if self.hierarchy is not None and self.hierarchy.mode == "heads":
            # Built after the towers, so the towers' initial weights are those of a flat model
            # of the same seed. The heads live in the towers: freezing a tower freezes them too.
            for tower, cfg in ((self.txt_model, txt_cfg), (self.img_model, img_cfg)):
                heads = nn.ModuleList(nn.Linear(cfg.hidden_size, d) for d in self.hierarchy.dims[:-1])
                init_bert_weights(heads, cfg.initializer_range)
                tower.add_module(LEVEL_HEADS, heads)
        if self.hierarchy is not None and self.hierarchy.learn_temperature:
            # Learned in log space, so it stays positive.
            self.register_parameter(LEVEL_TEMPERATURE, nn.Parameter(torch.tensor(math.log(self.hierarchy.temperature))))
        self._txt_fixed = False
        self._img_fixed = False
        self.fix_txt_encoder(config.fix_txt_encoder)
        self.fix_img_encoder(config.fix_img_encoder)

    @property
    def level_dims(self) -> list[int]:
        """Embedding size of every level, the full embedding last (flat model: one level)."""
        if self.hierarchy is None:
            return [self.txt_model.out_dim]
        return list(self.hierarchy.dims)

    @property
    def level_weights(self) -> list[float]:
        """Contrastive-loss weight of every level (flat model: [1.0])."""
        if self.hierarchy is None:
            return [1.0]
        return list(self.hierarchy.weights)

    @property
    def loss_temperature(self) -> float | torch.Tensor:
        """1.0 (plain dot products, SPEC 3), or the hierarchy's temperature (a 0-d tensor when learned)."""
        if self.hierarchy is None:
            return 1.0
        if self.hierarchy.learn_temperature:
            return self.level_log_temperature.exp()
        return self.hierarchy.temperature

    def _finish(self, embedding: torch.Tensor) -> torch.Tensor:
        """A level's embedding as scored: L2-normalised when the hierarchy says so."""
        if self.hierarchy is not None and self.hierarchy.normalize:
            return F.normalize(embedding.float(), dim=-1).to(embedding.dtype)
        return embedding

    def _set_execution(self, execution: str) -> None:
        # The config is what checkpoints store; the towers dispatch on their own copy.
        self.config.execution = check_execution(execution)
        self.txt_model.execution = execution
        self.img_model.execution = execution

    # ------------------------------------------------------------ token states (TOKEN_STATES)

    @property
    def cls_concat(self) -> str:
        """How pre-training combines one tower's [CLS] with the other's states."""
        return self.config.cls_concat

    def head_configs(self) -> tuple[Any, Any]:
        """(text, image) tower BERT configs, without the run's dropout override."""
        return build_bert_config(self.config.txt_config), build_bert_config(self.config.img_config)

    @property
    def tied_word_embeddings(self) -> nn.Parameter:
        """The image tower's word embeddings (the VMLM decoder of the original is tied to them)."""
        return self.img_model.bert.embeddings.word_embeddings.weight

    @property
    def tied_region_projection(self) -> nn.Parameter:
        """The image tower's `img_linear.weight` (MRFR regresses through it)."""
        return self.img_model.bert.img_embeddings.img_linear.weight

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
        """(B, D) text embeddings: projected last-layer [CLS] hidden state (the full level)."""
        with self._grad_context(self._txt_fixed):
            return self._finish(self.txt_model(input_ids, attention_mask))

    def encode_image(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) image embeddings: projected last-layer hidden state at position 0 (the full level)."""
        with self._grad_context(self._img_fixed):
            return self._finish(self.img_model(img_feat, img_pos, img_mask, img_masked))

    def _levels(self, tower: nn.Module, cls_hidden: torch.Tensor) -> list[torch.Tensor]:
        """One embedding per level from a tower's (B, H) [CLS] state, the full one last."""
        full = tower.project(cls_hidden)
        if self.hierarchy is None:
            return [full]
        if self.hierarchy.mode == "prefix":
            levels = [full[:, :d] for d in self.hierarchy.dims[:-1]] + [full]
        else:
            levels = [head(cls_hidden) for head in getattr(tower, LEVEL_HEADS)] + [full]
        return [self._finish(level) for level in levels]

    def encode_text_levels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, dims[i]) text embeddings of every level; the last equals `encode_text`."""
        with self._grad_context(self._txt_fixed):
            return self._levels(self.txt_model, self.txt_model.cls_hidden(input_ids, attention_mask))

    def encode_image_levels(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """(B, dims[i]) image embeddings of every level; the last equals `encode_image`."""
        with self._grad_context(self._img_fixed):
            cls_hidden = self.img_model.cls_hidden(img_feat, img_pos, img_mask, img_masked)
            return self._levels(self.img_model, cls_hidden)


def _is_level_head(key: str) -> bool:
    return f".{LEVEL_HEADS}." in f".{key}"


def level_head_keys(keys: Iterable[str]) -> list[str]:
    """The keys of `heads`-mode level heads among `keys` (any prefix, e.g. `bert.`)."""
    return sorted(k for k in keys if _is_level_head(k))


def hierarchy_keys(keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that only a hierarchy has: level heads and a learned temperature."""
    return sorted(k for k in keys if _is_level_head(k) or k.split(".")[-1] == LEVEL_TEMPERATURE)


def check_level_heads(
    model: nn.Module, state_dict: Mapping[str, Any], source: str | os.PathLike[str], what: str
) -> None:
    """Refuse weights whose embedding hierarchy does not fit `model`, naming the level heads.

    Only `heads` mode has weights of its own: a flat or `prefix` file into a `heads` model
    lacks them, a `heads` file into a flat or `prefix` model has heads to spare. (Flat and
    `prefix` share every key, so a flat model fine-tunes as `prefix` and the other way.)

    Raises:
        CheckpointError: level-head keys are missing or unexpected.
    """
    expected = level_head_keys(model.state_dict())
    provided = level_head_keys(state_dict)
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    if not missing and not unexpected:
        return
    if missing and not unexpected:
        detail = (
            f"the model has hierarchy level heads (model.hierarchy mode heads) that the file "
            f"lacks: missing {', '.join(missing)}; load a checkpoint trained with the same "
            f"model.hierarchy, or use mode: prefix (no extra weights)"
        )
    elif unexpected and not missing:
        detail = (
            f"the file has hierarchy level heads (it was trained with model.hierarchy mode "
            f"heads) that the model lacks: unexpected {', '.join(unexpected)}; set the same "
            f"model.hierarchy, or build the model from the checkpoint"
        )
    else:
        detail = (
            f"its hierarchy level heads differ from the model's (model.hierarchy): missing "
            f"{', '.join(missing)}; unexpected {', '.join(unexpected)}"
        )
    raise CheckpointError(f"{source}: the weights do not fit the {what}: {detail}")


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
    hierarchy: Hierarchy | None = None,
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
        hierarchy: the embedding hierarchy (`utils/hierarchy.py`); None = flat.

    Raises:
        FileNotFoundError: a config path does not exist (hub names included).
        HierarchyError: the hierarchy spec is invalid for this model.
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
        hierarchy=hierarchy,
    )
    model = BiEncoder(config)
    weights = hf_weights_file(txt_model_config)
    if weights is not None:
        load_text_tower_state(model.txt_model, read_weights(weights), str(weights))
        logger.info("text tower weights loaded from %s", weights)
    return model
