"""Pre-training tasks by name (SPEC 5): each is one module with one registry entry.

`cmr.py` (`itm`), `vmlm.py` (`mlm`), `smrm.py` (`mrfr`, `mrckl`) for the bi-encoder, and
`joint.py` (UNITER's `itm`, `mlm`, `mrfr`, `mrckl` on the cross-encoder's joint input, in
`CROSS_ENCODER_TASKS`): each entry carries the task's
data, its head, its forward and loss, and its metrics (`base.PretrainTask`). The pre-training
model attaches the heads of every task its bi-encoder can run and dispatches through the
entries; `pretrain.py` and validation read the data side. To add an objective: write its module
(a `PretrainTask`), add it to `PRETRAIN_TASKS` below, mix it into a config, and test it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from model.pretrain_model import (
    PretrainSettings,
    build_pretrain_model,
    missing_capabilities,
)
from model.retrieval import RetrievalModel
from utils.errors import ConfigError
from utils.pipeline.pretrain_tasks import cmr, joint, smrm, vmlm
from utils.pipeline.pretrain_tasks.base import PretrainTask

# Registry order is the order of the heads in the pre-training model (and of their
# initialisation from the seed).
PRETRAIN_TASKS: dict[str, PretrainTask] = {
    task.name: task for task in (cmr.TASK, vmlm.TASK, smrm.MRFR, smrm.MRCKL)
}
# The cross-encoder's (UNITER's) pre-training tasks on its joint input, by the same names.
CROSS_ENCODER_TASKS: dict[str, PretrainTask] = {
    task.name: task for task in (joint.ITM, joint.MLM, joint.MRFR, joint.MRCKL)
}


def check_tasks_supported(backbone: RetrievalModel, tasks: Iterable[str]) -> None:
    """Refuse tasks whose needs the bi-encoder's family does not provide, saying which.

    Raises:
        ConfigError: a task the model cannot run (named, with what it needs and what runs).
    """
    for name in tasks:
        missing = missing_capabilities(PRETRAIN_TASKS[name], backbone)
        if missing:
            runnable = [t.name for t in PRETRAIN_TASKS.values() if not missing_capabilities(t, backbone)]
            raise ConfigError(
                f"pre-training task {name!r} needs {', '.join(missing)} (model/retrieval.py), which model "
                f"family {backbone.family!r} does not provide; it can run: {', '.join(runnable)}"
            )


def pretrain_model(backbone: RetrievalModel, settings: PretrainSettings | None = None) -> Any:
    """The pre-training model of `backbone`: the heads of every task it can run, in registry order."""
    return build_pretrain_model(backbone, list(PRETRAIN_TASKS.values()), settings)


def cross_encoder_pretrain_model(cross_encoder: Any, settings: PretrainSettings | None = None) -> Any:
    """The cross-encoder with the heads of UNITER's pre-training tasks (`CROSS_ENCODER_TASKS`)."""
    return build_pretrain_model(cross_encoder, list(CROSS_ENCODER_TASKS.values()), settings)


__all__ = ["CROSS_ENCODER_TASKS", "PRETRAIN_TASKS", "PretrainTask", "check_tasks_supported",
           "cross_encoder_pretrain_model", "pretrain_model"]
