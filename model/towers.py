"""The two towers of LightningDOT (SPEC 3) and the UNITER model they share with the re-ranker.

* `TextTower`: a `transformers` BertModel; embedding = last-layer hidden state of [CLS].
* `UniterModel`: UNITER's text + region embeddings in front of a `transformers` BertEncoder.
  The image tower runs it on `[CLS] + boxes`; the cross-encoder (`model/cross_encoder.py`) on
  `[CLS] ids [SEP] + boxes`. One implementation of the region embeddings serves both.
* `ImageTower`: `UniterModel` + the position-0 hidden state.
* `encode_proj`: the optional projection head of either tower.

Both towers take `execution` (`padded` | `packed`, `model/packed.py`): `packed` runs the
encoder on the real tokens only, with a [CLS]-only last layer; same function, less work.

Module attribute names reproduce the original state-dict keys (SPEC 4), so original
checkpoints load without renaming.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertPooler,
)

from model.packed import (
    DEFAULT_EXECUTION,
    VarlenLayout,
    check_execution,
    encoder_cls_packed,
    encoder_packed,
    packable,
)
from utils.errors import DataError, MissingPathError
from utils.region_features import BOX_DIM, FEAT_DIM

try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers < 4.56 builds masks inside each model
    create_bidirectional_mask = None

# The image tower's [CLS] slot always embeds this token id (BERT's [CLS]).
CLS_TOKEN_ID = 101
# Weight files of a HF model directory, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys that describe a file rather than the architecture.
_CONFIG_NOISE_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")


def read_bert_config(path: str | os.PathLike[str], role: str = "model config") -> dict[str, Any]:
    """Read a BERT config as a plain dict from a JSON file or a local HF model directory.

    Args:
        path: a `config.json`-style file, or a directory holding `config.json`.
        role: what the path configures, for error messages (e.g. "txt_model_config").

    Returns:
        The JSON content, without file-specific keys such as `transformers_version`.

    Raises:
        FileNotFoundError: the path does not exist (a hub name such as `bert-base-cased`
            included: nothing is downloaded) or a directory lacks `config.json`.
    """
    config_file = _config_file(path, role)
    with open(config_file, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise TypeError(f"{role}: {config_file} must hold a JSON object")
    return {k: v for k, v in data.items() if k not in _CONFIG_NOISE_KEYS}


def hf_weights_file(path: str | os.PathLike[str]) -> Path | None:
    """The weight file of a local HF model directory, or None (config-only dir, or a file)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    sharded = sorted(directory.glob("*.index.json"))
    if sharded:
        raise DataError(
            f"{directory} holds a sharded checkpoint ({sharded[0].name}); save the model as a "
            f"single {' or '.join(HF_WEIGHT_FILES)} file"
        )
    return None


def _config_file(path: str | os.PathLike[str], role: str) -> Path:
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MissingPathError(f"{role}: directory {p} has no config.json")
        return p / "config.json"
    if p.is_file():
        return p
    text = str(path)
    looks_like_hub_name = not text.endswith(".json") and not text.startswith((".", "/", "~"))
    if looks_like_hub_name:
        raise MissingPathError(
            f"{role}: {text!r} is not a local path. Hugging Face hub names are not "
            f"downloaded (this code runs offline): give a local model directory holding "
            f"config.json (and optionally model.safetensors / pytorch_model.bin), or a BERT "
            f"config JSON file such as reference_configs/lightningdot/bert_base.json"
        )
    raise MissingPathError(
        f"{role}: {text!r} does not exist; give a local model directory or a BERT config JSON"
    )


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build the model-config dataclass `cls` from its `to_dict` form; unknown keys raise."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DataError(f"unknown {cls.__name__} keys: {unknown}")
    return cls(**dict(data))


def build_bert_config(
    config: dict[str, Any], dropout: float | None = None, attn_implementation: str = "sdpa"
) -> BertConfig:
    """A `BertConfig` from a plain dict, with an optional dropout override.

    Args:
        config: BERT hyper-parameters (HF `config.json` keys).
        dropout: when not None, replaces both `hidden_dropout_prob` and
            `attention_probs_dropout_prob`.
        attn_implementation: `sdpa` (default) or `eager`.
    """
    cfg = BertConfig(**config)
    if dropout is not None:
        cfg.hidden_dropout_prob = dropout
        cfg.attention_probs_dropout_prob = dropout
    # transformers 5 refuses attn_implementation as a model kwarg; the config carries it.
    cfg._attn_implementation = attn_implementation
    return cfg


@torch.no_grad()
def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation (normal(0, std) weights, zero biases, unit LayerNorm) in place.

    Applied to everything we build outside `transformers` (UNITER parts, projections), as the
    original `init_weights` does for its whole model.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(mean=0.0, std=std)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.normal_(mean=0.0, std=std)
            if sub.padding_idx is not None:
                sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            sub.weight.fill_(1.0)
            sub.bias.zero_()


