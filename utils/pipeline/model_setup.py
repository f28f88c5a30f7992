"""Build the model a run config describes, with the initial weights it names.

The training scripts and evaluation share this so that one config key means the same thing
everywhere. `model.type` names the family (`model/families.py`), whose entry builds the
bi-encoder from the model section: for `lightningdot`, `txt_model_config` (a local HF directory
or BERT config JSON; a directory's weights initialise the text tower), `img_model_config`,
`txt_checkpoint` (BERT weights), `img_checkpoint` (UNITER weights for the image tower) and
`biencoder_checkpoint` (a whole bi-encoder: ours, original fine-tuned or pre-trained), later
ones overriding earlier ones; for `vldeformer`, `uniter_checkpoint` (the decomposition) then
`biencoder_checkpoint`. Pre-training adds the heads of the tasks (`utils/pipeline/pretrain_tasks/`)
and loads `biencoder_checkpoint` and `pretrain_checkpoint` into the whole model, heads included,
as the original `pretrain.py` does.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from model.checkpoint import (
    BIENCODER_FORMAT,
    PRETRAIN_FORMAT,
    load_pretrain_weights,
    read_checkpoint,
)
from model.families import build_model_for_run, family_of_config
from model.pretrain_model import PretrainSettings
from model.retrieval import RetrievalModel
from model.state_dicts import CheckpointError, load_strict
from utils.config import ModelConfig, require_path
from utils.pipeline.pretrain_tasks import check_tasks_supported, pretrain_model

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("txt_checkpoint", "img_checkpoint", "biencoder_checkpoint", "uniter_checkpoint")


def check_model_paths(cfg: ModelConfig, *, pretrain: bool = False) -> None:
    """Fail early, naming the key, when a checkpoint path of the model section is missing.

    (`txt_model_config` / `img_model_config` are checked when the model is built: a hub
    name there gets its own message.)
    """
    for key in CHECKPOINT_KEYS:
        if getattr(cfg, key):
            require_path(getattr(cfg, key), key, "file")
    if pretrain and cfg.pretrain_checkpoint:
        require_path(cfg.pretrain_checkpoint, "pretrain_checkpoint", "file")


def build_biencoder_for_run(cfg: ModelConfig) -> RetrievalModel:
    """The bi-encoder of the model section (the family `model.type` names), initialised
    from the checkpoints it names.

    Raises:
        FileNotFoundError: a config or checkpoint path does not exist (the key is named).
    """
    check_model_paths(cfg)
    return build_model_for_run(cfg)


def build_pretrain_model_for_run(cfg: ModelConfig, tasks: Sequence[str] = (), mask_duplicates: bool = True) -> Any:
    """The pre-training model (bi-encoder + the heads of every task it can run).

    `biencoder_checkpoint` and then `pretrain_checkpoint` (original `model_step_N.pt` or ours)
    are loaded into the whole model strictly, heads included, as the original `pretrain.py`
    loads `biencoder_checkpoint`; a `biencoder_checkpoint` without pre-training heads (a
    fine-tuned bi-encoder) fills the bi-encoder and the heads keep their initialisation, which
    is logged in one line.

    Args:
        cfg: the run config's model section.
        tasks: the tasks the run trains; each must be one the family can run.
        mask_duplicates: CMR removes other captions of a row's image from its negatives.

    Raises:
        ConfigError: a task the model family cannot run (what it needs is named).
    """
    check_model_paths(cfg, pretrain=True)
    backbone = build_model_for_run(dataclasses.replace(cfg, biencoder_checkpoint=None))
    check_tasks_supported(backbone, tasks)
    model = pretrain_model(backbone, PretrainSettings(mask_duplicates=mask_duplicates))
    has_heads = any(not key.startswith("bert.") for key in model.state_dict())
    if cfg.biencoder_checkpoint:
        with_heads = load_pretrain_weights(model, cfg.biencoder_checkpoint, heads_optional=True)
        if with_heads or not has_heads:
            logger.info("model.biencoder_checkpoint: loaded %s", cfg.biencoder_checkpoint)
        else:
            logger.warning(
                "model.biencoder_checkpoint %s has no pre-training heads (cls.predictions.*, feat_regress.*, "
                "region_classifier.*): it filled the bi-encoder; the heads start from their random "
                "initialisation", cfg.biencoder_checkpoint,
            )
    if cfg.pretrain_checkpoint:
        load_pretrain_weights(model, cfg.pretrain_checkpoint)
        logger.info("pre-training model initialised from %s", cfg.pretrain_checkpoint)
    return model


def build_pretrain_model_from_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Rebuild a pre-training model (bi-encoder + heads) from one of our checkpoints alone.

    A bi-encoder checkpoint gives fresh heads on the stored bi-encoder.
    """
    obj = read_checkpoint(path)
    if obj["format"] not in (BIENCODER_FORMAT, PRETRAIN_FORMAT):
        raise CheckpointError(f"{path} holds a {obj['format']} checkpoint, not a pre-training model")
    model_config = {k: v for k, v in obj["model_config"].items() if k != "pretrain"}
    backbone = family_of_config(model_config).rebuild(model_config)
    model = pretrain_model(backbone, PretrainSettings(**obj["model_config"].get("pretrain", {})))
    if obj["format"] == PRETRAIN_FORMAT:
        load_strict(model, obj["model"], path, "pre-training model")
    else:
        load_strict(backbone, obj["model"], path, "bi-encoder")
    return model
