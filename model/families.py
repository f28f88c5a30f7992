"""Model families: every bi-encoder family behind one registry entry.

A family is a class implementing the retrieval contract (`model/retrieval.py`) plus its
`ModelFamily` entry here: its config class, how a run config's model section builds it (with
the initial weights the section names), which keys of that section are its own, which original
checkpoint formats a whole model of the family can start from, and how. Model set-up
(`utils/pipeline/model_setup.py`), checkpoint loading (`build_biencoder_from_checkpoint`,
`load_retrieval_model`) and the run-config checks (`check_model_section`) read only this
registry, so nothing outside `model/` names a family's class.

Families:

* `lightningdot`: `model.biencoder.BiEncoder`, a BERT text tower and a UNITER image tower.
* `vldeformer`: `model.vldeformer.VLDeformer`, one UNITER body decomposed into a text and an
  image encoder (it starts from a UNITER or cross-encoder checkpoint).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from model.biencoder import BiEncoder, BiEncoderConfig, build_biencoder
from model.checkpoint import (
    BIENCODER_FORMAT,
    CROSS_ENCODER_FORMAT,
    PRETRAIN_FORMAT,
    biencoder_state,
    detect_format,
    initialise_biencoder,
    load_biencoder_weights,
    load_vldeformer_init_file,
    read_checkpoint,
)
from model.retrieval import RetrievalModel
from model.state_dicts import CheckpointError, load_strict, read_weights
from model.towers import read_bert_config
from model.vldeformer import VLDeformer, VLDeformerConfig
from utils.config import ModelConfig
from utils.errors import ConfigError, MissingPathError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
# Our checkpoint formats that hold a whole bi-encoder (a pre-training one holds it under `bert.`).
BIENCODER_FORMATS = (BIENCODER_FORMAT, PRETRAIN_FORMAT)


@dataclass(frozen=True)
class ModelFamily:
    """One bi-encoder family, as model set-up and checkpoint loading see it.

    Attributes:
        name: `model.type` of a run config; stored in our checkpoints' model config.
        config_class: the family's config dataclass (`to_dict` / `from_dict`; checkpoints
            store `to_dict()`).
        model_class: the family's `RetrievalModel`, built from a `config_class` instance.
        build_for_run: the run config's model section -> the model with the initial weights
            the section names (checkpoint paths checked already).
        build_untrained: (model section, the checkpoint it will be filled from) -> the
            architecture the section describes, before any weights: for a checkpoint of one of
            `start_formats`, which carries no config of its own.
        start_formats: the original checkpoint formats (`model.checkpoint.CHECKPOINT_FORMATS`
            names) and other formats of ours a whole model of the family can start from.
        start_from: fill a model of the family from a file of one of `start_formats`.
        own_keys: model-section keys only this family reads; another family's config that
            sets one is refused when the config loads.
    """

    name: str
    config_class: type
    model_class: type[RetrievalModel]
    build_for_run: Callable[[ModelConfig], RetrievalModel]
    build_untrained: Callable[[ModelConfig, PathLike], RetrievalModel]
    start_formats: tuple[str, ...]
    start_from: Callable[[RetrievalModel, PathLike], None]
    own_keys: tuple[str, ...] = ()

    def build(self, config: Any) -> RetrievalModel:
        """A fresh (randomly initialised) model from a `config_class` instance."""
        return self.model_class(config)

    def rebuild(self, model_config: Mapping[str, Any]) -> RetrievalModel:
        """A fresh model from the model config one of our checkpoints stores."""
        return self.build(self.config_class.from_dict(model_config))


# ---------------------------------------------------------------- lightningdot


def _build_lightningdot_for_run(cfg: ModelConfig) -> BiEncoder:
    """The two towers from their config files, then `txt_checkpoint`, `img_checkpoint` and
    `biencoder_checkpoint` in the original order (later ones win)."""
    if not cfg.txt_model_config:
        raise MissingPathError(
            "config key 'txt_model_config' is not set: give a local HF BERT directory or a BERT config JSON"
        )
    if not cfg.img_model_config:
        raise MissingPathError("config key 'img_model_config' is not set: give the image tower's config JSON")
    model = build_biencoder(
        cfg.txt_model_config,
        cfg.img_model_config,
        project_dim=cfg.project_dim,
        dropout=cfg.dropout,
        cls_concat=cfg.cls_concat,
        fix_txt_encoder=cfg.fix_txt_encoder,
        fix_img_encoder=cfg.fix_img_encoder,
        execution=cfg.execution,
        hierarchy=cfg.hierarchy,
    )
    initialise_biencoder(model, cfg.txt_checkpoint, cfg.img_checkpoint, cfg.biencoder_checkpoint)
    for key in ("txt_checkpoint", "img_checkpoint", "biencoder_checkpoint"):
        if getattr(cfg, key):
            logger.info("model.%s: loaded %s", key, getattr(cfg, key))
    return model


def _untrained_lightningdot(cfg: ModelConfig, checkpoint: PathLike) -> BiEncoder:
    """The towers the run config names, for an original (config-less) checkpoint."""
    for key in ("txt_model_config", "img_model_config"):
        if not getattr(cfg, key):
            raise ConfigError(f"{checkpoint} is an original checkpoint: set model.{key} (its tower config)")
    # build_biencoder names the key of a missing path (and refuses hub names offline).
    return build_biencoder(cfg.txt_model_config, cfg.img_model_config, project_dim=cfg.project_dim)


LIGHTNINGDOT = ModelFamily(
    name=BiEncoder.family,
    config_class=BiEncoderConfig,
    model_class=BiEncoder,
    build_for_run=_build_lightningdot_for_run,
    build_untrained=_untrained_lightningdot,
    start_formats=("original-biencoder", "original-pretrain", "state-dict"),
    start_from=load_biencoder_weights,
    own_keys=("txt_checkpoint", "img_checkpoint", "cls_concat", "fix_txt_encoder", "fix_img_encoder", "hierarchy"),
)


# ---------------------------------------------------------------- vldeformer


def _vldeformer_bert_config(cfg: ModelConfig, uniter_checkpoint: PathLike | None) -> dict[str, Any]:
    """The UNITER architecture of a VLDeformer: `img_model_config`, or the stored config of
    our cross-encoder checkpoint it starts from."""
    if cfg.img_model_config:
        return read_bert_config(cfg.img_model_config, "img_model_config")
    if uniter_checkpoint and detect_format(read_weights(uniter_checkpoint)) == CROSS_ENCODER_FORMAT:
        return dict(read_checkpoint(uniter_checkpoint)["model_config"]["bert_config"])
    raise MissingPathError(
        "model.type is vldeformer: set model.img_model_config to the UNITER config JSON (or "
        "model.uniter_checkpoint to a cross-encoder checkpoint of rerank.py train, which holds it)"
    )


def _vldeformer_config(cfg: ModelConfig, uniter_checkpoint: PathLike | None) -> VLDeformerConfig:
    return VLDeformerConfig(
        bert_config=_vldeformer_bert_config(cfg, uniter_checkpoint),
        pooling=cfg.pooling,
        image_cls=cfg.image_cls,
        pool_tanh=cfg.pool_tanh,
        project_dim=cfg.project_dim,
        score=cfg.score,
        temperature=cfg.temperature,
        dropout=cfg.dropout,
        execution=cfg.execution,
    )


def _decompose(model: RetrievalModel, path: PathLike) -> None:
    """Fill a VLDeformer's UNITER body from a UNITER / cross-encoder file, and say what was used."""
    report = load_vldeformer_init_file(model, path)
    logger.info("%s: %d UNITER keys used, unused: %s", path, len(report["used"]), ", ".join(report["unused"]) or "none")


