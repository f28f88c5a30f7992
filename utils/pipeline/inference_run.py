"""Encode a split into a retrieval directory, index it, search both directions, report recall.

The work behind `inference.py` (its module docstring describes the files written), as the
named steps of `_InferenceRun`, in this order: resolve the split and open the inputs, load
the model, clear the output directory, encode both sides into rank shards; then on rank 0
merge the shards into the embedding files, build and write the indexes, search (flat or
cascade), evaluate recall and write `info.json`, last.

The model is used through the retrieval-model contract only (`model/retrieval.py`): its
`level_dims` (a flat model has one level, the full one), `embedding_dim`, the
`encode_*_levels` methods and `config.to_dict()`.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import (
    ImageEvalDataset,
    TextEvalDataset,
    image_eval_collate,
    text_eval_collate,
)
from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.retrieval import RetrievalModel
from utils.config import CascadeStage, RunConfig
from utils.distributed import DistEnv, barrier, init_distributed, shutdown
from utils.files import atomic_write_json
from utils.pipeline.evaluation import caption_image_indices
from utils.pipeline.retrieval_dir import (
    Split,
    encode_split,
    lists_by_id,
    load_biencoder,
    open_split,
    pick_precision,
    resolve_split,
    topk_lists,
)
from utils.precision import Precision
from utils.run_files import (
    IDS_FILE,
    IMG_EMB_FILE,
    IMG_INDEX_FILE,
    INFO_FILE,
    RECALL_FILE,
    SHARD_DIR,
    TOPK_FILE,
    TXT_EMB_FILE,
    TXT_INDEX_FILE,
    level_file,
)
from utils.search.cascade import (
    StageResult,
    cascade_search,
    check_levels,
)
from utils.search.indexes import (
    DenseIndex,
    build_index,
    index_embeddings,
    index_shards,
)
from utils.search.metrics import (
    fold_recall_from_embeddings,
    recall_from_candidates,
    recall_from_embeddings,
)
from utils.search.shards import (
    EmbeddingShardWriter,
    combine_manifests,
    merge_shards,
    remove_shard_dir,
    remove_shards,
)
from utils.search.topk import results_to_lists

logger = logging.getLogger("inference")

# Images first, then captions: the order sides are encoded, merged and indexed in.
_SIDES = ("img", "txt")
# Per query, [(corpus row, score), ...] best first.
_Lists = list[list[tuple[int, float]]]


def run_inference(config: RunConfig, checkpoint: str, out_dir: str | os.PathLike, precision_name: str = "auto",
        batch_size: int | None = None, shard_size: int = 65536) -> dict[str, Any]:
    """Encode, index, search and evaluate one split; see the module docstring for outputs.

    Returns:
        The info dict (also written to `info.json`), plus `recall` (rank 0; other ranks get
        an empty dict).
    """
    t_start = time.perf_counter()
    # The split's paths before any work; the retrieval settings were checked when the config loaded.
    split = resolve_split(config)
    env = init_distributed(config.train.distributed, config.train.device)
    run = _InferenceRun(config, split, checkpoint, env, out_dir, t_start)
    try:
        # Inputs first: a wrong path or checkpoint fails before the output directory is touched.
        run.open_inputs()
        model = run.load_model(precision_name)
        run.prepare_output()
        run.encode(model, batch_size, shard_size)
        # The towers are not needed for searching: free their (GPU) memory.
        del model
        barrier()
        if not env.is_main:
            return {}
        run.merge()
        indexes = run.build_indexes()
        searched = run.search(indexes)
        recall, extra = run.evaluate(searched)
        return run.write_info(recall, extra)
    except BaseException:
        if env.is_main:
            remove_shard_dir(run.shard_dir)
        raise
    finally:
        shutdown(env)


@dataclass
class _Searched:
    """The search's lists of both directions, and the cascade's per-stage report ({} without one)."""

    t2i: _Lists
    i2t: _Lists
    cascade: dict[str, Any]


class _InferenceRun:
    """One run's state, filled in step by step; each step records its `timing` entries.

    Every rank opens the inputs, loads the model and encodes its share; the steps from `merge`
    on run on rank 0 only.
    """

    # Set by `open_inputs`: the split, its canonical image and caption orders, and the image
    # row of every caption.
    txt_db: TxtDb
    img_db: ImgDb
    img_ids: list[str]
    txt_ids: list[str]
    txt2img: np.ndarray
    # Set by `load_model`.
    checkpoint_format: str
    precision: Precision
    full_dim: int
    dims: list[int]
    stages: list[CascadeStage]
    model_config: dict[str, Any]

    def __init__(self, config: RunConfig, split: Split, checkpoint: str, env: DistEnv,
                 out_dir: str | os.PathLike, t_start: float):
        self.config = config
        self.split = split
        self.checkpoint = checkpoint
        self.env = env
        self.out = Path(out_dir)
        self.shard_dir = self.out / SHARD_DIR
        self.t_start = t_start
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------ every rank

    def open_inputs(self) -> None:
        """Open the split's databases; its image and caption order and every caption's image."""
        self.txt_db, self.img_db = open_split(self.split)
        self.img_ids = list(self.txt_db.img_order)
        self.txt_ids = list(self.txt_db.ids)
        if not self.img_ids or not self.txt_ids:
            raise ValueError(
                f"split {self.split.name}: {len(self.img_ids)} images and {len(self.txt_ids)} captions; "
                "nothing to evaluate"
            )
        self.txt2img = caption_image_indices(self.txt_db, self.img_ids)

    def load_model(self, precision_name: str) -> RetrievalModel:
        """The checkpoint's model on this rank's device; records its levels and the cascade.

        The model is returned, not kept, so that the caller can free it after encoding.
        """
        t0 = time.perf_counter()
        model, self.checkpoint_format = load_biencoder(self.checkpoint, self.config)
        model.to(self.env.device)
        self.precision = pick_precision(precision_name, self.config.train.precision, self.env.device)
        self.timing["load_model_s"] = time.perf_counter() - t0
        self.full_dim = model.embedding_dim
        # Every level gets its own embeddings and index; a flat model has one level, the full one.
        self.dims = list(model.level_dims)
        self.stages = self.config.retrieval.cascade
        check_levels(self.stages, self.dims)
        self.model_config = model.config.to_dict()
        return model

    def prepare_output(self) -> None:
        """Rank 0 creates the output directory and drops a previous run's marker and shards."""
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            # info.json marks a complete run: drop the old one first so a crash below never
            # leaves a stale marker next to half-replaced files.
            (self.out / INFO_FILE).unlink(missing_ok=True)
            remove_shard_dir(self.shard_dir)
        barrier()

    def encode(self, model: RetrievalModel, batch_size: int | None, shard_size: int) -> None:
        """Encode this rank's share of the images, then of the captions, into its rank shards:
        every level's columns go to that level's shard writer."""
        config, env = self.config, self.env
        bs = batch_size or config.retrieval.inf_minibatch_size or config.train.val_batch_size
        for side, dataset, collate in (
            ("img", ImageEvalDataset(self.img_db, self.img_ids), image_eval_collate),
            ("txt", TextEvalDataset(self.txt_db), text_eval_collate),
        ):
            t0 = time.perf_counter()
            writer = _LevelShardWriters([
                EmbeddingShardWriter(self.shard_dir, f"{self._shard_prefix(side, d)}-r{env.rank}", d, shard_size)
                for d in self.dims
            ])
            encode_split(dataset, collate, dataset.lens, functools.partial(_embed_levels, model, side=side), writer,
                         bs, env.device, self.precision, env.rank, env.world_size, config.data.n_workers,
                         desc=f"encode {side}")
            writer.close()
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            self.timing[f"encode_{'images' if side == 'img' else 'texts'}_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------ rank 0

    def merge(self) -> None:
        """Merge every level's rank shards into its canonical-order embedding file; write ids.json."""
        t0 = time.perf_counter()
        for side, d in self._levels():
            merged = combine_manifests(self._rank_manifests(side, d),
                                       self.shard_dir / f"{self._shard_prefix(side, d)}-manifest.json")
            merge_shards(merged, self.out / self._emb_file(side, d), self._num_rows(side))
            merged.unlink()
        self.timing["merge_s"] = time.perf_counter() - t0
        # The encoding total, recorded here: info.json's timing keys keep their order.
        self.timing["encode_s"] = self.timing["encode_images_s"] + self.timing["encode_texts_s"]
        atomic_write_json(self.out / IDS_FILE, {"img_ids": self.img_ids, "txt_ids": self.txt_ids})

    def build_indexes(self) -> dict[tuple[str, int], DenseIndex]:
        """Build and write every level's index, then delete the shards.

        Each index is filled straight from the rank shards when its type allows it (memory:
        the index plus one shard), else batch by batch from the merged memmap (HNSW).

        Returns:
            The indexes of the level searched first, by (side, dim); the others are written
            and dropped.
        """
        t0 = time.perf_counter()
        train_size = self.config.retrieval.index_train_size
        search_dim = self.stages[0].dim if self.stages else self.full_dim
        indexes: dict[tuple[str, int], DenseIndex] = {}
        for side, d in self._levels():
            parts = self._rank_manifests(side, d)
            index = build_index(self.config.retrieval.index.type, d, **self.config.retrieval.index.params)
            if index.can_add_at:
                index_shards(index, parts, self._num_rows(side), train_size=train_size)
            else:
                index_embeddings(index, self._embeddings(side, d), train_size=train_size)
            index.serialize(self.out / self._index_file(side, d))
            if d == search_dim:
                indexes[side, d] = index
            del index
            for part in parts:
                remove_shards(part)
        remove_shard_dir(self.shard_dir)
        self.timing["index_s"] = time.perf_counter() - t0
        return indexes

    def search(self, indexes: Mapping[tuple[str, int], DenseIndex]) -> _Searched:
        """Top-k lists of both directions, written to topk.json.

        Without a cascade, exact search over the full level (a flat index) or the index's own
        search (an approximate one); with one, the cascade's last stage.
        """
        img_emb, txt_emb = self._embeddings("img", self.full_dim), self._embeddings("txt", self.full_dim)
        k = self.config.retrieval.top_k
        first_indexes = indexes if self._approximate else None
        cascade_report: dict[str, Any] = {}
        t0 = time.perf_counter()
        if self.stages:
            # The cascade is the search: its last stage's lists go to topk.json.
            t2i_stages = self._run_cascade("txt", "img", first_indexes)
            i2t_stages = self._run_cascade("img", "txt", first_indexes)
            t2i = results_to_lists(t2i_stages[-1].scores[:, :k], t2i_stages[-1].ids[:, :k])
            i2t = results_to_lists(i2t_stages[-1].scores[:, :k], i2t_stages[-1].ids[:, :k])
        else:
            img_index = indexes["img", self.full_dim] if self._approximate else None
            txt_index = indexes["txt", self.full_dim] if self._approximate else None
            t2i = topk_lists(txt_emb, img_emb, k, img_index, self.env.device)
            i2t = topk_lists(img_emb, txt_emb, k, txt_index, self.env.device)
        self.timing["search_s"] = time.perf_counter() - t0
        if self.stages:
            # Evaluating each stage's kept lists is not part of the search time.
            cascade_report = _cascade_report(t2i_stages, i2t_stages, self.txt2img)
            for i, stage in enumerate(cascade_report["stages"], 1):
                self.timing[f"cascade_stage{i}_d{stage['dim']}_s"] = stage["seconds"]
            self.timing["cascade_s"] = cascade_report["seconds"]
        atomic_write_json(
            self.out / TOPK_FILE,
            {
                "text_to_image": lists_by_id(t2i, self.txt_ids, self.img_ids),
                "image_to_text": lists_by_id(i2t, self.img_ids, self.txt_ids),
            },
        )
        return _Searched(t2i, i2t, cascade_report)

    def evaluate(self, searched: _Searched) -> tuple[dict[str, Any], dict[str, Any]]:
        """SPEC 7 recall, written to recall.json.

        Exact over the split (or its COCO 1K folds) with `retrieval.exact_recall`, else of the
        search's lists only; a hierarchy adds each level alone, a cascade its stages.

        Returns:
            (recall, the extra recalls info.json records).
        """
        retrieval, device, txt2img = self.config.retrieval, self.env.device, self.txt2img
        img_emb, txt_emb = self._embeddings("img", self.full_dim), self._embeddings("txt", self.full_dim)
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if not retrieval.exact_recall:
            # Only the lists the search returned: no captions x images scoring.
            recall = _lists_recall(searched.t2i, searched.i2t, txt2img)
        elif retrieval.coco_1k:
            recall = fold_recall_from_embeddings(txt_emb, img_emb, txt2img, n_folds=5, device=device)
            extra["recall_full_split"] = recall_from_embeddings(txt_emb, img_emb, txt2img, device=device)
        else:
            recall = recall_from_embeddings(txt_emb, img_emb, txt2img, device=device)
        if self._approximate and not self.stages and retrieval.exact_recall:
            extra["recall_index"] = _lists_recall(searched.t2i, searched.i2t, txt2img)
        if len(self.dims) > 1 and retrieval.exact_recall:
            # Each level alone, exact over the split (same protocol as the top level).
            recall["levels"] = {}
            for d in self.dims:
                t_level = time.perf_counter()
                txt_level, img_level = self._embeddings("txt", d), self._embeddings("img", d)
                if retrieval.coco_1k:
                    level_recall = fold_recall_from_embeddings(txt_level, img_level, txt2img, n_folds=5, device=device)
                else:
                    level_recall = recall_from_embeddings(txt_level, img_level, txt2img, device=device)
                recall["levels"][str(d)] = {**level_recall, "seconds": time.perf_counter() - t_level}
        if searched.cascade:
            recall["cascade"] = searched.cascade
        self.timing["recall_s"] = time.perf_counter() - t0
        atomic_write_json(self.out / RECALL_FILE, recall)
        return recall, extra

    def write_info(self, recall: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        """Write info.json (last: it marks a complete run) and log the recall.

        Returns:
            The info dict plus `recall`.
        """
        retrieval, timing = self.config.retrieval, self.timing
        timing["total_s"] = time.perf_counter() - self.t_start
        timing["images_per_s"] = len(self.img_ids) / max(timing["encode_images_s"], 1e-9)
        timing["captions_per_s"] = len(self.txt_ids) / max(timing["encode_texts_s"], 1e-9)
        info = {
            "split": self.split.to_dict(),
            "num_images": len(self.img_ids),
            "num_captions": len(self.txt_ids),
            "checkpoint": str(Path(self.checkpoint).resolve()),
            "checkpoint_format": self.checkpoint_format,
            # Lets `query` rebuild the towers around an original checkpoint.
            "model_config": self.model_config,
            "tokenizer": _tokenizer_path(self.config),
            "embedding_dim": self.full_dim,
            "level_dims": self.dims,
            "cascade": [stage.to_dict() for stage in self.stages],
            "index_type": self.config.retrieval.index.type,
            "top_k": retrieval.top_k,
            "protocol": "coco_1k" if retrieval.coco_1k else "full" if retrieval.exact_recall else "search_lists",
            "device": str(self.env.device),
            "precision": self.precision.name,
            "world_size": self.env.world_size,
            **extra,
            "timing": timing,
        }
        atomic_write_json(self.out / INFO_FILE, info)
        _log_recall(recall, info)
        return {**info, "recall": recall}

    # ------------------------------------------------------------ files and levels

    @property
    def _approximate(self) -> bool:
        """Whether search goes through the index (any type but flat) rather than exact top-k."""
        return self.config.retrieval.index.type != "flat"

    def _levels(self) -> list[tuple[str, int]]:
        """(side, dim) of every level of both sides: the images' levels, then the captions'."""
        return [(side, d) for side in _SIDES for d in self.dims]

    def _num_rows(self, side: str) -> int:
        return len(self.img_ids) if side == "img" else len(self.txt_ids)

    def _shard_prefix(self, side: str, d: int) -> str:
        return side if d == self.full_dim else f"{side}.d{d}"

    def _rank_manifests(self, side: str, d: int) -> list[Path]:
        """The shard manifest every rank wrote for one level of one side."""
        return [
            self.shard_dir / f"{self._shard_prefix(side, d)}-r{r}-manifest.json" for r in range(self.env.world_size)
        ]

    def _emb_file(self, side: str, d: int) -> str:
        name = IMG_EMB_FILE if side == "img" else TXT_EMB_FILE
        return name if d == self.full_dim else level_file(name, d)

    def _index_file(self, side: str, d: int) -> str:
        name = IMG_INDEX_FILE if side == "img" else TXT_INDEX_FILE
        return name if d == self.full_dim else level_file(name, d)

    def _embeddings(self, side: str, d: int) -> np.ndarray:
        """One level's merged embeddings, memory-mapped."""
        return np.load(self.out / self._emb_file(side, d), mmap_mode="r")

    def _run_cascade(self, query_side: str, corpus_side: str,
                     indexes: Mapping[tuple[str, int], DenseIndex] | None) -> list[StageResult]:
        """One direction of the cascade; its first stage searches `indexes` when given."""
        stages = self.stages
        first_index = indexes[corpus_side, stages[0].dim] if indexes is not None else None
        queries = [self._embeddings(query_side, s.dim) for s in stages]
        corpus = [self._embeddings(corpus_side, s.dim) for s in stages]
        return cascade_search(queries, corpus, stages, first_index, self.env.device)


def _embed_levels(model: RetrievalModel, batch: Mapping[str, Any], side: str) -> torch.Tensor:
    """(B, sum(level dims)) embeddings of every level side by side (`_LevelShardWriters` splits them)."""
    if side == "txt":
        levels = model.encode_text_levels(batch["txt"]["input_ids"], batch["txt"]["attention_mask"])
    else:
        img = batch["img"]
        levels = model.encode_image_levels(img["img_feat"], img["img_pos"], img["img_mask"])
    return torch.cat(levels, dim=1)


class _LevelShardWriters:
    """One shard writer per level, fed the levels' columns side by side."""

    def __init__(self, writers: Sequence[EmbeddingShardWriter]):
        self.writers = list(writers)

    def add(self, positions, vectors: torch.Tensor) -> None:
        for writer, part in zip(self.writers, vectors.split([w.dim for w in self.writers], dim=1)):
            writer.add(positions, part)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _lists_recall(t2i: _Lists, i2t: _Lists, txt2img: np.ndarray) -> dict[str, Any]:
    """SPEC 7 recall of per-query [(row, score), ...] lists in both directions."""
    return recall_from_candidates(
        [[c for c, _ in row] for row in t2i], [[s for _, s in row] for row in t2i],
        [[c for c, _ in row] for row in i2t], [[s for _, s in row] for row in i2t],
        txt2img,
    )


def _cascade_report(t2i: Sequence[StageResult], i2t: Sequence[StageResult], txt2img: np.ndarray) -> dict[str, Any]:
    """recall.json's `cascade` entry: per stage its spec, recall of its kept lists and seconds."""
    stages = []
    for a, b in zip(t2i, i2t):
        stages.append({
            **a.stage.to_dict(),
            "seconds": a.seconds + b.seconds,
            "text_to_image_s": a.seconds,
            "image_to_text_s": b.seconds,
            "recall": _lists_recall(results_to_lists(a.scores, a.ids), results_to_lists(b.scores, b.ids), txt2img),
        })
    return {"stages": stages, "seconds": sum(stage["seconds"] for stage in stages)}


def _tokenizer_path(config: RunConfig) -> str | None:
    m = config.model
    if m.tokenizer:
        return str(Path(m.tokenizer).resolve())
    if m.txt_model_config and Path(m.txt_model_config).is_dir():
        return str(Path(m.txt_model_config).resolve())
    return None


def _log_recall(recall: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    tr, ir = recall["image_to_text"], recall["text_to_image"]
    logger.info(
        "%s split (%d images, %d captions, %s): TR %.2f/%.2f/%.2f IR %.2f/%.2f/%.2f RSUM %.2f",
        info["split"]["name"], info["num_images"], info["num_captions"], info["protocol"],
        tr["R@1"], tr["R@5"], tr["R@10"], ir["R@1"], ir["R@5"], ir["R@10"], recall["rsum"],
    )
