"""The retrieval-model contract: what every bi-encoder family provides, and nothing more.

Trainers, evaluation, hard-negative mining, inference, query, serving and re-ranking reach a
bi-encoder only through `RetrievalModel` (docs/architecture.md, "The model contract"):

* `encode_text_levels` / `encode_image_levels`: the embedding at every level, the full
  embedding last. A flat model has one level (weight 1); a HiVLP hierarchy has several.
  `encode_text` / `encode_image` are the full (last) level.
* `level_dims`, `level_weights`, `embedding_dim`: the sizes of the levels, their loss weights
  and the full size.
* `score(txt, img)`: the retrieval score, a dot product of the embeddings (the index's).
* `loss_temperature`: what the contrastive loss divides its logits by (1.0: none).
* `execution`: `packed` or `padded` (model/packed.py), settable.
* `config.to_dict()`: the family's config as stored in checkpoints; `family` names it.
* `checkpoint_format`: our checkpoint format this model is stored in (model/checkpoint.py).
* `forward(batch)`: (text levels or None, image levels or None) of a batch, so DDP can wrap it.
* `provides(capability)`: optional interfaces beyond retrieval, for pre-training tasks that
  need more than embeddings (`TOKEN_STATES`: per-token hidden states of both sides).

A family is one class implementing this, plus its entry in `model/families.py`.
"""
from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from model.formats import BIENCODER_FORMAT

# Per-token last-layer states of both sides plus the weights the pre-training heads tie to
# (`TokenStates` below): what VMLM and SMRM need beyond the embeddings.
TOKEN_STATES = "token_states"
# The cross-encoder's joint states over caption + regions and its ITM head (UNITER's
# pre-training: ITM, MLM and the region objectives on the joint input).
JOINT_STATES = "joint_states"


class StoredConfig(Protocol):
    """A family's config: a dataclass that round-trips through a plain dict."""

    execution: str

    def to_dict(self) -> dict[str, Any]: ...


class RetrievalModel(nn.Module, abc.ABC):
    """A bi-encoder: captions and images to embeddings whose dot product ranks pairs."""

    # The family's name (`model.type` of a run config; `model/families.py`).
    family: ClassVar[str]
    # Our checkpoint format this model is stored in (`model/checkpoint.py`).
    checkpoint_format: ClassVar[str] = BIENCODER_FORMAT
    # Optional interfaces this family implements besides retrieval (e.g. `TOKEN_STATES`).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    config: StoredConfig

    # ------------------------------------------------------------ levels

    @property
    @abc.abstractmethod
    def level_dims(self) -> list[int]:
        """Embedding size of every level, the full embedding last (flat model: one level)."""

    @property
    def level_weights(self) -> list[float]:
        """Contrastive-loss weight of every level (flat model: [1.0])."""
        return [1.0] * len(self.level_dims)

    @property
    def embedding_dim(self) -> int:
        """Size of the full embedding (the last level): what the indexes hold."""
        return self.level_dims[-1]

    @property
    def loss_temperature(self) -> float:
        """The contrastive loss divides its logits by this; 1.0 leaves them as they are."""
        return 1.0

    # ------------------------------------------------------------ execution

    @property
    def execution(self) -> str:
        """`packed` (real tokens only) or `padded`: how the encoders run (model/packed.py)."""
        return self.config.execution

    @execution.setter
    def execution(self, execution: str) -> None:
        self._set_execution(execution)

    @abc.abstractmethod
    def _set_execution(self, execution: str) -> None:
        """Switch every encoder of the model to `execution` (and record it in the config)."""

    def provides(self, capability: str) -> bool:
        """Whether the family implements the optional interface `capability`."""
        return capability in self.capabilities

    def checkpoint_config(self) -> dict[str, Any]:
        """The model config stored in our checkpoints (enough to rebuild the model)."""
        return self.config.to_dict()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights stored in our checkpoints."""
        return self.state_dict()

    # ------------------------------------------------------------ encoding

    @abc.abstractmethod
    def encode_text_levels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, level_dims[i]) embeddings of `[CLS] ids [SEP]` rows (right-padded), per level."""

    @abc.abstractmethod
    def encode_image_levels(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """(B, level_dims[i]) embeddings of padded regions, per level."""

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, D) full text embeddings (the last level)."""
        return self.encode_text_levels(input_ids, attention_mask)[-1]

    def encode_image(
        self,
        img_feat: torch.Tensor,
        img_pos: torch.Tensor,
        img_mask: torch.Tensor,
        img_masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D) full image embeddings (the last level)."""
        return self.encode_image_levels(img_feat, img_pos, img_mask, img_masked)[-1]

    @staticmethod
    def score(txt_emb: torch.Tensor, img_emb: torch.Tensor) -> torch.Tensor:
        """(T, I) retrieval scores `txt_emb @ img_emb.T` (what the indexes compute)."""
        return txt_emb @ img_emb.t()

    def forward(self, batch: Mapping[str, Any]) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """The levels of a batch's `txt` and/or `img` inputs (docs/architecture.md layout).

        Returns:
            (text levels or None, image levels or None), each as `encode_*_levels`; every
            level is computed, so DDP sees every parameter in use.
        """
        txt_levels = img_levels = None
        if batch.get("txt") is not None:
            txt = batch["txt"]
            txt_levels = self.encode_text_levels(txt["input_ids"], txt["attention_mask"])
        if batch.get("img") is not None:
            img = batch["img"]
            img_levels = self.encode_image_levels(img["img_feat"], img["img_pos"], img["img_mask"],
                                                  img.get("img_masked"))
        return txt_levels, img_levels