def make_encode_proj(hidden_size: int, project_dim: int) -> nn.Sequential:
    """`Linear(H, 2H) -> GELU -> LayerNorm(2H) -> Linear(2H, project_dim)` (keys 0, 2, 3)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size * 2),
        nn.GELU(),
        nn.LayerNorm(hidden_size * 2, eps=1e-12),
        nn.Linear(hidden_size * 2, project_dim),
    )


def attention_bias(config: BertConfig, embeddings: torch.Tensor, mask: torch.Tensor) -> Any:
    """The attention mask in the form the configured attention implementation expects.

    `BertEncoder` passes the mask straight to the attention function: transformers 5 wants a
    4-D boolean mask (SDPA), a 4-D additive float mask (eager) or None (no padding), which
    `create_bidirectional_mask` builds from the 2-D 0/1 mask as `BertModel` itself does.
    Older versions take the 4-D additive mask for both implementations.
    """
    if create_bidirectional_mask is not None:
        return create_bidirectional_mask(
            config=config, inputs_embeds=embeddings, attention_mask=mask
        )
    additive = (1.0 - mask[:, None, None, :].to(embeddings.dtype)) * torch.finfo(embeddings.dtype).min
    return additive


class UniterImageEmbeddings(nn.Module):
    """Region embeddings: `LN(LN_img(img_linear(feat)) + LN_pos(pos_linear(box7)) + type)`.

    SMRM-masked regions (features already zeroed by the collator) get `mask_embedding[1]`
    added before `img_linear`; row 0 of `mask_embedding` is never used, so it is always zero
    in effect, whatever a checkpoint stores there.
    """

    def __init__(self, config: BertConfig, img_dim: int = FEAT_DIM) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.img_linear = nn.Linear(img_dim, hidden)
        self.img_layer_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pos_linear = nn.Linear(BOX_DIM, hidden)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        type_embeddings: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed regions.

        Args:
            img_feat: (B, N, img_dim) region features.
            img_pos: (B, N, 7) box features.
            type_embeddings: (B, N, H) or broadcastable token-type embedding (type 1).
            img_masked: optional (B, N) bool, True for SMRM-masked regions.

        Returns:
            (B, N, H) region embeddings.
        """
        # Features may arrive as float16 from the database; compute in the weights' dtype.
        dtype = self.img_linear.weight.dtype
        img_feat, img_pos = img_feat.to(dtype), img_pos.to(dtype)
        if img_masked is not None:
            mask_row = self.mask_embedding.weight[1]
            img_feat = img_feat + img_masked.unsqueeze(-1).to(dtype) * mask_row
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos))
        embeddings = self.LayerNorm(transformed_im + transformed_pos + type_embeddings)
        return self.dropout(embeddings)


