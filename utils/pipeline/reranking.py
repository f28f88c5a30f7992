"""Second stage: a cross-encoder scores the bi-encoder's top-M pairs, fused with its scores.

The re-ranker registry, candidate lists read from a retrieval directory, pair scoring
(distributed over ranks), score fusion and recall after re-ranking. Training the cross-encoder
(`rerank.py train`) is `utils/pipeline/cross_encoder_training.py`'s.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import PairDataset, pair_collate
from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.checkpoint import (
    CROSS_ENCODER_FORMAT,
    OUR_FORMATS,
    build_cross_encoder_from_checkpoint,
    detect_format,
    load_cross_encoder_weights,
)
from model.cross_encoder import build_cross_encoder
from model.state_dicts import CheckpointError, read_weights
from utils.config import RunConfig, require_path
from utils.distributed import all_gather_object, world_info
from utils.errors import ConfigError
from utils.files import atomic_write_json
from utils.pipeline.evaluation import (
    caption_image_indices,
)
from utils.pipeline.retrieval_dir import (
    RetrievalDirError,
    Split,
    check_retrieval_dir,
    open_split,
    read_json,
)
from utils.run_files import (
    IDS_FILE,
    RERANK_FILE,
    SCORES_FILE,
    TOPK_FILE,
)
from utils.search.metrics import recall_from_candidates

logger = logging.getLogger(__name__)

Pair = tuple[str, str]  # (caption id, image name)
PairScorer = Callable[[Sequence[Pair]], np.ndarray]
Candidates = dict[str, list[tuple[str, float]]]


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

    path = require_path(str(checkpoint), "--reranker_checkpoint", "file")
    fmt = detect_format(read_weights(path))
    if fmt in OUR_FORMATS:
        if fmt != CROSS_ENCODER_FORMAT:
            raise CheckpointError(f"{path} holds a {fmt} checkpoint, not a cross-encoder (re-ranker)")
        if model_config:
            logger.debug("%s carries its own model config; the reranker config is not used", path)
        return build_cross_encoder_from_checkpoint(path).eval(), "ours"
    if not model_config:
        raise ConfigError(
            f"{path} is an original UNITER checkpoint, which holds no model config: pass "
            f"--reranker_config UNITER_JSON (or set cross_encoder.model_config)"
        )
    cfg_path = require_path(model_config, "--reranker_config / cross_encoder.model_config", "any")
    kwargs = {}
    if config is not None:
        kwargs = {"rank_loss": config.cross_encoder.rank_loss, "margin": config.cross_encoder.margin}
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


@dataclass
class Reranker:
    """A second stage ready to score pairs of one split.

    Attributes:
        scorer: (caption id, image name) pairs -> scores, higher is better.
        describe: what to record about it in rerank.json (checkpoint, format, ...).
    """

    scorer: PairScorer
    describe: dict[str, Any]


# Re-rankers by name (`rerank.reranker` of a config): (checkpoint, its model config, run
# config, the split's txt_db / img_db, device, precision) -> a Reranker. A new re-ranker is a
# function registered here; anything callable on pairs is a `PairScorer`.
RerankerFactory = Callable[..., Reranker]
RERANKERS: dict[str, RerankerFactory] = {}


def register_reranker(name: str) -> Callable[[RerankerFactory], RerankerFactory]:
    """Decorator: make a re-ranker factory selectable as `rerank.reranker: NAME`."""
    def add(factory: RerankerFactory) -> RerankerFactory:
        RERANKERS[name] = factory
        return factory
    return add


@register_reranker("cross-encoder")
def cross_encoder_reranker(checkpoint: str, model_config: str | None, config: RunConfig, txt_db: TxtDb,
                           img_db: ImgDb, device: torch.device, precision) -> Reranker:
    """The UNITER cross-encoder of `checkpoint` (ours, or an original with its JSON config)."""
    model, fmt = load_cross_encoder(checkpoint, model_config, config)
    check_vocabulary(model, txt_db, str(checkpoint))
    model.to(device)
    scorer = CrossEncoderScorer(model, txt_db, img_db, config.rerank.rerank_batch_size, device, precision,
                                config.data.n_workers)
    return Reranker(scorer, {"reranker_checkpoint": str(Path(checkpoint).resolve()), "reranker_format": fmt})


def score_pairs_distributed(scorer: PairScorer, pairs: Sequence[Pair]) -> np.ndarray:
    """Each rank scores every world_size-th pair; every rank gets all scores."""

    rank, world = world_info()
    if world == 1:
        return np.asarray(scorer(pairs), dtype=np.float64)
    mine = np.asarray(scorer(pairs[rank::world]), dtype=np.float64)
    out = np.empty(len(pairs), dtype=np.float64)
    for r, part in enumerate(all_gather_object(mine)):
        out[r::world] = part
    return out


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
    # A list shorter than top_m is worth a warning unless it already holds the whole corpus
    # (every image for a caption, every caption for an image: re-ranking all pairs).
    short = [len(v) for corpus, lists in ((len(i2t), t2i), (len(t2i), i2t))
             for v in lists.values() if len(v) < min(top_m, corpus)]
    if short:
        logger.warning(
            "some queries have only %d candidates in %s (top_m %d): re-ranking what is there",
            min(short), retrieval_dir / TOPK_FILE, top_m,
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
