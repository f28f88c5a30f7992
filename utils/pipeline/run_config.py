"""The run config as every entry point loads it: typed and checked, registries included.

`utils/config.py` types and checks every section when a config loads; what it cannot check from
the leaf floor is checked here, right after, once: the model family and its keys
(`model/families.py`), the index type's parameters (`utils/search/indexes.py`), the re-ranker
(`utils/pipeline/reranking.py`) and the pre-training tasks (`utils/pipeline/pretrain_tasks/`).

A training program also warns, once, about each training option set in the config that it does
not read (`TRAINING_OPTIONS`): `pretrain.py` has no use for bi-modal negatives, for instance. The
evaluation programs take the training config as it is and read what they need of it.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model.families import check_model_section
from utils.config import OriginalProgram, RunConfig, config_from_args, load_config
from utils.errors import ConfigError
from utils.pipeline.pretrain_tasks import PRETRAIN_TASKS
from utils.pipeline.reranking import RERANKERS
from utils.search.indexes import split_index_spec

logger = logging.getLogger(__name__)

PRETRAIN = "pretrain.py"
TRAIN_ITM = "train_itm.py"
TRAIN_CROSS_ENCODER = "rerank.py train"


@dataclass(frozen=True)
class TrainingOption:
    """An option of the run config that changes what a training program does.

    Attributes:
        key: where it is set (`section.field`).
        is_set: whether a config sets it (to anything but "off").
        read_by: the training programs that read it; the others warn when it is set.
        hint: what to do instead, for the warning.
    """

    key: str
    is_set: Callable[[RunConfig], bool]
    read_by: frozenset[str]
    hint: str = ""


TRAINING_OPTIONS = (
    TrainingOption("model.hierarchy", lambda c: c.model.hierarchy is not None, frozenset({PRETRAIN, TRAIN_ITM}),
                   "the cross-encoder has no embedding levels"),
    TrainingOption("data.bimodal_negatives", lambda c: c.data.bimodal_negatives is not None, frozenset({TRAIN_ITM}),
                   "composed negatives are rows of fine-tuning batches (train_itm.py)"),
    TrainingOption("retrieval.num_hard_negatives",
                   lambda c: c.retrieval.num_hard_negatives > 0 and c.retrieval.hard_negatives_sampling != "none",
                   frozenset({TRAIN_ITM, TRAIN_CROSS_ENCODER}), "pre-training batches take in-batch negatives only"),
    TrainingOption("cross_encoder.checkpoint", lambda c: bool(c.cross_encoder.checkpoint),
                   frozenset({TRAIN_CROSS_ENCODER}),
                   "it is where the cross-encoder starts; older configs' model.checkpoint / checkpoint "
                   "mean this key; pre-training starts from model.pretrain_checkpoint"),
)


def check_run_config(cfg: RunConfig) -> None:
    """Check the parts of a loaded config that need the registries above the leaf.

    Raises:
        ConfigError: an unknown model family or a key of another family, an index type or
            parameter the index registry lacks, an unknown re-ranker or pre-training task.
    """
    check_model_section(cfg.model)
    try:
        split_index_spec(cfg.retrieval.index.to_dict())
    except ValueError as err:
        raise ConfigError(f"retrieval.index: {err}") from None
    if cfg.rerank.reranker not in RERANKERS:
        raise ConfigError(f"rerank.reranker: {cfg.rerank.reranker!r} is not one of {sorted(RERANKERS)}")
    for key, specs in (("train_datasets", cfg.data.train_datasets), ("val_datasets", cfg.data.val_datasets)):
        for spec in specs:
            for task in spec.tasks:
                if task not in PRETRAIN_TASKS:
                    raise ConfigError(f"data.{key} ({spec.name!r}): unknown task {task!r}; expected one of {tuple(PRETRAIN_TASKS)}")
    for task in cfg.data.pretrain_tasks:
        if task not in PRETRAIN_TASKS:
            raise ConfigError(f"data.pretrain_tasks: unknown task {task!r}; expected one of {tuple(PRETRAIN_TASKS)}")


def warn_ignored_options(cfg: RunConfig, program: str) -> list[str]:
    """Warn once about each training option set in `cfg` that `program` does not read.

    Returns:
        The keys warned about.
    """
    ignored = [option for option in TRAINING_OPTIONS if program not in option.read_by and option.is_set(cfg)]
    for option in ignored:
        logger.warning("%s is set in the config, but %s does not read it: it has no effect here (%s)",
                       option.key, program, option.hint)
    return [option.key for option in ignored]


def load_run_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    program: OriginalProgram | None = None,
    trainer: str | None = None,
) -> RunConfig:
    """`utils.config.load_config`, then `check_run_config` (and, for a training program,
    `warn_ignored_options`).

    Args:
        path: our YAML / JSON config or an original flat JSON config.
        overrides: `section.key=value` or `key=value` strings.
        program: the original program an original flat config was written for.
        trainer: the training program loading it (`PRETRAIN`, `TRAIN_ITM`, `TRAIN_CROSS_ENCODER`).
    """
    cfg = load_config(path, list(overrides), program)
    return _checked(cfg, trainer)


def run_config_from_args(
    args: argparse.Namespace, program: OriginalProgram | None = None, trainer: str | None = None
) -> RunConfig:
    """`load_run_config` of the shared command line (`utils.config.add_config_args`)."""
    return _checked(config_from_args(args, program), trainer)


def _checked(cfg: RunConfig, trainer: str | None) -> RunConfig:
    check_run_config(cfg)
    if trainer is not None:
        warn_ignored_options(cfg, trainer)
    return cfg
