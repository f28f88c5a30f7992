"""The retrieval directory that inference.py writes and rerank.py reads, and what fills it.

Split spec, model loading by checkpoint format, encoding a split to sharded embeddings, top-k
lists, and the directory's file names (see inference.py for the layout).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.txt_db import TxtDb
from model.families import load_retrieval_model
from model.formats import OUR_FORMATS
from utils.config import RunConfig, require_path
from utils.engine.loader import to_device
from utils.errors import UserError
from utils.pipeline.evaluation import open_img_db
from utils.precision import resolve_precision
from utils.progress import progress
from utils.run_files import (
    IDS_FILE,
    INFO_FILE,
    TOPK_FILE,
)
from utils.search.topk import exact_topk, results_to_lists

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class RetrievalDirError(UserError, ValueError):
    """A retrieval directory that is incomplete or belongs to another split."""


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, naming `what` it is when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalDirError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RetrievalDirError(f"{what} {path} is not valid JSON: {err}") from err


@dataclass(frozen=True)
class Split:
    """The evaluation split a run reads, with the parameters that change what is read."""

    name: str
    txt_db: str
    img_db: str
    max_txt_len: int
    conf_th: float
    max_bb: int
    min_bb: int
    num_bb: int
    compressed_db: bool
    # The first `num_images` images of the split and their captions (0: all); `retrieval.eval_images`.
    num_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stored in info.json)."""
        return dict(self.__dict__)


def resolve_split(config: RunConfig) -> Split:
    """The split named by `retrieval.eval_split` (`test` or `val`), paths checked.

    Raises:
        ConfigError: the split's txt_db / img_db keys are not set.
        FileNotFoundError: they point nowhere (the message names the key).
    """
    name = config.retrieval.eval_split
    txt_key, img_key = f"{name}_txt_db", f"{name}_img_db"
    txt_db = require_path(getattr(config.data, txt_key), f"data.{txt_key}", "dir")
    img_db = require_path(getattr(config.data, img_key), f"data.{img_key}", "dir")
    d = config.data
    return Split(
        name=name,
        txt_db=str(txt_db.resolve()),
        img_db=str(img_db.resolve()),
        max_txt_len=d.max_txt_len,
        conf_th=d.conf_th,
        max_bb=d.max_bb,
        min_bb=d.min_bb,
        num_bb=d.num_bb,
        compressed_db=d.compressed_db,
        num_images=config.retrieval.eval_images,
    )


def open_split(split: Split):
    """(TxtDb, ImgDb) of a split (its first `num_images` images and their captions when set)."""
    return TxtDb(split.txt_db, split.max_txt_len, split.num_images), open_img_db(split.img_db, split)


def check_retrieval_dir(retrieval_dir: str | os.PathLike, split: Split) -> dict[str, Any]:
    """Read `info.json` of an inference output and check it was made from `split`.

    Returns:
        The info dict.

    Raises:
        RetrievalDirError: incomplete directory, or produced from another split / filter.
    """
    retrieval_dir = Path(retrieval_dir)
    info = read_json(retrieval_dir / INFO_FILE, "retrieval info (written last by inference.py)")
    # Directories written before a field existed hold its default.
    defaults = {f.name: f.default for f in dataclasses.fields(Split) if f.default is not dataclasses.MISSING}
    saved = {**defaults, **info.get("split", {})}
    diffs = [
        f"{f.name}: retrieval_dir has {saved.get(f.name)!r}, the config gives {getattr(split, f.name)!r}"
        for f in dataclasses.fields(Split)
        if saved.get(f.name) != getattr(split, f.name)
    ]
    if diffs:
        raise RetrievalDirError(
            f"{retrieval_dir / INFO_FILE} was produced from a different split than the one "
            f"configured; re-run inference.py for this split or fix the config:\n  "
            + "\n  ".join(diffs)
        )
    for name in (IDS_FILE, TOPK_FILE):
        if not (retrieval_dir / name).is_file():
            raise RetrievalDirError(f"{retrieval_dir}: {name} is missing (inference did not finish?)")
    return info


