"""Build the model a run config describes, with the initial weights it names.

The training scripts and evaluation share this so that one config key means the same
thing everywhere: `txt_model_config` (local HF directory or BERT config JSON; a directory's
weights initialise the text tower), `img_model_config` (image tower config JSON),
`txt_checkpoint` (BERT weights), `img_checkpoint` (UNITER weights for the image tower),
`biencoder_checkpoint` (a whole bi-encoder: ours, original fine-tuned or pre-trained), and for
pre-training `pretrain_checkpoint` (a whole pre-training model with its heads). Later ones override
earlier ones.

`model.type` picks the family here, and only here: `lightningdot` builds the two-tower
`BiEncoder`, `vldeformer` a `VLDeformer` (model/vldeformer.py) initialised from
`uniter_checkpoint` (the decomposition), then from `biencoder_checkpoint` when set. Both
have the same surface, so nothing downstream branches on the family.
"""
from __future__ import annotations

import logging
from typing import Any

from model.biencoder import BiEncoder, build_biencoder
from model.checkpoint import (
    CROSS_ENCODER_FORMAT,
    initialise_biencoder,
    load_biencoder_weights,
    load_pretrain_weights,
    load_vldeformer_init_file,
    read_checkpoint,
)
from model.pretrain_heads import PretrainModel
from model.state_dicts import read_weights
from model.towers import read_bert_config
from model.vldeformer import VLDeformer, VLDeformerConfig
from utils.config import ConfigError, ModelConfig, require_path
from utils.errors import MissingPathError
from utils.hierarchy import Hierarchy, HierarchyError

logger = logging.getLogger(__name__)


def check_model_paths(cfg: ModelConfig, *, pretrain: bool = False) -> None:
    """Fail early, naming the key, when a checkpoint path of the model section is missing.

    (`txt_model_config` / `img_model_config` are checked when the model is built: a hub
    name there gets its own message.)
    """
    for key in ("txt_checkpoint", "img_checkpoint", "biencoder_checkpoint", "uniter_checkpoint"):
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


def _vldeformer_bert_config(cfg: ModelConfig) -> dict[str, Any]:
    """The UNITER architecture of a VLDeformer run: `img_model_config`, or the stored config
    of our cross-encoder checkpoint named by `uniter_checkpoint`."""
    if cfg.img_model_config:
        return read_bert_config(cfg.img_model_config, "img_model_config")
    if cfg.uniter_checkpoint and "format" in read_weights(cfg.uniter_checkpoint):
        obj = read_checkpoint(cfg.uniter_checkpoint)
        if obj["format"] == CROSS_ENCODER_FORMAT:
            return dict(obj["model_config"]["bert_config"])
    raise MissingPathError(
        "model.type is vldeformer: set model.img_model_config to the UNITER config JSON (or "
        "model.uniter_checkpoint to a cross-encoder checkpoint of rerank.py train, which holds it)"
    )


def build_vldeformer_for_run(cfg: ModelConfig) -> VLDeformer:
    """The VLDeformer of the model section: its UNITER body from `uniter_checkpoint` (an
    original UNITER file or our cross-encoder), then `biencoder_checkpoint` (ours) when set.

    Raises:
        ConfigError: a LightningDOT-only key (`txt_checkpoint`, `img_checkpoint`,
            `fix_txt_encoder`, `fix_img_encoder`) is set.
        FileNotFoundError: a config or checkpoint path does not exist (the key is named).
    """
    for key in ("txt_checkpoint", "img_checkpoint"):
        if getattr(cfg, key):
            raise ConfigError(
                f"model.{key} is for model.type lightningdot; a vldeformer starts from "
                f"model.uniter_checkpoint (UNITER or cross-encoder weights)"
            )
    for key in ("fix_txt_encoder", "fix_img_encoder"):
        if getattr(cfg, key):
            raise ConfigError(f"model.{key}: a vldeformer shares one encoder between text and images")
    check_model_paths(cfg)
    config = VLDeformerConfig(
        bert_config=_vldeformer_bert_config(cfg),
        pooling=cfg.pooling,
        image_cls=cfg.image_cls,
        pool_tanh=cfg.pool_tanh,
        project_dim=cfg.project_dim,
        score=cfg.score,
        temperature=cfg.temperature,
        dropout=cfg.dropout,
        execution=cfg.execution,
    )
    model = VLDeformer(config)
    if cfg.uniter_checkpoint:
        report = load_vldeformer_init_file(model, cfg.uniter_checkpoint)
        logger.info("model.uniter_checkpoint: %d keys used, unused: %s", len(report["used"]),
                    ", ".join(report["unused"]) or "none")
    if cfg.biencoder_checkpoint:
        load_biencoder_weights(model, cfg.biencoder_checkpoint)
        logger.info("model.biencoder_checkpoint: loaded %s", cfg.biencoder_checkpoint)
    return model


def build_biencoder_for_run(cfg: ModelConfig) -> BiEncoder | VLDeformer:
    """The bi-encoder of the model section (the family `model.type` names), initialised
    from the checkpoints it names.

    Args:
        cfg: the run config's model section.

    Raises:
        FileNotFoundError: a config or checkpoint path does not exist (the key is named).
    """
    if cfg.type == "vldeformer":
        return build_vldeformer_for_run(cfg)
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
    if cfg.type != "lightningdot":
        raise ConfigError(f"pre-training builds a LightningDOT bi-encoder; model.type is {cfg.type!r}")
    check_model_paths(cfg, pretrain=True)
    model = PretrainModel(build_biencoder_for_run(cfg), mask_duplicates=mask_duplicates)
    if cfg.pretrain_checkpoint:
        load_pretrain_weights(model, cfg.pretrain_checkpoint)
        logger.info("pre-training model initialised from %s", cfg.pretrain_checkpoint)
    return model
