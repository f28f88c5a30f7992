"""Files that appear whole or not at all: write to a temporary name, then rename.

Every writer of a result file goes through `atomic_output`, so a run killed mid-write leaves
the previous file intact and at worst a hidden `.NAME.tmpPID` file beside it.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds.

    Args:
        path: the file to create or replace (its directory is created).
        suffix: appended to the temporary name, for writers that insist on an extension
            (`np.savez` adds `.npz` to any other name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps ranks that write the same file from sharing a temporary name.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, flushed to disk, then renamed into place."""
    # Imported here: configs and reports use this module without loading torch.
    import torch

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """`obj` as JSON (compact unless `indent`), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
