"""Encode an evaluation split, build indexes, search both directions, report recall.

    python inference.py --config CONFIG --checkpoint CKPT --output_dir OUT [key=value ...]
    python inference.py query --index_dir OUT --checkpoint CKPT "two dogs running on a beach"
    python inference.py query --index_dir OUT --image NAME

CONFIG is one of our YAML configs or an original LightningDOT eval / fine-tuning JSON. The
split is `data.test_txt_db` / `data.test_img_db`, or the `val_*` pair with
`retrieval.eval_split=val`. CKPT is one of our checkpoints (the model is rebuilt from it
alone) or an original one (`biencoder.*.pt` with `model_dict`, or a pre-training
`model_step_N.pt` with `bert.` keys), in which case the towers come from the config's
`txt_model_config`, `img_model_config` and `project_dim`.

Written to OUT, each file atomically, `info.json` last (its presence marks a complete run):

* `img_emb.npy` (num_images, D) float32, images in the key order of the split's
  `img2txts.json`; `txt_emb.npy` (num_captions, D) float32, captions in `id2len.json` order
  after the `max_txt_len` filter;
* `ids.json`: `{"img_ids": [...], "txt_ids": [...]}`, the row order of both arrays;
* `img.index`, `txt.index`: faiss indexes (`retrieval.index`: type and parameters) of the image and caption
  embeddings; ids are row numbers of the arrays above;
* `topk.json`: `{"text_to_image": {caption id: [[image name, score], ...]},
  "image_to_text": {image name: [[caption id, score], ...]}}`, keyed by the QUERY, at most
  `retrieval.top_k` candidates per query, best first, never padded;
* `recall.json`: SPEC 7 recall (`utils/search/metrics.py` layout) of the exact dot-product ranking
  over the whole split, or the COCO 1K 5-fold average when `retrieval.coco_1k`;
* `info.json`: the split (paths, counts, reading parameters), the checkpoint, the bi-encoder
  config, the protocol, extra recalls (`recall_full_split` under COCO 1K, `recall_index` for
  an approximate index: recall of its top-k lists) and `timing` in seconds.

Images and captions are encoded in batches sorted by length (longest first, so an
out-of-memory error shows at once), without gradient, under autocast on a GPU; every batch
carries its canonical positions, and the embeddings go through shards that are merged in
canonical order, so neither the order nor the corpus size depends on memory. Under torchrun
every rank encodes a share and rank 0 merges, searches and writes.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.config import (
    ConfigError,
    RunConfig,
    add_config_args,
    config_from_args,
)
from utils.errors import DataKeyError, MissingPathError, UsageError, run_cli
from utils.files import atomic_write_json
from utils.original_programs import LIGHTNINGDOT_EVAL_ITM
from utils.pipeline.evaluation import embed_batch
from utils.pipeline.retrieval_dir import (
    IDS_FILE,
    IMG_EMB_FILE,
    IMG_INDEX_FILE,
    INFO_FILE,
    PRECISIONS,
    RECALL_FILE,
    SHARD_DIR,
    TOPK_FILE,
    TXT_EMB_FILE,
    TXT_INDEX_FILE,
    caption_image_indices,
    encode_split,
    lists_by_id,
    load_biencoder,
    open_split,
    pick_precision,
    read_json,
    resolve_split,
    topk_lists,
)

logger = logging.getLogger("inference")


# ---------------------------------------------------------------- main run


def build_parser() -> argparse.ArgumentParser:
    """Command line of the encode / index / evaluate run."""
    parser = argparse.ArgumentParser(
        description="Encode a split, build indexes, search and evaluate (see module docstring).",
        epilog="Search a built index: inference.py query --help",
    )
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or an original one")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: autocast (bf16/fp16) on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--batch_size", type=int, default=None,
                        help="encoding batch (default retrieval.inf_minibatch_size or train.val_batch_size)")
    parser.add_argument("--shard_size", type=int, default=65536, help="embeddings per shard file")
    return parser


def run(config: RunConfig, checkpoint: str, out_dir: str | os.PathLike, precision_name: str = "auto",
        batch_size: int | None = None, shard_size: int = 65536) -> dict[str, Any]:
    """Encode, index, search and evaluate one split; see the module docstring for outputs.

    Returns:
        The info dict (also written to `info.json`), plus `recall` (rank 0; other ranks get
        an empty dict).
    """
    from data.datasets import (
        ImageEvalDataset,
        TextEvalDataset,
        image_eval_collate,
        text_eval_collate,
    )
    from utils.distributed import barrier, init_distributed, shutdown
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


# ---------------------------------------------------------------- query mode


def build_query_parser() -> argparse.ArgumentParser:
    """Command line of `inference.py query`."""
    parser = argparse.ArgumentParser(
        prog="inference.py query",
        description="Search a built index: a caption for images, or (--image) an image for captions.",
    )
    parser.add_argument("--index_dir", required=True, help="output directory of an inference run")
    parser.add_argument("--checkpoint", default=None, help="bi-encoder checkpoint (text queries)")
    parser.add_argument("--tokenizer", default=None, help="local tokenizer directory (text queries)")
    parser.add_argument("--image", default=None, help="image name: list its best captions")
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("text", nargs="?", default=None, help="the caption to search images for")
    return parser


def _load_tokenizer(path: str | None):
    if not path:
        raise ConfigError(
            "a text query needs a tokenizer: pass --tokenizer DIR (a local HF tokenizer "
            "directory with vocab.txt / tokenizer.json) or set model.tokenizer in the config"
        )
    if not Path(path).is_dir():
        raise MissingPathError(f"tokenizer directory {path} does not exist")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def query(argv: Sequence[str]) -> dict[str, Any]:
    """The `query` sub-command; prints the hits and returns `{"query", "results"}`."""
    from utils.search.indexes import load_index
    from utils.search.topk import results_to_lists

    args = build_query_parser().parse_args(list(argv))
    index_dir = Path(args.index_dir)
    info = read_json(index_dir / INFO_FILE, "retrieval info")
    ids = read_json(index_dir / IDS_FILE, "ids file")
    if (args.image is None) == (args.text is None):
        raise UsageError("give either a caption to search for, or --image NAME (not both)")
    if args.image is not None:
        if args.image not in ids["img_ids"]:
            raise DataKeyError(f"image {args.image!r} is not in {index_dir / IDS_FILE}")
        row = ids["img_ids"].index(args.image)
        vector = np.load(index_dir / IMG_EMB_FILE, mmap_mode="r")[row : row + 1]
        index = load_index(index_dir / TXT_INDEX_FILE)
        names = ids["txt_ids"]
        label = f"image {args.image}"
    else:
        if args.checkpoint is None:
            raise ConfigError("a text query needs --checkpoint (the bi-encoder that built the index)")
        tokenizer = _load_tokenizer(args.tokenizer or info.get("tokenizer"))
        model, _ = load_biencoder(args.checkpoint, model_config=info.get("model_config"))
        max_len = info["split"]["max_txt_len"]
        tokens = tokenizer(args.text, add_special_tokens=False)["input_ids"]
        tokens = tokens[:max_len] if max_len and max_len > 0 else tokens
        input_ids = torch.tensor([[tokenizer.cls_token_id, *tokens, tokenizer.sep_token_id]])
        with torch.inference_mode():
            vector = model.encode_text(input_ids, torch.ones_like(input_ids)).float().numpy()
        index = load_index(index_dir / IMG_INDEX_FILE)
        names = ids["img_ids"]
        label = f"caption {args.text!r}"
    hits = results_to_lists(*index.search(np.asarray(vector, dtype=np.float32), args.top_k))[0]
    results = [[names[i], s] for i, s in hits]
    texts = _caption_texts(info, [name for name, _ in results]) if args.image is not None else {}
    print(f"top {len(results)} for {label}:")
    for rank, (name, score) in enumerate(results, 1):
        text = f"  {texts[name]}" if name in texts else ""
        print(f"{rank:3d}. {score:9.4f}  {name}{text}")
    return {"query": args.image if args.image is not None else args.text, "results": results}


def _caption_texts(info: Mapping[str, Any], txt_ids: Sequence[str]) -> dict[str, str]:
    """Caption id -> raw text for `txt_ids`, from the split's txt_db when still readable."""
    from data.txt_db import TxtDb

    try:
        db = TxtDb(info["split"]["txt_db"], info["split"]["max_txt_len"])
        records = {t: db.record(t) for t in txt_ids}
    except (FileNotFoundError, ValueError, KeyError):
        return {}
    out = {}
    for txt_id, record in records.items():
        raw = record.get("raw") or record.get("toked_caption")
        if isinstance(raw, str):
            out[txt_id] = raw
    return out


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run inference (or `query ...`); returns the info dict with `recall`, or the hits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "query":
        return query(argv[1:])
    args = build_parser().parse_args(argv)
    out_dir = args.output_dir
    config = config_from_args(args, LIGHTNINGDOT_EVAL_ITM)
    if out_dir is None:
        out_dir = config.output_dir
    return run(config, args.checkpoint, out_dir, args.precision, args.batch_size, args.shard_size)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli(main))
