"""Accuracy against speed on one split: two bi-encoders and a cross-encoder ranking all pairs.

    python scripts/compare_systems.py --config configs/demo/finetune.yaml \
        --lightningdot runs/demo/finetune/ckpt/biencoder.best.pt \
        --vldeformer runs/demo/vldeformer/ckpt/biencoder.best.pt \
        --cross_encoder runs/demo/reranker/ckpt/cross_encoder.best.pt \
        [--num_images 100] [--num_captions 500] [--output compare.json] [key=value ...]

On the first `num_images` images of the split (`retrieval.eval_split`, canonical order) and
at most `num_captions` of their captions, each system ranks every caption against every
image: the LightningDOT and VLDeformer bi-encoders by the dot product of embeddings computed
once per caption and per image, the cross-encoder by one UNITER pass per (caption, image)
pair (no bi-encoder pre-selection). Prints one table (recall in both directions, RSUM, wall
time of encoding, of scoring and in all) and writes it as JSON. Any system may be left out.
The subset keeps the cross-encoder affordable on a CPU: its cost grows with captions x
images, the bi-encoders' with captions + images.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.datasets import (
    ImageEvalDataset,
    TextEvalDataset,
    image_eval_collate,
    text_eval_collate,
)
from utils.config import RunConfig, add_config_args
from utils.errors import ConfigError, run_cli
from utils.files import atomic_write_json
from utils.pipeline.evaluation import caption_image_indices, embed_batch
from utils.pipeline.reranking import (
    CrossEncoderScorer,
    check_vocabulary,
    load_cross_encoder,
)
from utils.pipeline.retrieval_dir import (
    load_biencoder,
    open_split,
    pick_precision,
    resolve_split,
)
from utils.pipeline.run_config import run_config_from_args
from utils.search.metrics import recall_from_scores

logger = logging.getLogger("compare_systems")

KS = (1, 5, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: run config (data, batch sizes), the three checkpoints, the subset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--lightningdot", help="LightningDOT bi-encoder checkpoint")
    parser.add_argument("--vldeformer", help="VLDeformer bi-encoder checkpoint")
    parser.add_argument("--cross_encoder", help="cross-encoder checkpoint (ours, or an original UNITER file)")
    parser.add_argument("--cross_encoder_config", help="UNITER JSON config of an original cross-encoder file")
    parser.add_argument("--num_images", type=int, default=100, help="first N images of the split")
    parser.add_argument("--num_captions", type=int, default=500, help="at most this many of their captions")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's val_batch_size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--output", help="write the table as JSON here")
    return parser.parse_args(argv)


def select_subset(txt_db, num_images: int, num_captions: int) -> tuple[list[str], list[int], np.ndarray]:
    """The first `num_images` images in canonical order, and the first `num_captions`
    captions (in `txt_db.ids` order) belonging to them.

    Returns:
        (image names, caption rows of `txt_db.ids`, image column of every chosen caption).
    """
    if num_images <= 0 or num_captions <= 0:
        raise ConfigError("--num_images and --num_captions must be positive")
    images = list(txt_db.img_order)[:num_images]
    all_txt2img = caption_image_indices(txt_db, list(txt_db.img_order))
    rows = [t for t in range(len(txt_db.ids)) if all_txt2img[t] < len(images)][:num_captions]
    return images, rows, all_txt2img[rows]


def _embed(model, dataset, collate: Callable, side: str, batch_size: int, device: torch.device, precision) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    out = []
    with torch.inference_mode():
        for batch in loader:
            batch = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v)
                     for k, v in batch.items()}
            with precision.autocast():
                out.append(embed_batch(model, batch, side).float())
    return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_biencoder(checkpoint: str, cfg: RunConfig, txt_db, img_db, images: Sequence[str], rows: Sequence[int],
                  batch_size: int, device: torch.device, precision) -> tuple[np.ndarray, dict[str, float]]:
    """(captions x images) scores of a bi-encoder and its timings (encode, score)."""
    model, _ = load_biencoder(checkpoint, cfg)
    model.to(device)
    _sync(device)
    t0 = time.perf_counter()
    txt = _embed(model, torch.utils.data.Subset(TextEvalDataset(txt_db), list(rows)), text_eval_collate, "txt",
                 batch_size, device, precision)
    img = _embed(model, ImageEvalDataset(img_db, images), image_eval_collate, "img", batch_size, device, precision)
    _sync(device)
    t1 = time.perf_counter()
    scores = (txt @ img.t()).cpu().numpy()
    t2 = time.perf_counter()
    return scores, {"encode_s": t1 - t0, "score_s": t2 - t1}


def run_cross_encoder(checkpoint: str, model_config: str | None, cfg: RunConfig, txt_db, img_db,
                      images: Sequence[str], rows: Sequence[int], batch_size: int, device: torch.device,
                      precision) -> tuple[np.ndarray, dict[str, float]]:
    """(captions x images) scores of the cross-encoder over every pair, and its timing."""
    model, _ = load_cross_encoder(checkpoint, model_config, cfg)
    check_vocabulary(model, txt_db, checkpoint)
    model.to(device)
    scorer = CrossEncoderScorer(model, txt_db, img_db, batch_size, device, precision)
    txt_ids = [txt_db.ids[r] for r in rows]
    pairs = [(t, i) for t in txt_ids for i in images]
    _sync(device)
    t0 = time.perf_counter()
    scores = scorer(pairs).reshape(len(txt_ids), len(images))
    _sync(device)
    return scores, {"encode_s": 0.0, "score_s": time.perf_counter() - t0}


def chance_row(num_images: int, txt2img: np.ndarray) -> dict[str, Any]:
    """Expected recall of random scores on the subset, in percent."""
    t2i = {f"R@{k}": 100.0 * min(1.0, k / num_images) for k in KS}
    counts = np.bincount(txt2img, minlength=num_images)
    n_txt = len(txt2img)
    i2t = {}
    for k in KS:
        # An image with c captions among n misses all of them in a random top k.
        miss = [np.prod([(n_txt - c - j) / (n_txt - j) for j in range(min(k, n_txt))]) for c in counts]
        i2t[f"R@{k}"] = 100.0 * (1.0 - float(np.mean(miss)))
    return {"text_to_image": t2i, "image_to_text": i2t, "rsum": sum(t2i.values()) + sum(i2t.values())}


def format_table(rows: dict[str, dict[str, Any]], num_images: int, num_captions: int) -> str:
    """Markdown table: TR = image->text (text retrieval), IR = text->image."""
    head = ("| system | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM | "
            "encode s | score s | total s |")
    lines = [f"{num_images} images x {num_captions} captions; every caption ranked against every image",
             head, "|" + "---|" * 11]
    for name, row in rows.items():
        cells = [f"{row['image_to_text'][f'R@{k}']:.2f}" for k in KS]
        cells += [f"{row['text_to_image'][f'R@{k}']:.2f}" for k in KS]
        cells.append(f"{row['rsum']:.2f}")
        timing = row.get("timing")
        cells += ([f"{timing['encode_s']:.2f}", f"{timing['score_s']:.2f}",
                   f"{timing['encode_s'] + timing['score_s']:.2f}"] if timing else ["", "", ""])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compare the systems given; returns the table as a dict (also printed / written)."""
    args = parse_args(argv)
    cfg = run_config_from_args(args)
    systems = {"lightningdot": args.lightningdot, "vldeformer": args.vldeformer,
               "cross_encoder_all_pairs": args.cross_encoder}
    if not any(systems.values()):
        raise ConfigError("give at least one of --lightningdot, --vldeformer, --cross_encoder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    precision = pick_precision("auto", cfg.train.precision, device)
    split = resolve_split(cfg)
    txt_db, img_db = open_split(split)
    images, rows, txt2img = select_subset(txt_db, args.num_images, args.num_captions)
    batch_size = args.batch_size or cfg.train.val_batch_size
    table: dict[str, dict[str, Any]] = {"chance": chance_row(len(images), txt2img)}
    for name, checkpoint in systems.items():
        if not checkpoint:
            continue
        logger.info("%s: scoring %d captions x %d images", name, len(rows), len(images))
        if name == "cross_encoder_all_pairs":
            scores, timing = run_cross_encoder(checkpoint, args.cross_encoder_config, cfg, txt_db, img_db,
                                               images, rows, batch_size, device, precision)
        else:
            scores, timing = run_biencoder(checkpoint, cfg, txt_db, img_db, images, rows, batch_size, device,
                                           precision)
        table[name] = {**recall_from_scores(scores, txt2img, KS), "timing": timing, "checkpoint": str(checkpoint)}
    print(format_table(table, len(images), len(rows)))
    result = {"split": split.name, "num_images": len(images), "num_captions": len(rows), "device": str(device),
              "systems": table}
    if args.output:
        atomic_write_json(args.output, result, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
