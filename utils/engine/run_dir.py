"""A run's output directory: its layout, the rules for opening it, and the flags that choose them.

Layout of an output directory::

    config.yaml        resolved run config
    metrics.jsonl      one JSON record per log / validation event
    tensorboard/       the same scalars for TensorBoard
    train_state/       step_XXXXXXXX.pt resume states (keep-last-N)
    ckpt/              model checkpoints for inference (model/checkpoint.py format)

A directory that already holds a run is continued only with `--resume` and replaced only with
`--overwrite` (which removes exactly the files listed above, plus the script's own extras);
otherwise the run stops before touching it. `open_run_dir` applies these rules for every
trainer and writes the resolved config.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from utils.config import RunConfig, save_config
from utils.distributed import DistEnv, barrier
from utils.errors import UserError
from utils.run_files import (
    CKPT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_DIR,
    TENSORBOARD_DIR,
)

logger = logging.getLogger(__name__)

# What a run writes into its output directory; `--overwrite` removes exactly these.
RUN_ARTIFACTS = (STATE_DIR, CKPT_DIR, METRICS_FILE, TENSORBOARD_DIR, CONFIG_FILE)


class OutputDirError(UserError, RuntimeError):
    """The output directory holds another run and neither --resume nor --overwrite was given."""


def state_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the resume state of `step` lives."""
    return Path(output_dir) / STATE_DIR / f"step_{step:08d}.pt"


def list_states(output_dir: str | os.PathLike) -> list[Path]:
    """Resume states of a run directory, oldest first."""
    folder = Path(output_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step_*.pt"))


def _existing_artifacts(out: Path, artifacts: Sequence[str]) -> list[str]:
    found = []
    for name in artifacts:
        path = out / name
        if path.is_dir() and any(path.iterdir()):
            found.append(f"{name}/ ({sum(1 for _ in path.iterdir())} entries)")
        elif path.is_file():
            found.append(name)
    return found


def prepare_output_dir(
    output_dir: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    env: DistEnv,
    extra_artifacts: Sequence[str] = (),
) -> Path | None:
    """Check, clean and create a run's output directory; find the state to resume from.

    Every rank runs the checks (so all fail alike); only rank 0 changes the filesystem.

    Args:
        output_dir: the run directory.
        resume: continue the run found there (from its latest resume state, if any).
        overwrite: delete the previous run's files (only those this code writes) first.
        env: distributed environment.
        extra_artifacts: other file names the script writes (e.g. `test_results.json`).

    Returns:
        The resume state to load, or None to start from scratch.

    Raises:
        OutputDirError: the directory holds another run and neither flag was given, or
            both flags were given.
    """
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other; pass one")
    out = Path(output_dir)
    artifacts = tuple(RUN_ARTIFACTS) + tuple(extra_artifacts)
    found = _existing_artifacts(out, artifacts) if out.is_dir() else []
    if found and not (resume or overwrite):
        raise OutputDirError(
            f"output directory {out} already holds a run ({', '.join(found)}); pass --resume "
            f"to continue it, --overwrite to replace it, or choose another --output_dir"
        )
    latest = list_states(out)[-1] if resume and list_states(out) else None
    if resume and latest is None and found:
        logger.warning("--resume: %s has no resume state yet; starting from scratch", out)
    barrier()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and found:
            logger.warning("--overwrite: removing %s from %s", ", ".join(found), out)
            for name in artifacts:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        for stale in list((out / STATE_DIR).glob(".*.tmp*")) + list((out / CKPT_DIR).glob(".*.tmp*")):
            stale.unlink()
        (out / STATE_DIR).mkdir(exist_ok=True)
        (out / CKPT_DIR).mkdir(exist_ok=True)
    barrier()
    return latest


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """`--resume` / `--overwrite`, shared by every training script."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true",
        help="continue the run in --output_dir from its latest resume state",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="delete the previous run's files in --output_dir and start afresh",
    )


def open_run_dir(
    cfg: RunConfig,
    env: DistEnv,
    *,
    resume: bool,
    overwrite: bool,
    extra_artifacts: Sequence[str] = (),
) -> tuple[Path, Path | None]:
    """Apply the output-directory rules and write the resolved config (rank 0).

    Returns:
        The output directory and the state to resume from (None for a fresh run).
    """
    out = Path(cfg.output_dir)
    resume_from = prepare_output_dir(out, resume=resume, overwrite=overwrite, env=env,
                                     extra_artifacts=extra_artifacts)
    if env.is_main:
        save_config(cfg, out / CONFIG_FILE)
    return out, resume_from
