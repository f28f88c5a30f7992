"""Re-rank the bi-encoder's top-M with a UNITER cross-encoder (SPEC 8), or train one.

    python rerank.py --config CONFIG --retrieval_dir OUT --reranker_checkpoint UNITER_CKPT \
        --reranker_config UNITER_JSON [--top_m 20] [--alpha 0.0] [--output_dir DIR] [key=value ...]
    python rerank.py train --config CONFIG [--output_dir DIR] [--resume | --overwrite] [key=value ...]

Re-ranking reads `topk.json` of an `inference.py` run (`--retrieval_dir`, which must have
been produced from the split the config names), scores every (query, candidate) pair of each
query's top-M in both directions with the cross-encoder (each distinct pair once, batched,
sorted by length, autocast on a GPU), and re-orders each list by
`alpha * biencoder + (1 - alpha) * cross` (alpha 0 = the original: cross-encoder alone; ties
keep the stage-1 order). Written to `--output_dir` (default: the retrieval dir), atomically:

* `rerank.json`: `{"before": recall, "after": recall, "top_m", "alpha", "num_pairs",
  "num_queries": {"text_to_image", "image_to_text"}, "split", "retrieval_dir",
  "reranker_checkpoint", "reranker_format", "device", "precision", "timing": {...}}`, recall
  in the `utils/search/metrics.py` layout, both computed on the same top-M lists (before: bi-encoder
  order, after: fused order) with the SPEC 7 rules;
* `rerank_scores.json`: `{"text_to_image": {caption id: [[image, biencoder, cross], ...]},
  "image_to_text": {image: [[caption id, biencoder, cross], ...]}}`, keyed by the query, in
  re-ranked order.

The reranker checkpoint is an original UNITER file (raw state dict, `uniter.*` keys, maybe
`gamma`/`beta`; its JSON config from `--reranker_config` or `model.model_config`) or one of
our cross-encoder checkpoints (rebuilt alone).

`train` fine-tunes a cross-encoder for re-ranking, UNITER's ITM ranking recipe: each example
is one positive pair and `retrieval.negative_size` negative images for its caption plus as
many negative captions for its image, scored jointly and trained with `rerank.rank_loss`
(`hinge` with `retrieval.margin`, or `softmax`). Negatives are sampled uniformly; with
`retrieval.num_hard_negatives > 0` that many per side come first from the candidates of
`model.biencoder_checkpoint` (the bi-encoder whose top-M will be re-ranked), chosen by
`retrieval.hard_negatives_sampling`. It starts from `model.checkpoint` (UNITER pre-trained or
ITM fine-tuned weights, config `model.model_config`) and runs on the shared training
machinery (`utils/engine/training.py`: accumulation, AMP, torchrun / Horovod, exact resume). It
writes our cross-encoder checkpoints to `OUT/ckpt/cross_encoder.{best,last}.pt`.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import (
    IDS_FILE,
    PRECISIONS,
    TOPK_FILE,
    RetrievalDirError,
    Split,
    atomic_write_json,
    caption_image_indices,
    check_retrieval_dir,
    load_biencoder,
    open_split,
    pick_precision,
    read_json,
    resolve_split,
)
from utils.config import (
    ConfigError,
    RunConfig,
    add_config_args,
    config_from_args,
    load_config,
    require_path,
)
from utils.errors import run_cli

logger = logging.getLogger("rerank")

RERANK_FILE = "rerank.json"
SCORES_FILE = "rerank_scores.json"
CKPT_NAMES = ("cross_encoder.best.pt", "cross_encoder.last.pt")
VAL_FILE = "val_results.json"

Pair = tuple[str, str]  # (caption id, image name)
PairScorer = Callable[[Sequence[Pair]], np.ndarray]
Candidates = dict[str, list[tuple[str, float]]]


# ---------------------------------------------------------------- loading


def load_cross_encoder(checkpoint: str | os.PathLike, model_config: str | None, config: RunConfig | None = None):
    """The cross-encoder of `checkpoint` in eval mode, and its format (`ours` / `original`).

    Args:
        checkpoint: our cross-encoder checkpoint, or an original UNITER state dict.
        model_config: UNITER JSON config (needed for an original checkpoint; ignored for ours).
        config: run config (rank loss / margin / dropout of a freshly built model).

    Raises:
        ConfigError: an original checkpoint without a config.
        model.state_dicts.CheckpointError: the weights do not fit the config (names both files).
    """
    from model.checkpoint import (
        CROSS_ENCODER_FORMAT,
        build_cross_encoder_from_checkpoint,
        load_cross_encoder_weights,
    )
    from model.cross_encoder import build_cross_encoder
    from model.state_dicts import CheckpointError, read_weights

    path = require_path(str(checkpoint), "--reranker_checkpoint", "file")
    fmt = read_weights(path).get("format")
    if fmt is not None:
        if fmt != CROSS_ENCODER_FORMAT:
            raise CheckpointError(f"{path} holds a {fmt} checkpoint, not a cross-encoder (re-ranker)")
        if model_config:
            logger.debug("%s carries its own model config; the reranker config is not used", path)
        return build_cross_encoder_from_checkpoint(path).eval(), "ours"
    if not model_config:
        raise ConfigError(
            f"{path} is an original UNITER checkpoint, which holds no model config: pass "
            f"--reranker_config UNITER_JSON (or set model.model_config)"
        )
    cfg_path = require_path(model_config, "--reranker_config / model.model_config", "any")
    kwargs = {}
    if config is not None:
        kwargs = {"rank_loss": config.rerank.rank_loss, "margin": config.retrieval.margin}
    model = build_cross_encoder(str(cfg_path), **kwargs)
    try:
        load_cross_encoder_weights(model, path)
    except CheckpointError as err:
        raise CheckpointError(
            f"reranker checkpoint {path} does not fit reranker config {cfg_path} "
            f"(hidden size, layers or vocabulary differ?): {err}"
        ) from err
    return model.eval(), "original"


def check_vocabulary(model, txt_db, source: str) -> None:
    """Refuse a txt_db whose token ids reach beyond the model's vocabulary."""
    vocab = int(model.config.bert_config.get("vocab_size", 0))
    v_range = txt_db.meta.get("v_range")
    if vocab and v_range and int(v_range[1]) > vocab:
        raise ConfigError(
            f"txt_db {txt_db.db_dir} uses token ids up to {int(v_range[1]) - 1} (meta.json "
            f"v_range) but the cross-encoder of {source} has vocab_size {vocab}: the tokenizers differ"
        )


