"""A run's metrics log: `metrics.jsonl` plus the same scalars for TensorBoard, and reading it back.

Every training event (a reduced train interval, a validation) is one JSON record
`{"step", "split", "time", ...metrics}` with nested metrics flattened by `/`. Only rank 0
writes; a resumed run first drops the records after its step, so the log reads as one
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.files import atomic_write_text
from utils.run_files import METRICS_FILE, TENSORBOARD_DIR


class MetricsLogger:
    """Scalars to `metrics.jsonl` and TensorBoard, on rank 0 only.

    On resume, records after the resumed step are dropped from `metrics.jsonl` and purged
    from TensorBoard, so both read as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._writer = None
        if not enabled:
            return
        self._truncate(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(Path(output_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Append one record; nested dicts are flattened with `/` (e.g. `text_to_image/R@1`)."""
        if not self.enabled:
            return
        flat = _flatten(metrics)
        record = {"step": step, "split": split, "time": round(time.time(), 3), **flat}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for key, value in flat.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{split}/{key}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (torch.Tensor, np.generic)):
            out[name] = value.item()
        else:
            out[name] = value
    return out


def read_metrics(output_dir: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a run's `metrics.jsonl` (optionally of one split)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]
