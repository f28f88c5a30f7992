"""Retrieval recall (SPEC 7) for splits with several captions per image.

Definitions, for a score matrix `S` of shape (captions, images):

* text -> image ("image retrieval", IR): every caption `t` is a query over all images; its
  rank is the number of images scored STRICTLY higher than its own image
  (`#{j : S[t, j] > S[t, gt(t)]}`); hit@k when that rank is below k. Averaged over captions.
* image -> text ("text retrieval", TR): every image `i` is a query over all captions; hit@k
  when ANY of its captions ranks below k. With the strict rule the best-ranked positive is the
  highest-scored one, so the rank is `#{c : S[c, i] > max over positives p of S[p, i]}`.
  Averaged over images that have at least one caption (an image whose captions were all
  dropped by the `max_txt_len` filter has nothing to find; it stays a candidate for IR).

Ties therefore never help nor hurt by accident of sort order: an exact tie with the positive
is not counted as "above" it. Results are percentages in one fixed layout::

    {"text_to_image": {"R@1": .., "R@5": .., "R@10": ..},
     "image_to_text": {"R@1": .., "R@5": .., "R@10": ..},
     "rsum": .., "ar": ..}

UNITER's `itm_eval` also counted row indices in its image-retrieval recall (it can exceed
100%); nothing of that here. Full matrices are never compared in one piece: queries go in
chunks so a COCO 5K evaluation (25,000 x 5,000) stays within a bounded working set.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np
import torch

logger = logging.getLogger(__name__)

KS: tuple[int, ...] = (1, 5, 10)
# Rank of a query whose positive is not among its candidate list.
NOT_FOUND = np.iinfo(np.int64).max
# Rank of a query with no positive at all (excluded from averages).
NO_POSITIVE = -1
# Elements of one (chunk x candidates) score block: 2^25 floats = 128 MiB in fp32.
DEFAULT_BLOCK_ELEMENTS = 1 << 25

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, device: torch.device | None = None) -> torch.Tensor:
    """View a numpy array (memmaps included) or tensor as a float32 tensor on `device`."""
    if isinstance(x, np.ndarray):
        # np.asarray keeps memmap slices lazy until here; torch needs a writable buffer.
        x = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    return x.to(device=device if device is not None else x.device, dtype=torch.float32)


def _chunk_rows(n_candidates: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_candidates))


def _txt2img_array(txt2img: Sequence[int] | np.ndarray, n_img: int) -> np.ndarray:
    arr = np.asarray(txt2img, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n_img):
        raise ValueError(
            f"txt2img holds image indices in [{arr.min()}, {arr.max()}] but there are {n_img} images"
        )
    return arr


def text_to_image_ranks(
    scores: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> np.ndarray:
    """Rank of each caption's image among all images (strict rule).

    Args:
        scores: (num_captions, num_images) scores, numpy (memmap fine) or torch.
        txt2img: image index of every caption.
        block_elements: bound on the elements of one compared block.

    Returns:
        int64 array (num_captions,): images scored strictly above the caption's image.
    """
    n_txt, n_img = scores.shape
    gt = _txt2img_array(txt2img, n_img)
    if gt.shape[0] != n_txt:
        raise ValueError(f"txt2img has {gt.shape[0]} entries for {n_txt} caption rows")
    ranks = np.empty(n_txt, dtype=np.int64)
    step = _chunk_rows(n_img, block_elements)
    device = scores.device if isinstance(scores, torch.Tensor) else None
    gt_t = torch.from_numpy(gt)
    for start in range(0, n_txt, step):
        block = _as_tensor(scores[start : start + step], device)
        idx = gt_t[start : start + step].to(block.device)
        pos = block.gather(1, idx[:, None])
        ranks[start : start + step] = (block > pos).sum(1).cpu().numpy()
    return ranks


def image_to_text_ranks(
    scores: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> np.ndarray:
    """Rank of each image's best-ranked caption among all captions (strict rule).

    Args:
        scores: (num_captions, num_images) scores, numpy (memmap fine) or torch.
        txt2img: image index of every caption.
        block_elements: bound on the elements of one compared block.

    Returns:
        int64 array (num_images,): captions scored strictly above the image's best positive,
        `NO_POSITIVE` (-1) for an image without captions.
    """
    n_txt, n_img = scores.shape
    gt = _txt2img_array(txt2img, n_img)
    if gt.shape[0] != n_txt:
        raise ValueError(f"txt2img has {gt.shape[0]} entries for {n_txt} caption rows")
    ranks = np.empty(n_img, dtype=np.int64)
    step = _chunk_rows(n_txt, block_elements)
    device = scores.device if isinstance(scores, torch.Tensor) else None
    gt_t = torch.from_numpy(gt)
    for start in range(0, n_img, step):
        stop = min(n_img, start + step)
        block = _as_tensor(scores[:, start:stop], device).T  # (images, captions)
        ranks[start:stop] = _tr_block_ranks(block, gt_t.to(block.device), start)
    return ranks


def _tr_block_ranks(block: torch.Tensor, gt: torch.Tensor, first_image: int) -> np.ndarray:
    """TR ranks for a block of image rows (images, all captions)."""
    images = torch.arange(first_image, first_image + block.shape[0], device=block.device)
    positive = gt[None, :] == images[:, None]
    best = torch.where(positive, block, torch.full_like(block, -torch.inf)).amax(1)
    ranks = (block > best[:, None]).sum(1)
    ranks[~positive.any(1)] = NO_POSITIVE
    return ranks.cpu().numpy()


def ranks_from_embeddings(
    txt_emb: ArrayLike,
    img_emb: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """IR and TR ranks for dot-product scores, never holding the full score matrix.

    Each direction chunks its queries against the whole candidate side, so every score of a
    query comes out of the same matrix product (a positive and a tied negative are computed
    alike, which keeps the strict tie rule meaningful).

    Args:
        txt_emb: (num_captions, dim) caption embeddings (numpy memmap fine).
        img_emb: (num_images, dim) image embeddings.
        txt2img: image index of every caption.
        block_elements: bound on one (queries x candidates) score block.
        device: where to compute (defaults to the embeddings' device, CPU for numpy).

    Returns:
        (text_to_image ranks (num_captions,), image_to_text ranks (num_images,)).
    """
    dev = torch.device(device) if device is not None else None
    n_txt, n_img = txt_emb.shape[0], img_emb.shape[0]
    gt = _txt2img_array(txt2img, n_img)
    if gt.shape[0] != n_txt:
        raise ValueError(f"txt2img has {gt.shape[0]} entries for {n_txt} captions")
    gt_t = torch.from_numpy(gt)

    img_all = _as_tensor(img_emb, dev)
    ir = np.empty(n_txt, dtype=np.int64)
    step = _chunk_rows(n_img, block_elements)
    for start in range(0, n_txt, step):
        block = _as_tensor(txt_emb[start : start + step], img_all.device) @ img_all.T
        pos = block.gather(1, gt_t[start : start + step].to(block.device)[:, None])
        ir[start : start + step] = (block > pos).sum(1).cpu().numpy()
    del img_all

    txt_all = _as_tensor(txt_emb, dev)
    tr = np.empty(n_img, dtype=np.int64)
    step = _chunk_rows(n_txt, block_elements)
    gt_dev = gt_t.to(txt_all.device)
    for start in range(0, n_img, step):
        block = _as_tensor(img_emb[start : start + step], txt_all.device) @ txt_all.T
        tr[start : start + block.shape[0]] = _tr_block_ranks(block, gt_dev, start)
    return ir, tr


def recall_at_ks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Percent of queries whose rank is below k, for each k; queries ranked -1 are skipped.

    Args:
        ranks: int ranks (0 = first), `NO_POSITIVE` for queries with nothing to find.
        ks: cut-offs.

    Returns:
        {"R@k": percent} in the order of `ks` (0.0 for every k when no query counts).
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    valid = ranks[ranks != NO_POSITIVE]
    if valid.size == 0:
        return {f"R@{k}": 0.0 for k in ks}
    return {f"R@{k}": float(100.0 * np.mean(valid < k)) for k in ks}


def metrics_from_ranks(
    ir_ranks: np.ndarray, tr_ranks: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, object]:
    """The report dict (layout in the module docstring) from IR and TR ranks."""
    ir = recall_at_ks(ir_ranks, ks)
    tr = recall_at_ks(tr_ranks, ks)
    n_skipped = int(np.sum(np.asarray(tr_ranks) == NO_POSITIVE))
    if n_skipped:
        logger.warning("%d image(s) have no caption: left out of image->text recall", n_skipped)
    rsum = float(sum(ir.values()) + sum(tr.values()))
    return {
        "text_to_image": ir,
        "image_to_text": tr,
        "rsum": rsum,
        "ar": rsum / (2 * len(ks)),
    }


def recall_from_scores(
    scores: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    ks: Sequence[int] = KS,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> dict[str, object]:
    """Recall in both directions from a (num_captions, num_images) score matrix.

    Args:
        scores: caption x image scores (numpy, memmap or torch).
        txt2img: image index (column) of every caption (row).
        ks: cut-offs (the report layout uses 1, 5, 10).
        block_elements: bound on one compared block.

    Returns:
        The report dict (module docstring).
    """
    return metrics_from_ranks(
        text_to_image_ranks(scores, txt2img, block_elements),
        image_to_text_ranks(scores, txt2img, block_elements),
        ks,
    )


def recall_from_embeddings(
    txt_emb: ArrayLike,
    img_emb: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    ks: Sequence[int] = KS,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    device: torch.device | str | None = None,
) -> dict[str, object]:
    """Recall for the bi-encoder's dot-product scores without materialising them.

    Args:
        txt_emb: (num_captions, dim) caption embeddings.
        img_emb: (num_images, dim) image embeddings.
        txt2img: image index of every caption.
        ks: cut-offs.
        block_elements: bound on one (queries x candidates) score block.
        device: where to compute.

    Returns:
        The report dict (module docstring).
    """
    ir, tr = ranks_from_embeddings(txt_emb, img_emb, txt2img, block_elements, device)
    return metrics_from_ranks(ir, tr, ks)


def candidate_rank(
    candidates: Sequence[int], scores: Sequence[float], positives: set[int] | frozenset[int]
) -> int:
    """Strict rank of the best positive within one query's scored candidate list.

    Args:
        candidates: candidate indices (any order; duplicates are a caller bug).
        scores: their scores, same length.
        positives: the indices that count as hits.

    Returns:
        Candidates scored strictly above the best-scored positive; `NOT_FOUND` when no positive
        is among the candidates; `NO_POSITIVE` when `positives` is empty.
    """
    if not positives:
        return NO_POSITIVE
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    best = None
    for cand, score in zip(candidates, scores):
        if cand in positives and (best is None or score > best):
            best = score
    if best is None:
        return NOT_FOUND
    return sum(1 for score in scores if score > best)


def recall_from_candidates(
    t2i_candidates: Sequence[Sequence[int]],
    t2i_scores: Sequence[Sequence[float]],
    i2t_candidates: Sequence[Sequence[int]],
    i2t_scores: Sequence[Sequence[float]],
    txt2img: Sequence[int] | np.ndarray,
    ks: Sequence[int] = KS,
) -> dict[str, object]:
    """Recall from per-query candidate lists (index results, re-ranked top-M), SPEC 7 rules.

    A query's rank is the number of its candidates scored strictly above its best positive;
    a positive missing from the list is a miss at every k. That equals the full-matrix recall
    when each list is a true top-M and k <= M; for k > M it is a lower bound.

    Args:
        t2i_candidates: per caption (in caption order), candidate image indices.
        t2i_scores: their scores.
        i2t_candidates: per image (in image order), candidate caption indices.
        i2t_scores: their scores.
        txt2img: image index of every caption.
        ks: cut-offs.

    Returns:
        The report dict (module docstring).
    """
    n_img = len(i2t_candidates)
    gt = _txt2img_array(txt2img, n_img)
    if len(t2i_candidates) != gt.shape[0]:
        raise ValueError(f"{len(t2i_candidates)} caption queries but txt2img has {gt.shape[0]} entries")
    img2txts: list[set[int]] = [set() for _ in range(n_img)]
    for t, i in enumerate(gt.tolist()):
        img2txts[i].add(t)
    ir = np.array(
        [
            candidate_rank(c, s, frozenset((int(g),)))
            for c, s, g in zip(t2i_candidates, t2i_scores, gt.tolist())
        ],
        dtype=np.int64,
    )
    tr = np.array(
        [candidate_rank(c, s, img2txts[i]) for i, (c, s) in enumerate(zip(i2t_candidates, i2t_scores))],
        dtype=np.int64,
    )
    return metrics_from_ranks(ir, tr, ks)


def average_metrics(results: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Mean of several report dicts (e.g. the 5 COCO 1K folds), in the same layout."""
    if not results:
        raise ValueError("average_metrics needs at least one result")
    out: dict[str, object] = {}
    for direction in ("text_to_image", "image_to_text"):
        keys = list(results[0][direction])  # type: ignore[arg-type]
        out[direction] = {k: float(np.mean([r[direction][k] for r in results])) for k in keys}  # type: ignore[index]
    out["rsum"] = float(np.mean([r["rsum"] for r in results]))
    out["ar"] = float(np.mean([r["ar"] for r in results]))
    return out


def fold_image_ranges(num_images: int, n_folds: int = 5) -> list[tuple[int, int]]:
    """Consecutive image ranges of the COCO 1K protocol (5 x 1,000 of the 5K test images).

    Args:
        num_images: images in the split (5,000 for COCO 5K).
        n_folds: number of folds.

    Returns:
        (start, stop) per fold over the canonical image order.
    """
    if n_folds < 1 or num_images < n_folds:
        raise ValueError(f"cannot split {num_images} images into {n_folds} folds")
    if num_images % n_folds:
        logger.warning("%d images do not split evenly into %d folds", num_images, n_folds)
    bounds = np.linspace(0, num_images, n_folds + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in pairwise(bounds)]


def fold_recall_from_embeddings(
    txt_emb: ArrayLike,
    img_emb: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    n_folds: int = 5,
    ks: Sequence[int] = KS,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    device: torch.device | str | None = None,
) -> dict[str, object]:
    """COCO 1K protocol: recall within each fold of consecutive images, averaged.

    A fold holds its images and exactly the captions of those images (not a fixed slice of
    caption rows, so splits where images have other than 5 captions still work).

    Args:
        txt_emb: (num_captions, dim) caption embeddings.
        img_emb: (num_images, dim) image embeddings, in canonical order.
        txt2img: image index of every caption.
        n_folds: number of folds (5).
        ks: cut-offs.
        block_elements: bound on one score block.
        device: where to compute.

    Returns:
        The report dict averaged over folds.
    """
    gt = _txt2img_array(txt2img, img_emb.shape[0])
    results = []
    for start, stop in fold_image_ranges(img_emb.shape[0], n_folds):
        rows = np.nonzero((gt >= start) & (gt < stop))[0]
        results.append(
            recall_from_embeddings(
                txt_emb[rows], img_emb[start:stop], gt[rows] - start, ks, block_elements, device
            )
        )
    return average_metrics(results)


def fold_recall_from_scores(
    scores: ArrayLike,
    txt2img: Sequence[int] | np.ndarray,
    n_folds: int = 5,
    ks: Sequence[int] = KS,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> dict[str, object]:
    """COCO 1K protocol on a full (num_captions, num_images) score matrix."""
    gt = _txt2img_array(txt2img, scores.shape[1])
    results = []
    for start, stop in fold_image_ranges(scores.shape[1], n_folds):
        rows = np.nonzero((gt >= start) & (gt < stop))[0]
        sub = scores[rows][:, start:stop] if isinstance(scores, np.ndarray) else scores[
            torch.from_numpy(rows).to(scores.device)
        ][:, start:stop]
        results.append(recall_from_scores(sub, gt[rows] - start, ks, block_elements))
    return average_metrics(results)