class TokenStates(abc.ABC):
    """Capability `TOKEN_STATES`: per-token states of both sides, for VMLM and SMRM.

    The pre-training heads read one side's last-layer states with the other side's [CLS]
    state combined in (`cls_concat`), and tie their output layers to the image side's word
    embeddings (VMLM decoder) and region projection (MRFR regression).
    """

    @property
    @abc.abstractmethod
    def cls_concat(self) -> str:
        """How one side's [CLS] joins the other's states: `add` | `multiply` | `none`."""

    @abc.abstractmethod
    def head_configs(self) -> tuple[Any, Any]:
        """(text, image) BERT configs (`transformers.BertConfig`) the heads are sized from."""

    @property
    @abc.abstractmethod
    def tied_word_embeddings(self) -> nn.Parameter:
        """(vocab, H) word embeddings the VMLM decoder shares (the image side's)."""

    @property
    @abc.abstractmethod
    def tied_region_projection(self) -> nn.Parameter:
        """(H, img_dim) weight of the region-feature input layer that MRFR regresses through."""

    @abc.abstractmethod
    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, H) last-layer text states and the (B, H) [CLS] state."""

    @abc.abstractmethod
    def image_hidden(self, img_feat: torch.Tensor, img_pos: torch.Tensor, img_mask: torch.Tensor,
                     img_masked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, H) last-layer image states (position 0 the [CLS] slot) and the (B, H) slot state."""

    @abc.abstractmethod
    def text_cls_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) text [CLS] state, by `execution`."""

    @abc.abstractmethod
    def image_cls_hidden(self, img_feat: torch.Tensor, img_pos: torch.Tensor, img_mask: torch.Tensor,
                         img_masked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H) image [CLS]-slot state, by `execution`."""

    @abc.abstractmethod
    def text_hidden_packed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(T, H) states of the real text tokens and their `model.packed.VarlenLayout`."""

    @abc.abstractmethod
    def image_hidden_packed(self, img_feat: torch.Tensor, img_pos: torch.Tensor, img_mask: torch.Tensor,
                            img_masked: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """(T, H) states of the [CLS] slot and the real boxes, and their layout in (B, 1 + N)."""