# ---------------------------------------------------------------- scoring


class CrossEncoderScorer:
    """Scores (caption id, image name) pairs with a cross-encoder, batched, longest first."""

    def __init__(self, model, txt_db, img_db, batch_size: int, device: torch.device, precision,
                 num_workers: int = 0) -> None:
        self.model = model
        self.txt_db = txt_db
        self.img_db = img_db
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self._txt_len = dict(zip(txt_db.ids, txt_db.lens))

    def __call__(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Scores of `pairs`, in their order."""
        from data.datasets import PairDataset, pair_collate

        out = np.empty(len(pairs), dtype=np.float64)
        if not pairs:
            return out
        lengths = [self._txt_len[t] + self.img_db.name2nbb[i] for t, i in pairs]
        # Longest first: padding stays small and an out-of-memory error shows at once.
        order = sorted(range(len(pairs)), key=lambda j: -lengths[j])
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        loader = torch.utils.data.DataLoader(
            PairDataset(self.txt_db, self.img_db, pairs),
            batch_sampler=batches,
            collate_fn=pair_collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        with torch.inference_mode():
            for rows, batch in zip(batches, loader):
                txt, img = batch["txt"], batch["img"]
                with self.precision.autocast():
                    scores = self.model.score(
                        txt["input_ids"].to(self.device), txt["attention_mask"].to(self.device),
                        img["img_feat"].to(self.device), img["img_pos"].to(self.device),
                        img["img_mask"].to(self.device),
                    )
                out[rows] = scores.float().cpu().numpy()
        return out


def score_pairs_distributed(scorer: PairScorer, pairs: Sequence[Pair]) -> np.ndarray:
    """Each rank scores every world_size-th pair; every rank gets all scores."""
    from utils.distributed import all_gather_object, world_info

    rank, world = world_info()
    if world == 1:
        return np.asarray(scorer(pairs), dtype=np.float64)
    mine = np.asarray(scorer(pairs[rank::world]), dtype=np.float64)
    out = np.empty(len(pairs), dtype=np.float64)
    for r, part in enumerate(all_gather_object(mine)):
        out[r::world] = part
    return out


# ---------------------------------------------------------------- candidates and fusion


def load_candidates(retrieval_dir: str | os.PathLike, top_m: int) -> tuple[Candidates, Candidates, dict]:
    """Top-M lists of both directions from `topk.json`, and `ids.json`.

    Raises:
        RetrievalDirError: the files are missing, or their queries are not the split's ids.
    """
    if top_m < 1:
        raise ConfigError(f"rerank.top_m must be at least 1, got {top_m}")
    retrieval_dir = Path(retrieval_dir)
    topk = read_json(retrieval_dir / TOPK_FILE, "top-k file")
    ids = read_json(retrieval_dir / IDS_FILE, "ids file")
    t2i = {q: [(c, float(s)) for c, s in lst[:top_m]] for q, lst in topk["text_to_image"].items()}
    i2t = {q: [(c, float(s)) for c, s in lst[:top_m]] for q, lst in topk["image_to_text"].items()}
    if list(t2i) != ids["txt_ids"] or list(i2t) != ids["img_ids"]:
        raise RetrievalDirError(
            f"{retrieval_dir / TOPK_FILE}: its queries are not the captions / images of "
            f"{retrieval_dir / IDS_FILE} (files from different runs?)"
        )
    shortest = min((len(v) for v in (*t2i.values(), *i2t.values())), default=0)
    if shortest < top_m:
        logger.warning(
            "some queries have only %d candidates in %s (top_m %d): re-ranking what is there",
            shortest, retrieval_dir / TOPK_FILE, top_m,
        )
    return t2i, i2t, ids


def candidate_pairs(t2i: Candidates, i2t: Candidates) -> list[Pair]:
    """Distinct (caption, image) pairs of both directions, in first-seen order."""
    pairs: dict[Pair, None] = {}
    for txt_id, cands in t2i.items():
        for img, _ in cands:
            pairs[(txt_id, img)] = None
    for img, cands in i2t.items():
        for txt_id, _ in cands:
            pairs[(txt_id, img)] = None
    return list(pairs)


ALPHA_GRID = tuple(i / 10 for i in range(11))


def fuse(
    candidates: Candidates,
    cross: Mapping[Pair, float],
    alpha: float,
    query_is_text: bool,
) -> dict[str, list[tuple[str, float, float, float]]]:
    """Re-order every list by `alpha * biencoder + (1 - alpha) * cross`.

    Returns:
        query -> [(candidate, biencoder, cross, fused), ...], best first; equal fused scores
        keep their stage-1 order (so alpha 1 reproduces stage 1 exactly).
    """
    out = {}
    for query, cands in candidates.items():
        rows = []
        for cand, bi in cands:
            c = float(cross[(query, cand) if query_is_text else (cand, query)])
            rows.append((cand, bi, c, alpha * bi + (1.0 - alpha) * c))
        out[query] = sorted(rows, key=lambda r: -r[3])  # sorted() is stable
    return out


def lists_recall(
    t2i: Mapping[str, Sequence[tuple]],
    i2t: Mapping[str, Sequence[tuple]],
    ids: Mapping[str, Sequence[str]],
    txt2img: np.ndarray,
    score_at: int,
) -> dict[str, Any]:
    """SPEC 7 recall of candidate lists, ranking by the tuple entry at `score_at`."""
    from utils.search.metrics import recall_from_candidates

    img_pos = {name: i for i, name in enumerate(ids["img_ids"])}
    txt_pos = {t: i for i, t in enumerate(ids["txt_ids"])}
    t2i_c = [[img_pos[r[0]] for r in t2i[t]] for t in ids["txt_ids"]]
    t2i_s = [[r[score_at] for r in t2i[t]] for t in ids["txt_ids"]]
    i2t_c = [[txt_pos[r[0]] for r in i2t[i]] for i in ids["img_ids"]]
    i2t_s = [[r[score_at] for r in i2t[i]] for i in ids["img_ids"]]
    return recall_from_candidates(t2i_c, t2i_s, i2t_c, i2t_s, txt2img)


def rerank_retrieval_dir(
    retrieval_dir: str | os.PathLike,
    split: Split,
    scorer: PairScorer,
    top_m: int,
    alpha: float,
    output_dir: str | os.PathLike | None = None,
    txt_db=None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Re-rank an inference run's top-M with `scorer` and write the results.

    Args:
        retrieval_dir: output of `inference.py` for `split`.
        split: the split the config names (checked against the retrieval dir).
        scorer: (caption id, image name) pairs -> scores (a `CrossEncoderScorer`, or a stub).
        top_m: candidates per query.
        alpha: weight of the bi-encoder score in the fused score.
        output_dir: where to write (default `retrieval_dir`); only rank 0 writes.
        txt_db: the split's TxtDb when already open.
        extra: more entries for rerank.json (checkpoint, device, ...).

    Returns:
        The rerank.json dict.
    """
    from utils.distributed import world_info

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"rerank.alpha must lie in [0, 1], got {alpha}")
    t_start = time.perf_counter()
    check_retrieval_dir(retrieval_dir, split)
    if txt_db is None:
        txt_db, _ = open_split(split)
    t2i, i2t, ids = load_candidates(retrieval_dir, top_m)
    if ids["txt_ids"] != list(txt_db.ids) or ids["img_ids"] != list(txt_db.img_order):
        raise RetrievalDirError(f"{Path(retrieval_dir) / IDS_FILE} does not list the split's captions / images")
    txt2img = caption_image_indices(txt_db, ids["img_ids"])
    pairs = candidate_pairs(t2i, i2t)

    t0 = time.perf_counter()
    scores = score_pairs_distributed(scorer, pairs)
    score_s = time.perf_counter() - t0
    cross = dict(zip(pairs, scores.tolist()))
    t2i_fused = fuse(t2i, cross, alpha, query_is_text=True)
    i2t_fused = fuse(i2t, cross, alpha, query_is_text=False)
    # Recall at other weights costs only a re-sort of the scored lists: reported so alpha can
    # be chosen on a validation split and then applied to the test split.
    sweep = {}
    for grid_alpha in ALPHA_GRID:
        t2i_a = fuse(t2i, cross, grid_alpha, query_is_text=True)
        i2t_a = fuse(i2t, cross, grid_alpha, query_is_text=False)
        sweep[f"{grid_alpha:.1f}"] = lists_recall(t2i_a, i2t_a, ids, txt2img, score_at=3)
    result = {
        "before": lists_recall(t2i_fused, i2t_fused, ids, txt2img, score_at=1),
        "after": lists_recall(t2i_fused, i2t_fused, ids, txt2img, score_at=3),
        "alpha_sweep": sweep,
        "top_m": top_m,
        "alpha": alpha,
        "num_pairs": len(pairs),
        "num_queries": {"text_to_image": len(t2i), "image_to_text": len(i2t)},
        "split": split.to_dict(),
        "retrieval_dir": str(Path(retrieval_dir).resolve()),
        **dict(extra or {}),
    }
    result["timing"] = {
        "rerank_s": score_s,
        "pairs_per_s": len(pairs) / max(score_s, 1e-9),
        "total_s": time.perf_counter() - t_start,
        **result.get("timing", {}),
    }
    rank, _ = world_info()
    if rank == 0:
        out = Path(output_dir or retrieval_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / SCORES_FILE, {
            "text_to_image": {q: [list(r[:3]) for r in rows] for q, rows in t2i_fused.items()},
            "image_to_text": {q: [list(r[:3]) for r in rows] for q, rows in i2t_fused.items()},
        })
        atomic_write_json(out / RERANK_FILE, result)
        b, a = result["before"], result["after"]
        logger.info(
            "top-%d re-ranked (alpha %.2f): TR R@1 %.2f -> %.2f, IR R@1 %.2f -> %.2f, RSUM %.2f -> %.2f",
            top_m, alpha, b["image_to_text"]["R@1"], a["image_to_text"]["R@1"],
            b["text_to_image"]["R@1"], a["text_to_image"]["R@1"], b["rsum"], a["rsum"],
        )
    return result