class UniterModel(nn.Module):
    """UNITER: text embeddings, region embeddings, a BERT encoder and an (unused) pooler.

    Input sequence = text tokens (positions 0..L-1, token type 0) followed by regions (token
    type 1), one attention mask over both. Text padding may sit between the text and the
    regions: masked positions contribute nothing, so this equals UNITER's compacted input.
    """

    def __init__(self, config: BertConfig, img_dim: int = FEAT_DIM) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        init_bert_weights(self, config.initializer_range)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's input: (B, L + N, H) embeddings (text, then regions) and their
        (B, L + N) 0/1 mask. Arguments as `forward`."""
        txt_emb = self.embeddings(input_ids=input_ids)
        img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        img_type = self.embeddings.token_type_embeddings(img_type_ids)
        img_emb = self.img_embeddings(img_feat, img_pos, img_type, img_masked)
        hidden = torch.cat([txt_emb, img_emb.to(txt_emb.dtype)], dim=1)
        mask = torch.cat([attention_mask.to(img_mask.dtype), img_mask], dim=1)
        return hidden, mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode text + regions (padded execution: every position of the batch).

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1 for real tokens.
            img_feat: (B, N, img_dim) region features.
            img_pos: (B, N, 7) box features.
            img_mask: (B, N) 1 for real regions.
            img_masked: optional (B, N) bool, True for SMRM-masked regions.

        Returns:
            (B, L + N, H) last-layer hidden states.
        """
        hidden, mask = self.embed(input_ids, attention_mask, img_feat, img_pos, img_mask, img_masked)
        bias = attention_bias(self.config, hidden, mask)
        return self.encoder(hidden, attention_mask=bias).last_hidden_state

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
        cls_only_last: bool = False,
    ) -> tuple[torch.Tensor, VarlenLayout]:
        """Encode the real tokens only (packed execution, `model/packed.py`).

        Position 0 of every row must be real. Arguments as `forward`.

        Returns:
            (T, H) last-layer states of the real tokens, row after row ((B, H) position-0
            states with `cls_only_last`), and their layout in the (B, L + N) batch.
        """
        hidden, mask = self.embed(input_ids, attention_mask, img_feat, img_pos, img_mask, img_masked)
        return encoder_packed(self.encoder, hidden, mask, cls_only_last)

    def cls_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H) last-layer state at position 0, packed with a [CLS]-only last layer.

        Same function as `forward(...)[:, 0]`; position 0 of every row must be real.
        """
        hidden, mask = self.embed(input_ids, attention_mask, img_feat, img_pos, img_mask, img_masked)
        return encoder_cls_packed(self.encoder, hidden, mask)


class _ProjectedTower(nn.Module):
    """A `bert` body whose position-0 hidden state, optionally through `encode_proj`, is the
    tower's embedding. Subclasses build `bert`, then call `_add_projection`.

    `execution` (`padded` | `packed`) selects how `forward` / `cls_hidden` run the encoder;
    both compute the same function. `hidden` always returns the padded (B, L, H) states.
    """

    bert: nn.Module

    def _set_execution(self, execution: str) -> None:
        self.execution = check_execution(execution)

    def _add_projection(self, config: BertConfig, project_dim: int) -> None:
        self.encode_proj = make_encode_proj(config.hidden_size, project_dim) if project_dim > 0 else None
        if self.encode_proj is not None:
            init_bert_weights(self.encode_proj, config.initializer_range)

    @property
    def out_dim(self) -> int:
        """Size of the embedding this tower returns."""
        if self.encode_proj is not None:
            return self.encode_proj[-1].out_features
        return self.bert.config.hidden_size

    def project(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """Apply `encode_proj` (identity when there is none)."""
        return self.encode_proj(cls_hidden) if self.encode_proj is not None else cls_hidden


class TextTower(_ProjectedTower):
    """BERT text encoder: `bert` (HF BertModel, pooler included) + optional `encode_proj`."""

    def __init__(self, config: BertConfig, project_dim: int = 0, execution: str = DEFAULT_EXECUTION) -> None:
        super().__init__()
        self.bert = BertModel(config)
        self._add_projection(config, project_dim)
        self._set_execution(execution)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) last-layer hidden states (token type 0, positions 0..L-1)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def hidden_packed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only_last: bool = False
    ) -> tuple[torch.Tensor, VarlenLayout]:
        """(T, H) last-layer states of the real tokens (packed; see `encoder_packed`) and
        their layout; position 0 of every row must be real."""
        embeddings = self.bert.embeddings(input_ids=input_ids)
        return encoder_packed(self.bert.encoder, embeddings, attention_mask, cls_only_last)

    def cls_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) unprojected last-layer [CLS] state, by the tower's `execution`."""
        if self.execution == "packed" and packable(attention_mask):
            hidden, _ = self.hidden_packed(input_ids, attention_mask, cls_only_last=True)
            return hidden
        return self.hidden(input_ids, attention_mask)[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, D) embedding: projected last-layer [CLS] hidden state (not the pooler)."""
        return self.project(self.cls_hidden(input_ids, attention_mask))


class ImageTower(_ProjectedTower):
    """UNITER image encoder: `bert` (UniterModel) + optional `encode_proj`."""

    def __init__(
        self,
        config: BertConfig,
        project_dim: int = 0,
        img_dim: int = FEAT_DIM,
        execution: str = DEFAULT_EXECUTION,
    ) -> None:
        super().__init__()
        self.bert = UniterModel(config, img_dim)
        self._add_projection(config, project_dim)
        self._set_execution(execution)

    @staticmethod
    def _cls_slot(img_feat: torch.Tensor, img_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1) [CLS] ids and (B, 1) mask of the text slot in front of the boxes."""
        batch = img_feat.shape[0]
        cls_ids = torch.full((batch, 1), CLS_TOKEN_ID, dtype=torch.long, device=img_feat.device)
        cls_mask = torch.ones((batch, 1), dtype=img_mask.dtype, device=img_mask.device)
        return cls_ids, cls_mask

    def hidden(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 1 + N, H) last-layer hidden states; position 0 is the [CLS] slot."""
        cls_ids, cls_mask = self._cls_slot(img_feat, img_mask)
        return self.bert(cls_ids, cls_mask, img_feat, img_pos, img_mask, img_masked)

    def hidden_packed(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
        cls_only_last: bool = False,
    ) -> tuple[torch.Tensor, VarlenLayout]:
        """(T, H) last-layer states of the [CLS] slot and the real boxes (packed) and their
        layout in the (B, 1 + N) sequence."""
        cls_ids, cls_mask = self._cls_slot(img_feat, img_mask)
        return self.bert.forward_packed(
            cls_ids, cls_mask, img_feat, img_pos, img_mask, img_masked, cls_only_last
        )

    def cls_hidden(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H) unprojected last-layer state at position 0, by the tower's `execution`."""
        if self.execution == "packed" and img_feat.shape[0] > 0:
            hidden, _ = self.hidden_packed(img_feat, img_pos, img_mask, img_masked, cls_only_last=True)
            return hidden
        return self.hidden(img_feat, img_pos, img_mask, img_masked)[:, 0]

    def forward(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) embedding: projected last-layer hidden state at position 0."""
        return self.project(self.cls_hidden(img_feat, img_pos, img_mask, img_masked))