def _build_vldeformer_for_run(cfg: ModelConfig) -> VLDeformer:
    """The UNITER body from `uniter_checkpoint` (the decomposition), then `biencoder_checkpoint`."""
    model = VLDeformer(_vldeformer_config(cfg, cfg.uniter_checkpoint))
    if cfg.uniter_checkpoint:
        _decompose(model, cfg.uniter_checkpoint)
    if cfg.biencoder_checkpoint:
        load_biencoder_weights(model, cfg.biencoder_checkpoint)
        logger.info("model.biencoder_checkpoint: loaded %s", cfg.biencoder_checkpoint)
    return model


def _untrained_vldeformer(cfg: ModelConfig, checkpoint: PathLike) -> VLDeformer:
    return VLDeformer(_vldeformer_config(cfg, checkpoint))


VLDEFORMER = ModelFamily(
    name=VLDeformer.family,
    config_class=VLDeformerConfig,
    model_class=VLDeformer,
    build_for_run=_build_vldeformer_for_run,
    build_untrained=_untrained_vldeformer,
    start_formats=("original-uniter", CROSS_ENCODER_FORMAT),
    start_from=_decompose,
    own_keys=("pooling", "image_cls", "pool_tanh", "score", "temperature", "uniter_checkpoint"),
)


# ---------------------------------------------------------------- the registry

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (LIGHTNINGDOT, VLDEFORMER)}
# Checkpoints written before families had names store no `model_type`: LightningDOT's.
DEFAULT_FAMILY = LIGHTNINGDOT.name


