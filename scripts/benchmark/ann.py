"""Section `ann`: faiss Flat / HNSW / IVF-PQ indexes against exact search."""
from __future__ import annotations

import time

import numpy as np
import torch

from scripts.benchmark.context import Context, Row
from scripts.benchmark.measure import recall_vs


def clustered_vectors(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys around 1,000 centres and queries near random keys: some structure for ANN recall.

    Isotropic Gaussian keys have no neighbourhood structure, so approximate indexes would look
    far worse on them than on real embeddings.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(1000, n), dim), dtype=np.float32)
    keys = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    queries = keys[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    return keys, queries


def section_ann(ctx: Context) -> None:
    """faiss Flat / HNSW / IVF-PQ at N keys: build and search time, recall@k vs exact."""
    from utils.search.indexes import build_index
    from utils.search.topk import fused_topk

    s = ctx.sizes
    keys, queries = clustered_vectors(s.ann_n, s.search_dim, s.ann_queries, ctx.seed + 3)
    # Exact neighbours in fp32 on the benchmark device (the GPU when there is one).
    _, exact_idx = fused_topk(torch.from_numpy(queries).to(ctx.device), torch.from_numpy(keys).to(ctx.device), s.k)
    params = {"flat": {}, "hnsw": {"m": 32, "ef_construction": 200, "ef_search": 128},
              "ivfpq": {"nlist": 4096 if s.ann_n >= 200_000 else 256, "m": 64 if s.search_dim % 64 == 0 else 16, "nprobe": 32}}
    flat_ms = None
    for kind, kw in params.items():
        index = build_index(kind, s.search_dim, **kw)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(keys)
        index.add(keys)
        build_s = time.perf_counter() - t0
        index.search(queries[:8], s.k)
        t0 = time.perf_counter()
        _, idx = index.search(queries, s.k)
        search_ms = (time.perf_counter() - t0) * 1e3
        recall = recall_vs(exact_idx, torch.from_numpy(np.asarray(idx)))
        if kind == "flat":
            flat_ms = search_ms
        ctx.add(Row("ann", f"{kind} Q={s.ann_queries} search ms", search_ms, "ms", baseline=flat_ms,
                    ratio=flat_ms / search_ms if flat_ms else None, check=f"recall@{s.k} {recall:.4f}",
                    extra={"build_s": build_s, "params": kw, "n": s.ann_n}))
        del index
