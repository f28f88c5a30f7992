"""Encode a split into a retrieval directory, index it, search both directions, report recall.

The work behind `inference.py` (its module docstring describes the files written).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
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
from utils.config import ConfigError, RunConfig
from utils.distributed import barrier, init_distributed, shutdown
from utils.files import atomic_write_json
from utils.pipeline.evaluation import caption_image_indices, embed_batch
from utils.pipeline.retrieval_dir import (
    encode_split,
    lists_by_id,
    load_biencoder,
    open_split,
    pick_precision,
    resolve_split,
    topk_lists,
)
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
    CascadeStage,
    StageResult,
    cascade_search,
    parse_cascade,
)
from utils.search.indexes import (
    DenseIndex,
    build_index,
    index_embeddings,
    index_shards,
    split_index_spec,
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


def run_inference(config: RunConfig, checkpoint: str, out_dir: str | os.PathLike, precision_name: str = "auto",
        batch_size: int | None = None, shard_size: int = 65536) -> dict[str, Any]:
    """Encode, index, search and evaluate one split; see the module docstring for outputs.

    Returns:
        The info dict (also written to `info.json`), plus `recall` (rank 0; other ranks get
        an empty dict).
    """
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    split = resolve_split(config)
    try:
        kind, index_params = split_index_spec(config.retrieval.index)
    except ValueError as err:
        raise ConfigError(f"retrieval.index: {err}") from None
    # The spec's shape now; its dims against the model's levels once the model is loaded.
    parse_cascade(config.retrieval.cascade, config.retrieval.top_k)
    if not config.retrieval.exact_recall:
        if config.retrieval.coco_1k:
            raise ConfigError("retrieval.coco_1k ranks every caption of each fold: it needs retrieval.exact_recall=true")
        if config.retrieval.top_k < 10:
            raise ConfigError(
                f"retrieval.exact_recall=false reports R@1/5/10 from the search's lists: retrieval.top_k "
                f"must be at least 10, got {config.retrieval.top_k}"
            )
    if config.retrieval.index_train_size < 2:
        raise ConfigError(f"retrieval.index_train_size must be at least 2, got {config.retrieval.index_train_size}")
    env = init_distributed(config.train.distributed, config.train.device)
    out = Path(out_dir)
    shard_dir = out / SHARD_DIR
    try:
        # Inputs first: a wrong path or checkpoint fails before the output directory is touched.
        txt_db, img_db = open_split(split)
        img_ids = list(txt_db.img_order)
        txt_ids = list(txt_db.ids)
        if not img_ids or not txt_ids:
            raise ValueError(f"split {split.name}: {len(img_ids)} images and {len(txt_ids)} captions; nothing to evaluate")
        txt2img = caption_image_indices(txt_db, img_ids)
        t0 = time.perf_counter()
        model, fmt = load_biencoder(checkpoint, config)
        model.to(env.device)
        precision = pick_precision(precision_name, config.train.precision, env.device)
        timing["load_model_s"] = time.perf_counter() - t0
        dim = model.embedding_dim
        # Every level gets its own embeddings and index; a flat model has one level, `dim`.
        dims = list(model.level_dims)
        hierarchical = len(dims) > 1
        stages = parse_cascade(config.retrieval.cascade, config.retrieval.top_k, dims)
        model_config = model.config.to_dict()
        bs = batch_size or config.retrieval.inf_minibatch_size or config.train.val_batch_size
        workers = config.data.n_workers

        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # info.json marks a complete run: drop the old one first so a crash below never
            # leaves a stale marker next to half-replaced files.
            (out / INFO_FILE).unlink(missing_ok=True)
            remove_shard_dir(shard_dir)
        barrier()
        embed = _embed_levels if hierarchical else embed_batch
        encoders = {side: functools.partial(embed, model, side=side) for side in ("img", "txt")}
        for side, dataset, collate in (
            ("img", ImageEvalDataset(img_db, img_ids), image_eval_collate),
            ("txt", TextEvalDataset(txt_db), text_eval_collate),
        ):
            t0 = time.perf_counter()
            writer = _LevelShardWriters([
                EmbeddingShardWriter(shard_dir, f"{_shard_prefix(side, d, dim)}-r{env.rank}", d, shard_size) for d in dims
            ])
            encode_split(dataset, collate, dataset.lens, encoders[side], writer, bs, env.device, precision,
                         env.rank, env.world_size, workers, desc=f"encode {side}")
            writer.close()
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            timing[f"encode_{'images' if side == 'img' else 'texts'}_s"] = time.perf_counter() - t0
        # The towers are not needed for searching: free their (GPU) memory.
        del model, encoders
        barrier()
        if not env.is_main:
            return {}

        t0 = time.perf_counter()
        sizes = {"img": len(img_ids), "txt": len(txt_ids)}
        rank_parts = {
            (side, d): [shard_dir / f"{_shard_prefix(side, d, dim)}-r{r}-manifest.json" for r in range(env.world_size)]
            for side in sizes for d in dims
        }
        for (side, d), parts in rank_parts.items():
            merged = combine_manifests(parts, shard_dir / f"{_shard_prefix(side, d, dim)}-manifest.json")
            merge_shards(merged, out / _emb_file(side, d, dim), sizes[side])
            merged.unlink()
        timing["merge_s"] = time.perf_counter() - t0
        timing["encode_s"] = timing["encode_images_s"] + timing["encode_texts_s"]
        atomic_write_json(out / IDS_FILE, {"img_ids": img_ids, "txt_ids": txt_ids})

        # Index every level straight from the rank shards when the type allows it (memory: the
        # index plus one shard), else batch by batch from the merged memmap (HNSW).
        t0 = time.perf_counter()
        train_size = config.retrieval.index_train_size
        # Only the level searched first stays in memory; the others are written and dropped.
        search_dim = stages[0].dim if stages else dim
        indexes: dict[tuple[str, int], DenseIndex] = {}
        for (side, d), parts in rank_parts.items():
            index = build_index(kind, d, **index_params)
            if index.can_add_at:
                index_shards(index, parts, sizes[side], train_size=train_size)
            else:
                index_embeddings(index, np.load(out / _emb_file(side, d, dim), mmap_mode="r"), train_size=train_size)
            index.serialize(out / _index_file(side, d, dim))
            if d == search_dim:
                indexes[side, d] = index
            del index
            for part in parts:
                remove_shards(part)
        remove_shard_dir(shard_dir)
        timing["index_s"] = time.perf_counter() - t0

        def level(side: str, d: int) -> np.ndarray:
            return np.load(out / _emb_file(side, d, dim), mmap_mode="r")

        img_emb, txt_emb = level("img", dim), level("txt", dim)
        k = config.retrieval.top_k
        approx = kind != "flat"
        cascade_report: dict[str, Any] = {}
        t0 = time.perf_counter()
        if stages:
            # The cascade is the search: its last stage's lists go to topk.json.
            t2i_stages = _run_cascade(level, "txt", "img", stages, indexes if approx else None, env.device)
            i2t_stages = _run_cascade(level, "img", "txt", stages, indexes if approx else None, env.device)
            t2i = results_to_lists(t2i_stages[-1].scores[:, :k], t2i_stages[-1].ids[:, :k])
            i2t = results_to_lists(i2t_stages[-1].scores[:, :k], i2t_stages[-1].ids[:, :k])
        else:
            t2i = topk_lists(txt_emb, img_emb, k, indexes["img", dim] if approx else None, env.device)
            i2t = topk_lists(img_emb, txt_emb, k, indexes["txt", dim] if approx else None, env.device)
        timing["search_s"] = time.perf_counter() - t0
        if stages:
            # Evaluating each stage's kept lists is not part of the search time.
            cascade_report = _cascade_report(t2i_stages, i2t_stages, txt2img)
            for i, stage in enumerate(cascade_report["stages"], 1):
                timing[f"cascade_stage{i}_d{stage['dim']}_s"] = stage["seconds"]
            timing["cascade_s"] = cascade_report["seconds"]
        atomic_write_json(
            out / TOPK_FILE,
            {"text_to_image": lists_by_id(t2i, txt_ids, img_ids), "image_to_text": lists_by_id(i2t, img_ids, txt_ids)},
        )

        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        exact = config.retrieval.exact_recall
        if not exact:
            # Only the lists the search returned: no captions x images scoring.
            recall = _lists_recall(t2i, i2t, txt2img)
        elif config.retrieval.coco_1k:
            recall = fold_recall_from_embeddings(txt_emb, img_emb, txt2img, n_folds=5, device=env.device)
            extra["recall_full_split"] = recall_from_embeddings(txt_emb, img_emb, txt2img, device=env.device)
        else:
            recall = recall_from_embeddings(txt_emb, img_emb, txt2img, device=env.device)
        if approx and not stages and exact:
            extra["recall_index"] = _lists_recall(t2i, i2t, txt2img)
        if hierarchical and exact:
            # Each level alone, exact over the split (same protocol as the top level).
            recall["levels"] = {}
            for d in dims:
                t_level = time.perf_counter()
                if config.retrieval.coco_1k:
                    level_recall = fold_recall_from_embeddings(level("txt", d), level("img", d), txt2img, n_folds=5, device=env.device)
                else:
                    level_recall = recall_from_embeddings(level("txt", d), level("img", d), txt2img, device=env.device)
                recall["levels"][str(d)] = {**level_recall, "seconds": time.perf_counter() - t_level}
        if cascade_report:
            recall["cascade"] = cascade_report
        timing["recall_s"] = time.perf_counter() - t0
        atomic_write_json(out / RECALL_FILE, recall)

        timing["total_s"] = time.perf_counter() - t_start
        timing["images_per_s"] = len(img_ids) / max(timing["encode_images_s"], 1e-9)
        timing["captions_per_s"] = len(txt_ids) / max(timing["encode_texts_s"], 1e-9)
        info = {
            "split": split.to_dict(),
            "num_images": len(img_ids),
            "num_captions": len(txt_ids),
            "checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_format": fmt,
            # Lets `query` rebuild the towers around an original checkpoint.
            "model_config": model_config,
            "tokenizer": _tokenizer_path(config),
            "embedding_dim": dim,
            "level_dims": dims,
            "cascade": [stage.to_dict() for stage in stages],
            "index_type": kind,
            "top_k": k,
            "protocol": "coco_1k" if config.retrieval.coco_1k else "full" if exact else "search_lists",
            "device": str(env.device),
            "precision": precision.name,
            "world_size": env.world_size,
            **extra,
            "timing": timing,
        }
        atomic_write_json(out / INFO_FILE, info)
        _log_recall(recall, info)
        return {**info, "recall": recall}
    except BaseException:
        if env.is_main:
            remove_shard_dir(shard_dir)
        raise
    finally:
        shutdown(env)


def _embed_levels(model, batch: Mapping[str, Any], side: str) -> torch.Tensor:
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


def _shard_prefix(side: str, d: int, full_dim: int) -> str:
    return side if d == full_dim else f"{side}.d{d}"


def _emb_file(side: str, d: int, full_dim: int) -> str:
    name = IMG_EMB_FILE if side == "img" else TXT_EMB_FILE
    return name if d == full_dim else level_file(name, d)


def _index_file(side: str, d: int, full_dim: int) -> str:
    name = IMG_INDEX_FILE if side == "img" else TXT_INDEX_FILE
    return name if d == full_dim else level_file(name, d)


def _run_cascade(level, query_side: str, corpus_side: str, stages: Sequence[CascadeStage],
                 indexes: Mapping[tuple[str, int], DenseIndex] | None, device: torch.device) -> list[StageResult]:
    """One direction of the cascade over the level arrays `level(side, dim)`."""
    first_index = indexes[corpus_side, stages[0].dim] if indexes is not None else None
    return cascade_search(
        [level(query_side, s.dim) for s in stages], [level(corpus_side, s.dim) for s in stages],
        stages, first_index, device,
    )


def _lists_recall(t2i: list, i2t: list, txt2img) -> dict[str, Any]:
    """SPEC 7 recall of per-query [(row, score), ...] lists in both directions."""
    return recall_from_candidates(
        [[c for c, _ in row] for row in t2i], [[s for _, s in row] for row in t2i],
        [[c for c, _ in row] for row in i2t], [[s for _, s in row] for row in i2t],
        txt2img,
    )


def _cascade_report(t2i: Sequence[StageResult], i2t: Sequence[StageResult], txt2img) -> dict[str, Any]:
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