def get_family(name: str) -> ModelFamily:
    """The family called `name` (`model.type`).

    Raises:
        ConfigError: no such family (the known ones are named).
    """
    if name not in FAMILIES:
        raise ConfigError(f"model.type: {name!r} is not a model family; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(model_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a model config stored in one of our checkpoints (or info.json)."""
    return get_family(model_config.get("model_type", DEFAULT_FAMILY))


def check_model_section(cfg: ModelConfig) -> ModelFamily:
    """Check the model section against its family when the run config loads.

    Returns:
        The family `model.type` names.

    Raises:
        ConfigError: an unknown family, or a key of another family set to anything but its
            default (it would be ignored).
    """
    family = get_family(cfg.type)
    defaults = ModelConfig()
    for other in FAMILIES.values():
        if other is family:
            continue
        for key in other.own_keys:
            if key not in family.own_keys and getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(
                    f"model.{key} is for model.type {other.name}; this config's model.type is "
                    f"{family.name}, which does not read it: remove it"
                )
    return family


def build_model_for_run(cfg: ModelConfig) -> RetrievalModel:
    """The bi-encoder of a run config's model section, with the initial weights it names."""
    return get_family(cfg.type).build_for_run(cfg)


def build_biencoder_from_checkpoint(path: PathLike) -> RetrievalModel:
    """Rebuild a bi-encoder of any family from one of our bi-encoder or pre-training
    checkpoints alone (its family is the one its stored model config names)."""
    obj = read_checkpoint(path)
    if obj["format"] not in BIENCODER_FORMATS:
        raise CheckpointError(f"{path} holds a {obj['format']} checkpoint, not a bi-encoder")
    model_config = {k: v for k, v in obj["model_config"].items() if k != "pretrain"}
    model = family_of_config(model_config).rebuild(model_config)
    state, _ = biencoder_state(obj, path)
    load_strict(model, state, path, f"{model.family} bi-encoder")
    return model


def load_retrieval_model(
    checkpoint: PathLike,
    cfg: ModelConfig | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> tuple[RetrievalModel, str]:
    """A bi-encoder for evaluation from any checkpoint a family can start from, and its format.

    Our bi-encoder and pre-training checkpoints rebuild their model alone. Any other file is
    one of a family's `start_formats`: the architecture then comes from `model_config` (a
    stored model config, e.g. info.json's) or the run config's model section, and the family
    fills it (a UNITER file given to `model.type: vldeformer` is decomposed, as `train_itm.py`
    would with `model.uniter_checkpoint`).

    Raises:
        ConfigError: neither a model section nor a model config for a config-less file.
        CheckpointError: a file the family cannot start from (the message says what would).
    """
    fmt = detect_format(read_weights(checkpoint))
    if fmt in BIENCODER_FORMATS:
        return build_biencoder_from_checkpoint(checkpoint), fmt
    if model_config is not None:
        family = family_of_config(model_config)
        model = family.rebuild(model_config)
    elif cfg is not None:
        family = get_family(cfg.type)
        model = None
    else:
        raise ConfigError(f"{checkpoint} is a {fmt} checkpoint without a model config: its tower configs are needed")
    if fmt not in family.start_formats:
        starts = {name: f.start_formats for name, f in FAMILIES.items() if fmt in f.start_formats}
        hint = f"; it starts model.type {', '.join(starts)}" if starts else ""
        raise CheckpointError(
            f"{checkpoint} is a {fmt} checkpoint: model.type {family.name} starts from "
            f"{', '.join(family.start_formats)} checkpoints or ours{hint}"
        )
    if model is None:
        model = family.build_untrained(cfg, checkpoint)
    family.start_from(model, checkpoint)
    return model, fmt
