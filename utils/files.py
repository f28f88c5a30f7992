"""Files that appear whole or not at all: write to a temporary name, then rename."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same directory, then rename it into place.

    A run killed mid-write leaves the previous file intact and at worst a `*.tmp` file,
    which `prepare_output_dir` removes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    # The pid keeps ranks that write the same file from sharing a temporary name.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """`obj` as JSON (compact unless `indent`), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
