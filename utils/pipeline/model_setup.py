"""Build the model a run config describes, with the initial weights it names.

The training scripts and evaluation share this so that one config key means the same
thing everywhere: `txt_model_config` (local HF directory or BERT config JSON; a directory's
weights initialise the text tower), `img_model_config` (image tower config JSON),
`txt_checkpoint` (BERT weights), `img_checkpoint` (UNITER weights for the image tower),
`biencoder_checkpoint` (a whole bi-encoder: ours, original fine-tuned or pre-trained), and for
pre-training `pretrain_checkpoint` (a whole pre-training model with its heads). Later ones override
earlier ones.
"""
from __future__ import annotations

import logging
from typing import Any

from model.biencoder import BiEncoder, build_biencoder
from model.checkpoint import initialise_biencoder, load_pretrain_weights
from model.pretrain_heads import PretrainModel
from model.towers import read_bert_config
from utils.config import ConfigError, ModelConfig, require_path
from utils.errors import MissingPathError
from utils.hierarchy import Hierarchy, HierarchyError

logger = logging.getLogger(__name__)


def check_model_paths(cfg: ModelConfig, *, pretrain: bool = False) -> None:
    """Fail early, naming the key, when a checkpoint path of the model section is missing.

    (`txt_model_config` / `img_model_config` are checked when the model is built: a hub
    name there gets its own message.)
    """
    for key in ("txt_checkpoint", "img_checkpoint", "biencoder_checkpoint"):
        if getattr(cfg, key):
            require_path(getattr(cfg, key), key, "file")
    if pretrain and cfg.pretrain_checkpoint:
        require_path(cfg.pretrain_checkpoint, "pretrain_checkpoint", "file")


def _checked_hierarchy(cfg: ModelConfig) -> dict[str, Any] | None:
    """`model.hierarchy` checked against the full embedding size, or None when off.

    With `project_dim: 0` the full size is the text tower's hidden size, which only its config
    file says (the config section checked everything else when it loaded).
    """
    if not cfg.hierarchy:
        return None
    full_dim = cfg.project_dim or read_bert_config(cfg.txt_model_config, "txt_model_config").get("hidden_size", 768)
    try:
        Hierarchy.from_dict(cfg.hierarchy, full_dim)
    except HierarchyError as err:
        raise ConfigError(str(err)) from err
    return dict(cfg.hierarchy)


def build_biencoder_for_run(cfg: ModelConfig) -> BiEncoder:
    """The bi-encoder of the model section, initialised from the checkpoints it names.

    Args:
        cfg: the run config's model section.

    Raises:
        FileNotFoundError: a config or checkpoint path does not exist (the key is named).
    """
    if not cfg.txt_model_config:
        raise MissingPathError(
            "config key 'txt_model_config' is not set: give a local HF BERT directory or a BERT config JSON"
        )
    if not cfg.img_model_config:
        raise MissingPathError("config key 'img_model_config' is not set: give the image tower's config JSON")
    check_model_paths(cfg)
    model = build_biencoder(
        cfg.txt_model_config,
        cfg.img_model_config,
        project_dim=cfg.project_dim,
        dropout=cfg.dropout,
        cls_concat=cfg.cls_concat,
        fix_txt_encoder=cfg.fix_txt_encoder,
        fix_img_encoder=cfg.fix_img_encoder,
        execution=cfg.execution,
        hierarchy=_checked_hierarchy(cfg),
    )
    initialise_biencoder(model, cfg.txt_checkpoint, cfg.img_checkpoint, cfg.biencoder_checkpoint)
    for key in ("txt_checkpoint", "img_checkpoint", "biencoder_checkpoint"):
        if getattr(cfg, key):
            logger.info("model.%s: loaded %s", key, getattr(cfg, key))
    return model


def build_pretrain_model_for_run(cfg: ModelConfig, mask_duplicates: bool = True) -> PretrainModel:
    """The pre-training model (bi-encoder + VMLM / SMRM heads) of the model section.

    Args:
        cfg: the run config's model section; `pretrain_checkpoint`, when set, is a pre-training
            checkpoint (original `model_step_N.pt` or ours) loaded last, heads included.
        mask_duplicates: CMR removes other captions of a row's image from its negatives.
    """
    check_model_paths(cfg, pretrain=True)
    model = PretrainModel(build_biencoder_for_run(cfg), mask_duplicates=mask_duplicates)
    if cfg.pretrain_checkpoint:
        load_pretrain_weights(model, cfg.pretrain_checkpoint)
        logger.info("pre-training model initialised from %s", cfg.pretrain_checkpoint)
    return model