def load_biencoder(
    checkpoint: str | os.PathLike, config: RunConfig | None = None, model_config: Mapping[str, Any] | None = None
):
    """The bi-encoder of `checkpoint`, in eval mode, and the checkpoint's format (`ours`, or
    the `model.checkpoint.CHECKPOINT_FORMATS` name of an original file).

    Our checkpoints rebuild their model alone. Any other file is one a model family starts
    from (`model.families.load_retrieval_model`): its architecture comes from `model_config`
    (a stored model config, e.g. from info.json) or the run config's model section.

    Raises:
        FileNotFoundError: the checkpoint or a tower config does not exist.
        model.state_dicts.CheckpointError: the weights do not fit the configured model.
    """
    path = require_path(str(checkpoint), "--checkpoint", "file")
    model, fmt = load_retrieval_model(path, config.model if config is not None else None, model_config)
    if config is not None:
        # How to run the towers is the run's choice, not the checkpoint's.
        model.execution = config.model.execution
    return model.eval(), "ours" if fmt in OUR_FORMATS else fmt


def pick_precision(requested: str, config_precision: str, device: torch.device):
    """Inference precision: `auto` = autocast on a GPU (the config's fp16/bf16, else bf16
    when supported, else fp16), fp32 on a CPU."""
    if requested == "auto":
        if device.type != "cuda":
            requested = "fp32"
        elif config_precision in ("fp16", "bf16"):
            requested = config_precision
        else:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return resolve_precision(requested, device)


def encode_split(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list], dict[str, Any]],
    lengths: Sequence[int],
    encode: Callable[[dict[str, Any]], torch.Tensor],
    writer,
    batch_size: int,
    device: torch.device,
    precision,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    desc: str = "encode",
) -> int:
    """Encode this rank's share of `dataset` into `writer`, longest examples first.

    Args:
        dataset: eval dataset whose batches carry `index` (canonical positions).
        collate_fn: its collate function.
        lengths: per-example length used for sorting (tokens or boxes).
        encode: batch (on device) -> (B, D) embeddings.
        writer: `utils.search.shards.EmbeddingShardWriter`.
        batch_size: examples per batch.
        device: compute device.
        precision: `utils.precision.Precision` (its autocast is used).
        rank: this rank; it takes every `world_size`-th example of the sorted order.
        world_size: number of ranks.
        num_workers: DataLoader workers.
        desc: progress label.

    Returns:
        Number of examples this rank encoded.
    """
    # Stable sort: equal lengths keep canonical order, so runs are reproducible.
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])[rank::world_size]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    done = 0
    with torch.inference_mode():
        for batch in progress(loader, desc=desc, disable=rank != 0):
            with precision.autocast():
                emb = encode(to_device(batch, device))
            writer.add(batch["index"], emb.float())
            done += len(batch["index"])
    return done


def topk_lists(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    index=None,
    device: torch.device | None = None,
    query_block: int = 65536,
) -> list[list[tuple[int, float]]]:
    """Per query, [(corpus row, score), ...] best first (at most min(k, N), never padded).

    Exact search (`utils.search.topk.exact_topk`, on `device`) unless an approximate `index` over
    `corpus` is given.
    """
    if index is None:
        return results_to_lists(*exact_topk(queries, corpus, k, device=device))
    lists: list[list[tuple[int, float]]] = []
    # Query blocks keep a memory-mapped query side out of memory.
    for start in range(0, queries.shape[0], query_block):
        lists += results_to_lists(*index.search(np.asarray(queries[start : start + query_block], dtype=np.float32), k))
    return lists


def lists_by_id(lists: list[list[tuple[int, float]]], query_ids: Sequence[str], cand_ids: Sequence[str]) -> dict:
    return {q: [[cand_ids[c], s] for c, s in row] for q, row in zip(query_ids, lists)}