# ---------------------------------------------------------------- rerank command


def build_parser() -> argparse.ArgumentParser:
    """Command line of the re-ranking run."""
    parser = argparse.ArgumentParser(description="Re-rank an inference run's top-M with a UNITER cross-encoder.")
    # Not add_config_args: here --output_dir is where the results go, not a config override.
    parser.add_argument("--config", required=True, help="our YAML config or an original JSON config")
    parser.add_argument("--output_dir", default=None, help="where rerank.json goes (default: --retrieval_dir)")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value or key=value overrides")
    parser.add_argument("--retrieval_dir", required=True, help="output directory of inference.py")
    parser.add_argument("--reranker_checkpoint", default=None,
                        help="UNITER state dict or our cross-encoder checkpoint (default model.checkpoint)")
    parser.add_argument("--reranker_config", default=None,
                        help="UNITER JSON config of an original checkpoint (default model.model_config)")
    parser.add_argument("--top_m", type=int, default=None, help="candidates per query (default rerank.top_m)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="bi-encoder weight in the fused score (default rerank.alpha; 0 = cross only)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    return parser


def run_rerank(args: argparse.Namespace) -> dict[str, Any]:
    """The re-ranking command (see module docstring)."""
    from utils.distributed import init_distributed, shutdown

    output_dir = args.output_dir
    config = load_config(args.config, args.overrides)
    split = resolve_split(config)
    top_m = args.top_m if args.top_m is not None else config.rerank.top_m
    alpha = args.alpha if args.alpha is not None else config.rerank.alpha
    checkpoint = args.reranker_checkpoint or config.model.checkpoint
    if not checkpoint:
        raise ConfigError("no re-ranker: pass --reranker_checkpoint (or set model.checkpoint)")
    # Fail on a foreign retrieval dir before loading anything big.
    check_retrieval_dir(args.retrieval_dir, split)
    env = init_distributed(config.train.distributed, config.train.device)
    try:
        t0 = time.perf_counter()
        model, fmt = load_cross_encoder(checkpoint, args.reranker_config or config.model.model_config, config)
        txt_db, img_db = open_split(split)
        check_vocabulary(model, txt_db, str(checkpoint))
        model.to(env.device)
        precision = pick_precision(args.precision, config.train.precision, env.device)
        load_s = time.perf_counter() - t0
        scorer = CrossEncoderScorer(model, txt_db, img_db, config.rerank.rerank_batch_size, env.device,
                                    precision, config.data.n_workers)
        extra = {
            "reranker_checkpoint": str(Path(checkpoint).resolve()),
            "reranker_format": fmt,
            "device": str(env.device),
            "precision": precision.name,
            "timing": {"load_s": load_s},
        }
        return rerank_retrieval_dir(args.retrieval_dir, split, scorer, top_m, alpha, output_dir, txt_db, extra)
    finally:
        shutdown(env)


# ---------------------------------------------------------------- train command


def build_train_parser() -> argparse.ArgumentParser:
    """Command line of `rerank.py train`."""
    parser = argparse.ArgumentParser(
        prog="rerank.py train", description="Fine-tune a UNITER cross-encoder for re-ranking (ITM ranking)."
    )
    add_config_args(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output_dir")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --output_dir")
    return parser


def hard_negative_miner(config: RunConfig, dataset):
    """A miner of the bi-encoder's hard negatives for `dataset`, or None when not asked for.

    With `retrieval.num_hard_negatives > 0` (and a sampling mode other than `none`) the
    first that many negatives per side come from the candidates of
    `model.biencoder_checkpoint`, the bi-encoder whose top-M the re-ranker will see.
    """
    from utils.pipeline.evaluation import HardNegativeMiner

    r = config.retrieval
    if r.num_hard_negatives <= 0 or r.hard_negatives_sampling == "none":
        return None
    if r.num_hard_negatives > r.negative_size:
        raise ConfigError(
            f"retrieval.num_hard_negatives ({r.num_hard_negatives}) exceeds retrieval.negative_size "
            f"({r.negative_size}), the negatives per side of an ITM example"
        )
    if not config.model.biencoder_checkpoint:
        raise ConfigError(
            "retrieval.num_hard_negatives > 0 mines hard negatives with the bi-encoder: set "
            "model.biencoder_checkpoint (or num_hard_negatives=0 for sampled negatives only)"
        )
    return HardNegativeMiner(dataset, r.num_hard_negatives, r.hard_negatives_sampling,
                             config.train.seed)


def _ranking_eval(model, loader, device: torch.device, precision, group_size: int) -> dict[str, float]:
    """Mean loss and the share of groups whose positive scores above all its negatives."""
    from utils.distributed import all_reduce
    from utils.engine.training import to_device

    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, groups
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            with precision.autocast():
                out = model(batch)
            scores = out["scores"].float().view(-1, group_size)
            groups = scores.shape[0]
            total += torch.tensor(
                [float(out["loss"]) * groups, float((scores[:, 1:] < scores[:, :1]).all(1).sum()), groups],
                dtype=torch.float64, device=device,
            )
    total = all_reduce(total)
    model.train()
    return {"loss": float(total[0] / total[2]), "accuracy": float(100.0 * total[1] / total[2])}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """ITM ranking fine-tuning of a UNITER cross-encoder (see module docstring)."""
    from data.datasets import ItmRankDataset, itm_rank_collate
    from data.img_db import ImgDb
    from data.samplers import LengthBucketBatchSampler
    from data.txt_db import TxtDb
    from model.checkpoint import load_cross_encoder_weights, make_checkpoint
    from model.cross_encoder import build_cross_encoder
    from optim.optimizer import build_optimizer
    from optim.schedule import build_scheduler, resolve_run_length
    from utils.config import config_to_dict, save_config
    from utils.distributed import init_distributed, shutdown, wrap_optimizer
    from utils.engine.training import (
        CKPT_DIR,
        CONFIG_FILE,
        MicroBatch,
        ResumableLoader,
        Trainer,
        eval_loader,
        prepare_output_dir,
    )
    from utils.files import atomic_torch_save
    from utils.original_programs import UNITER_TRAIN_ITM
    from utils.precision import resolve_precision
    from utils.rng import seed_everything

    config = config_from_args(args, UNITER_TRAIN_ITM)
    c = config
    if not c.model.model_config:
        raise ConfigError("model.model_config (the UNITER JSON config of the cross-encoder) is not set")
    if not c.data.train_txt_dbs or len(c.data.train_txt_dbs) != len(c.data.train_img_dbs):
        raise ConfigError(
            f"data.train_txt_dbs ({len(c.data.train_txt_dbs)}) and data.train_img_dbs "
            f"({len(c.data.train_img_dbs)}) must name the same, non-zero number of databases"
        )
    env = init_distributed(c.train.distributed, c.train.device)
    try:
        seed_everything(c.train.seed)
        precision = resolve_precision(c.train.precision, env.device)

        def open_dbs(txt_paths: Sequence[str], img_paths: Sequence[str], key: str):
            txt = [TxtDb(str(require_path(p, f"data.{key}_txt_db(s)", "dir")), c.data.max_txt_len) for p in txt_paths]
            img = [ImgDb(str(require_path(p, f"data.{key}_img_db(s)", "dir")), c.data.conf_th, c.data.max_bb,
                         c.data.min_bb, c.data.num_bb, c.data.compressed_db) for p in img_paths]
            return txt, img

        # Every input is checked before the output directory is touched.
        require_path(c.model.model_config, "model.model_config")
        for key in ("checkpoint", "biencoder_checkpoint"):
            if getattr(c.model, key):
                require_path(getattr(c.model, key), f"model.{key}", "file")
        txt_dbs, img_dbs = open_dbs(c.data.train_txt_dbs, c.data.train_img_dbs, "train")
        val_dbs = None
        if c.data.val_txt_db and c.data.val_img_db:
            val_dbs = open_dbs([c.data.val_txt_db], [c.data.val_img_db], "val")
        train_set = ItmRankDataset(txt_dbs, img_dbs, c.retrieval.negative_size, None, "both", seed=c.train.seed)
        miner = hard_negative_miner(c, train_set)
        if c.train.batch_size_unit == "tokens":
            sampler_size = {"max_tokens": c.train.train_batch_size}
        else:
            sampler_size = {"batch_size": c.train.train_batch_size}
        # No length bucketing here: when every positive caption of a batch has the same length
        # and the sampled negative captions do not, the ranking loss learns to key on length.
        sampler = LengthBucketBatchSampler(train_set.lens, seed=c.train.seed, shuffle=True, drop_last=False,
                                           rank=env.rank, world_size=env.world_size, bucket_batches=1,
                                           **sampler_size)
        loader = ResumableLoader(train_set, sampler, itm_rank_collate, seed=c.train.seed,
                                 num_workers=c.data.n_workers, pin_memory=c.data.pin_mem and env.device.type == "cuda")
        accumulation = max(1, c.train.gradient_accumulation_steps)
        config.train = resolve_run_length(c.train, math.ceil(loader.batches_per_epoch() / accumulation))
        out = Path(c.output_dir)
        resume_from = prepare_output_dir(out, resume=args.resume, overwrite=args.overwrite, env=env,
                                         extra_artifacts=(VAL_FILE,))
        if env.is_main:
            save_config(config, out / CONFIG_FILE)
        if miner is not None and resume_from is None:
            # Mined once: the bi-encoder is fixed. A resumed run gets the lists from its state.
            biencoder, _ = load_biencoder(c.model.biencoder_checkpoint, c)
            miner.mine(biencoder.to(env.device), 0, 0, env, pick_precision("auto", c.train.precision, env.device),
                       c.train, c.data)
            del biencoder

        val_loader = None
        if val_dbs is not None:
            v_txt, v_img = val_dbs
            val_set = ItmRankDataset(v_txt, v_img, c.retrieval.negative_size, None, "both", seed=c.train.seed)
            val_sampler = LengthBucketBatchSampler(val_set.lens, batch_size=c.train.val_batch_size, shuffle=False,
                                                   rank=env.rank, world_size=env.world_size)
            val_loader = eval_loader(val_set, itm_rank_collate, val_sampler, c.data.n_workers)

        model = build_cross_encoder(c.model.model_config, dropout=c.model.dropout, rank_loss=c.rerank.rank_loss,
                                    margin=c.retrieval.margin)
        if c.model.checkpoint:
            load_cross_encoder_weights(model, c.model.checkpoint, allow_biencoder_init=True)
        else:
            logger.warning("model.checkpoint is not set: training the cross-encoder from random weights")
        check_vocabulary(model, txt_dbs[0], c.model.model_config)
        model.to(env.device)

        total_steps = c.train.num_train_steps
        # Horovod's DistributedOptimizer is a new object: the scheduler must see that one.
        optimizer = wrap_optimizer(build_optimizer(model, c.train), model, env, accumulation)
        scheduler = build_scheduler(optimizer, c.train, total_steps)
        best: dict[str, float] = {"accuracy": -1.0, "step": 0}

        class _Best:
            def state_dict(self) -> dict[str, Any]:
                return dict(best)

            def load_state_dict(self, state: Mapping[str, Any]) -> None:
                best.update(state)

        trainer = Trainer(model, optimizer, scheduler, precision, env, c.train, total_steps=total_steps,
                          output_dir=out, run_config=config_to_dict(config),
                          stateful={"loader": loader, "best": _Best(), **({"hard_negatives": miner} if miner is not None else {})},
                          resume_from=resume_from)

        def compute_loss(m, batch, task):
            result = m(batch)
            return {"loss": result["loss"]}

        def validate_and_save() -> dict[str, float]:
            metrics = {}
            if val_loader is not None:
                metrics = _ranking_eval(model, val_loader, env.device, precision, train_set.group_size)
                trainer.log(metrics, "val")
            if env.is_main:
                ckpt = make_checkpoint(model, config_to_dict(config), {"step": trainer.step, "val": metrics})
                atomic_torch_save(ckpt, out / CKPT_DIR / CKPT_NAMES[1])
                if val_loader is None or metrics["accuracy"] > best["accuracy"]:
                    best.update({"accuracy": metrics.get("accuracy", -1.0), "step": trainer.step})
                    atomic_torch_save(ckpt, out / CKPT_DIR / CKPT_NAMES[0])
            return metrics

        save_every = c.train.save_steps or c.train.valid_steps
        metrics: dict[str, float] = {}
        while not trainer.done:
            micro = [MicroBatch("itm_rank", loader.next_batch()) for _ in range(accumulation)]
            trainer.train_step(micro, compute_loss)
            if trainer.every(c.train.valid_steps) or trainer.done:
                metrics = validate_and_save()
            if trainer.every(save_every) or trainer.done:
                trainer.save_state()
        trainer.close()
        result = {"step": trainer.step, "val": metrics, "best": dict(best),
                  "checkpoint": str((out / CKPT_DIR / CKPT_NAMES[0]).resolve())}
        if env.is_main:
            atomic_write_json(out / VAL_FILE, result)
        return result
    finally:
        shutdown(env)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`rerank.py ...` re-ranks (returns rerank.json's dict); `rerank.py train ...` trains."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return run_train(build_train_parser().parse_args(argv[1:]))
    return run_rerank(build_parser().parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli(main))
