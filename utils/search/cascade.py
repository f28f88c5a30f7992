"""Coarse-to-fine (HiVLP-style) retrieval over the levels of a hierarchical embedding.

A cascade is a list of stages `{dim, keep}` with growing `dim` and shrinking `keep`. Stage 1
searches the corpus at its level (any index: flat / hnsw / ivfpq / ivfflat, or exact top-k;
an IVF index scores only the rows of the lists it probes) and keeps `keep` candidates per
query; every later stage re-scores exactly the candidates the previous stage kept, at its
own level (a gather of the candidate rows and one batched dot product per query block), and
keeps its own `keep` best. The last stage's list is the result.

Model-free: the caller hands in one (queries, corpus) pair of arrays per stage, e.g. the
per-level embeddings `inference.py` writes.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.config import CascadeStage
from utils.errors import ConfigError
from utils.search.indexes import DenseIndex, IVFFlatIndex
from utils.search.topk import MISSING_ID, ArrayLike, exact_topk

# Bound on the floats of one gathered (query block x candidates x dim) tensor: 64 MiB.
RESCORE_BLOCK_ELEMENTS = 1 << 24
# Bound on one (query block x corpus block) score matrix of `threshold_topk`: 256 MiB.
SCORE_BLOCK_ELEMENTS = 1 << 26
# Below this k, `torch.topk` per block is cheap and `exact_topk` is used as is.
THRESHOLD_TOPK_MIN_K = 64


@dataclass
class StageResult:
    """What one stage kept: (Q, <= keep) scores and corpus rows (-1 = empty slot), best first."""

    stage: CascadeStage
    scores: np.ndarray
    ids: np.ndarray
    seconds: float


def check_levels(stages: Sequence[CascadeStage], level_dims: Sequence[int], where: str = "retrieval.cascade") -> None:
    """Refuse a cascade (checked already when the config loaded) whose dims the model lacks.

    Raises:
        ConfigError: a stage's dim is not one of the model's level sizes.
    """
    missing = [s.dim for s in stages if s.dim not in level_dims]
    if missing:
        raise ConfigError(f"{where}: dims {missing} are not levels of the model (its level dims: {list(level_dims)})")


def _as_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    x = np.asarray(x)
    if x.dtype != np.float32 or not x.flags.writeable or not x.flags.c_contiguous:
        # A copy: memmaps are read-only, and torch wants writable arrays.
        x = np.array(x, dtype=np.float32)
    return torch.from_numpy(x).to(device)


def _gather_rows(corpus: ArrayLike, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """corpus[rows] as a float32 tensor; a memmap is read in sorted row order, once per row."""
    if isinstance(corpus, torch.Tensor):
        return corpus.index_select(0, torch.from_numpy(rows).to(corpus.device)).to(device, torch.float32)
    if not isinstance(corpus, np.memmap):
        return torch.from_numpy(np.asarray(corpus[rows.reshape(-1)], dtype=np.float32)).to(device)
    unique, inverse = np.unique(rows, return_inverse=True)
    block = np.asarray(corpus[unique], dtype=np.float32)
    return torch.from_numpy(block).to(device)[torch.from_numpy(inverse.reshape(-1)).to(device)]


def _order_ties(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best first, equal scores by corpus row (as `exact_topk`), empty slots (-1) last."""
    by_id = ids.argsort(dim=1)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), ids.gather(1, order)


