"""Encode a split into a retrieval directory, index it, search both directions, report recall.

The work behind `inference.py` (its module docstring describes the files written).
"""
from __future__ import annotations

import functools
import json
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
)
from utils.search.indexes import (
    EmbeddingShardWriter,
    build_index,
    index_embeddings,
    merge_shards,
    remove_shards,
    split_index_spec,
)
from utils.search.metrics import (
    fold_recall_from_embeddings,
    recall_from_candidates,
    recall_from_embeddings,
)

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
        dim = model.txt_model.out_dim
        model_config = model.config.to_dict()
        bs = batch_size or config.retrieval.inf_minibatch_size or config.train.val_batch_size
        workers = config.data.n_workers

        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # info.json marks a complete run: drop the old one first so a crash below never
            # leaves a stale marker next to half-replaced files.
            (out / INFO_FILE).unlink(missing_ok=True)
            _remove_shard_dir(shard_dir)
        barrier()
        encoders = {side: functools.partial(embed_batch, model, side=side) for side in ("img", "txt")}
        for side, dataset, collate in (
            ("img", ImageEvalDataset(img_db, img_ids), image_eval_collate),
            ("txt", TextEvalDataset(txt_db), text_eval_collate),
        ):
            t0 = time.perf_counter()
            writer = EmbeddingShardWriter(shard_dir, f"{side}-r{env.rank}", dim, shard_size)
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
        for side, n in (("img", len(img_ids)), ("txt", len(txt_ids))):
            parts = [shard_dir / f"{side}-r{r}-manifest.json" for r in range(env.world_size)]
            merged = _merge_rank_manifests(parts, shard_dir / f"{side}-manifest.json")
            merge_shards(merged, out / (IMG_EMB_FILE if side == "img" else TXT_EMB_FILE), n)
            for part in parts:
                remove_shards(part)
            merged.unlink()
        _remove_shard_dir(shard_dir)
        timing["merge_s"] = time.perf_counter() - t0
        timing["encode_s"] = timing["encode_images_s"] + timing["encode_texts_s"]

        img_emb = np.load(out / IMG_EMB_FILE, mmap_mode="r")
        txt_emb = np.load(out / TXT_EMB_FILE, mmap_mode="r")
        atomic_write_json(out / IDS_FILE, {"img_ids": img_ids, "txt_ids": txt_ids})

        t0 = time.perf_counter()
        img_index = index_embeddings(build_index(kind, dim, **index_params), img_emb)
        txt_index = index_embeddings(build_index(kind, dim, **index_params), txt_emb)
        img_index.serialize(out / IMG_INDEX_FILE)
        txt_index.serialize(out / TXT_INDEX_FILE)
        timing["index_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        k = config.retrieval.top_k
        approx = kind != "flat"
        t2i = topk_lists(txt_emb, img_emb, k, img_index if approx else None, env.device)
        i2t = topk_lists(img_emb, txt_emb, k, txt_index if approx else None, env.device)
        timing["search_s"] = time.perf_counter() - t0
        atomic_write_json(
            out / TOPK_FILE,
            {"text_to_image": lists_by_id(t2i, txt_ids, img_ids), "image_to_text": lists_by_id(i2t, img_ids, txt_ids)},
        )

        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        full = recall_from_embeddings(txt_emb, img_emb, txt2img, device=env.device)
        if config.retrieval.coco_1k:
            recall = fold_recall_from_embeddings(txt_emb, img_emb, txt2img, n_folds=5, device=env.device)
            extra["recall_full_split"] = full
        else:
            recall = full
        if approx:
            extra["recall_index"] = recall_from_candidates(
                [[c for c, _ in row] for row in t2i], [[s for _, s in row] for row in t2i],
                [[c for c, _ in row] for row in i2t], [[s for _, s in row] for row in i2t],
                txt2img,
            )
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
            "index_type": kind,
            "top_k": k,
            "protocol": "coco_1k" if config.retrieval.coco_1k else "full",
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
            _remove_shard_dir(shard_dir)
        raise
    finally:
        shutdown(env)


def _remove_shard_dir(shard_dir: Path) -> None:
    """Delete a shard directory (left by a crashed run or this one's merge)."""
    if shard_dir.is_dir():
        for stale in shard_dir.iterdir():
            stale.unlink()
        shard_dir.rmdir()


def _merge_rank_manifests(parts: Sequence[Path], target: Path) -> Path:
    """One manifest listing the shards of every rank (shard names stay unique per rank)."""
    shards, total, dim = [], 0, None
    for part in parts:
        meta = json.loads(part.read_text())
        shards += meta["shards"]
        total += meta["total"]
        dim = meta["dim"]
    atomic_write_json(target, {"dim": dim, "total": total, "shards": shards})
    return target


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