def threshold_topk(
    queries: ArrayLike,
    corpus: ArrayLike,
    k: int,
    corpus_block: int = 65536,
    max_block_elements: int = SCORE_BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k for a large k (a first stage's `keep`) on a CPU.

    `torch.topk` of k = 1,000 over every corpus block costs more than the low-dimensional
    matmul itself. Here each block after the first only looks at scores above the running
    k-th best of its query (a few per row once some blocks are in): they are compacted into a
    short padded row and merged with `topk`. The same scores as `exact_topk` (which of several
    rows tied at the k-th score is kept may differ, as between `exact_topk`'s block sizes).

    Returns:
        (scores float32 (Q, min(k, N)), rows int64 same shape), best first, equal scores by row.
    """
    n_q, n_c = queries.shape[0], corpus.shape[0]
    k_eff = min(k, n_c)
    out_s = np.empty((n_q, k_eff), dtype=np.float32)
    out_i = np.empty((n_q, k_eff), dtype=np.int64)
    if n_q == 0 or k_eff == 0:
        return out_s, out_i
    corpus_block = max(k_eff, min(corpus_block, n_c))
    query_block = max(1, max_block_elements // corpus_block)
    cpu = torch.device("cpu")
    # A corpus that fits in one score block's memory is converted once, not per query block.
    resident = isinstance(corpus, torch.Tensor) or n_c * corpus.shape[1] <= max_block_elements
    blocks = [_as_tensor(corpus[c0 : c0 + corpus_block], cpu) for c0 in range(0, n_c, corpus_block)] if resident else None
    for q0 in range(0, n_q, query_block):
        q = _as_tensor(queries[q0 : q0 + query_block], cpu)
        best_s = best_i = None
        for c0 in range(0, n_c, corpus_block):
            c = blocks[c0 // corpus_block] if blocks is not None else _as_tensor(corpus[c0 : c0 + corpus_block], cpu)
            scores = q @ c.t()
            if best_s is None or best_s.shape[1] < k_eff:
                top_s, top_i = scores.topk(min(k_eff, scores.shape[1]), dim=1)
                top_i = top_i + c0
                if best_s is not None:
                    top_s, pos = torch.cat([best_s, top_s], 1).topk(min(k_eff, best_s.shape[1] + top_s.shape[1]), dim=1)
                    top_i = torch.cat([best_i, top_i], 1).gather(1, pos)
                best_s, best_i = top_s, top_i
                continue
            # Only scores above the k-th best can enter (equal ones lose the tie to lower rows).
            rows, cols = (scores > best_s[:, -1:]).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            # nonzero lists row by row: a hit's slot is its place within its row.
            counts = torch.bincount(rows, minlength=q.shape[0])
            width = int(counts.max())
            slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
            cand_s = torch.full((q.shape[0], width), -torch.inf)
            cand_i = torch.full((q.shape[0], width), MISSING_ID, dtype=torch.long)
            cand_s[rows, slot] = scores[rows, cols]
            cand_i[rows, slot] = cols + c0
            best_s, pos = torch.cat([best_s, cand_s], 1).topk(k_eff, dim=1)
            best_i = torch.cat([best_i, cand_i], 1).gather(1, pos)
        best_s, best_i = _order_ties(best_s, best_i)
        out_s[q0 : q0 + q.shape[0]] = best_s.numpy()
        out_i[q0 : q0 + q.shape[0]] = best_i.numpy()
    return out_s, out_i


def ivf_threshold_topk(
    queries: ArrayLike, index: IVFFlatIndex, k: int, query_block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """An IVF-Flat index's search (the `index.nprobe` lists of highest centroid score per
    query, rows scored exactly) for a large k on a CPU, as batched matmuls.

    faiss scans a list one query at a time with a k-heap; with k = 1,000 and many queries
    that is far slower than a matrix product. Here the probed lists are taken in rounds of
    growing size (each query's closest lists first): in a round every list is multiplied by
    all the queries that probe it in that round, only scores at or above a query's running
    k-th best are kept, and those are merged into its running top-k, which raises the bar
    for the next round.

    Returns:
        (scores float32 (Q, min(k, ntotal)), rows int64 same shape), best first, equal scores
        by row; a query whose lists hold fewer than k rows has empty slots (-1, -inf) last.
    """
    n_q = queries.shape[0]
    k_eff = min(k, index.ntotal)
    out_s = np.full((n_q, k_eff), -np.inf, dtype=np.float32)
    out_i = np.full((n_q, k_eff), MISSING_ID, dtype=np.int64)
    if n_q == 0 or k_eff == 0:
        return out_s, out_i
    cpu = torch.device("cpu")
    offsets, ids, vectors = (torch.from_numpy(a) for a in index.lists())
    centroids = torch.from_numpy(index.centroids())
    nlist = centroids.shape[0]
    nprobe = min(index.nprobe, nlist)
    # Rounds of probe slots [edges[i], edges[i+1]): the first holds ~2k rows on average, each
    # next one 4x as many lists as all before it.
    edges = [0, min(nprobe, max(1, math.ceil(2 * k_eff * nlist / index.ntotal)))]
    while edges[-1] < nprobe:
        edges.append(min(nprobe, 5 * edges[-1]))
    for q0 in range(0, n_q, query_block):
        q = _as_tensor(queries[q0 : q0 + query_block], cpu)
        m = q.shape[0]
        probe = (q @ centroids.t()).topk(nprobe, dim=1).indices
        best_s = torch.full((m, k_eff), -torch.inf)
        best_c = torch.full((m, k_eff), MISSING_ID, dtype=torch.long)
        for lo, hi in itertools.pairwise(edges):
            # Scores equal to the running k-th best are kept too (which of rows tied at the
            # final k-th score survive is free, as in `threshold_topk`).
            rows, scores, cols = _list_scores(q, probe[:, lo:hi], offsets, vectors, best_s[:, -1])
            cand_s, cand_c = _compact(rows, scores, cols, m)
            best_s, pos = torch.cat([best_s, cand_s], 1).topk(k_eff, dim=1)
            best_c = torch.cat([best_c, cand_c], 1).gather(1, pos)
        best_i = torch.where(best_c == MISSING_ID, MISSING_ID, ids[best_c.clamp(min=0)])
        best_s, best_i = _order_ties(best_s, best_i)
        out_s[q0 : q0 + m] = best_s.numpy()
        out_i[q0 : q0 + m] = best_i.numpy()
    return out_s, out_i


def _compact(rows: torch.Tensor, scores: torch.Tensor, cols: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, max hits per query) scores and list rows of the hits, query r's in row r (-inf / -1
    padding)."""
    order = rows.argsort(stable=True)
    rows, scores, cols = rows[order], scores[order], cols[order]
    counts = torch.bincount(rows, minlength=m)
    slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max()) if rows.numel() else 0
    out_s = torch.full((m, width), -torch.inf)
    out_c = torch.full((m, width), MISSING_ID, dtype=torch.long)
    out_s[rows, slot] = scores
    out_c[rows, slot] = cols
    return out_s, out_c


def _list_scores(
    q: torch.Tensor, probe: torch.Tensor, offsets: torch.Tensor, vectors: torch.Tensor, bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, score, list row) of every row of the `probe`d lists (per query) whose score is
    at or above the query's `bound`, computed list by list."""
    pairs_q = torch.arange(q.shape[0]).repeat_interleave(probe.shape[1])
    pairs_l = probe.reshape(-1)
    order = pairs_l.argsort(stable=True)
    pairs_q, pairs_l = pairs_q[order], pairs_l[order]
    lists, counts = torch.unique_consecutive(pairs_l, return_counts=True)
    out_q, out_s, out_c = [], [], []
    start = 0
    for lst, count in zip(lists.tolist(), counts.tolist()):
        who = pairs_q[start : start + count]
        start += count
        lo, hi = int(offsets[lst]), int(offsets[lst + 1])
        if hi == lo:
            continue
        scores = q[who] @ vectors[lo:hi].t()
        r, c = (scores >= bound[who].unsqueeze(1)).nonzero(as_tuple=True)
        out_q.append(who[r])
        out_s.append(scores[r, c])
        out_c.append(c + lo)
    if not out_q:
        empty = torch.empty(0, dtype=torch.long)
        return empty, torch.empty(0), empty
    return torch.cat(out_q), torch.cat(out_s), torch.cat(out_c)


def rescore_candidates(
    queries: ArrayLike,
    corpus: ArrayLike,
    candidates: np.ndarray,
    keep: int,
    device: torch.device | str | None = None,
    max_block_elements: int = RESCORE_BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of each query's candidates at this level, and the `keep` best of them.

    Args:
        queries: (Q, d) query embeddings of this level.
        corpus: (N, d) corpus embeddings of this level (array, memmap or tensor).
        candidates: (Q, C) int64 corpus rows per query; -1 marks an empty slot.
        keep: candidates kept per query.
        device: compute device (default CPU).
        max_block_elements: bound on the gathered (queries x C x d) floats at a time.

    Returns:
        (scores float32 (Q, min(keep, C)), rows int64 same shape), best first; an empty slot
        keeps id -1 and score -inf.
    """
    device = torch.device(device or "cpu")
    candidates = np.asarray(candidates, dtype=np.int64)
    n_q, n_c = candidates.shape
    dim = queries.shape[1]
    if corpus.shape[1] != dim:
        raise ValueError(f"query dim {dim} != corpus dim {corpus.shape[1]}")
    k_eff = min(keep, n_c)
    out_s = np.full((n_q, k_eff), -np.inf, dtype=np.float32)
    out_i = np.full((n_q, k_eff), MISSING_ID, dtype=np.int64)
    if n_q == 0 or k_eff == 0:
        return out_s, out_i
    block = max(1, max_block_elements // max(1, n_c * dim))
    for q0 in range(0, n_q, block):
        cand = candidates[q0 : q0 + block]
        missing = cand == MISSING_ID
        rows = _gather_rows(corpus, np.where(missing, 0, cand), device).view(cand.shape[0], n_c, dim)
        q = _as_tensor(queries[q0 : q0 + block], device)
        scores = torch.bmm(rows, q.unsqueeze(2)).squeeze(2)
        scores = scores.masked_fill(torch.from_numpy(missing).to(device), -torch.inf)
        top_s, pos = scores.topk(k_eff, dim=1)
        top_i = torch.from_numpy(cand).to(device).gather(1, pos)
        top_s, top_i = _order_ties(top_s, top_i)
        out_s[q0 : q0 + cand.shape[0]] = top_s.cpu().numpy()
        out_i[q0 : q0 + cand.shape[0]] = top_i.cpu().numpy()
    return out_s, out_i


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cascade_search(
    queries: Sequence[ArrayLike],
    corpora: Sequence[ArrayLike],
    stages: Sequence[CascadeStage],
    first_index: DenseIndex | None = None,
    device: torch.device | str | None = None,
    query_block: int = 65536,
) -> list[StageResult]:
    """Run a cascade: search at the first level, re-score the kept candidates at each next one.

    Args:
        queries: per stage, the (Q, stages[i].dim) query embeddings of its level.
        corpora: per stage, the (N, stages[i].dim) corpus embeddings of its level.
        stages: the cascade (`retrieval.cascade`, checked against the levels by `check_levels`).
        first_index: an index over `corpora[0]` for stage 1; None = exact top-k on `device`.
            An `IVFFlatIndex` on a CPU with keep >= `THRESHOLD_TOPK_MIN_K` is searched by
            `ivf_threshold_topk` (the same lists and scores as its faiss search, faster).
        device: compute device for exact search and re-scoring (default CPU).
        query_block: queries per call of `first_index.search` (bounds memory).

    Returns:
        One `StageResult` per stage; the last holds the cascade's lists.
    """
    if not stages:
        raise ValueError("a cascade needs at least one stage")
    if len(queries) != len(stages) or len(corpora) != len(stages):
        raise ValueError(f"{len(stages)} stages need as many query and corpus arrays, got {len(queries)} and {len(corpora)}")
    for i, (stage, q, c) in enumerate(zip(stages, queries, corpora)):
        if q.shape[1] != stage.dim or c.shape[1] != stage.dim:
            raise ValueError(f"stage {i} is {stage.dim}-d but got queries {tuple(q.shape)} and corpus {tuple(c.shape)}")
    device = torch.device(device or "cpu")
    results: list[StageResult] = []
    first = stages[0]
    t0 = time.perf_counter()
    if first_index is None and device.type == "cpu" and first.keep >= THRESHOLD_TOPK_MIN_K:
        scores, ids = threshold_topk(queries[0], corpora[0], first.keep)
    elif first_index is None:
        scores, ids = exact_topk(queries[0], corpora[0], first.keep, device=device)
        scores, ids = scores.cpu().numpy(), ids.cpu().numpy()
    elif isinstance(first_index, IVFFlatIndex) and device.type == "cpu" and first.keep >= THRESHOLD_TOPK_MIN_K:
        scores, ids = ivf_threshold_topk(queries[0], first_index, first.keep)
    else:
        parts = [
            first_index.search(np.asarray(queries[0][s : s + query_block], dtype=np.float32), first.keep)
            for s in range(0, queries[0].shape[0], query_block)
        ]
        scores = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 0), np.float32)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, 0), np.int64)
    _sync(device)
    results.append(StageResult(first, scores, ids, time.perf_counter() - t0))
    for stage, q, c in zip(stages[1:], queries[1:], corpora[1:]):
        t0 = time.perf_counter()
        scores, ids = rescore_candidates(q, c, results[-1].ids, stage.keep, device)
        _sync(device)
        results.append(StageResult(stage, scores, ids, time.perf_counter() - t0))
    return results
