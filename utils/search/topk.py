"""Exact top-k maximum inner-product search without a full Q x N score matrix.

`fused_topk(queries, keys, k)` returns, for every query, the k keys with the largest dot
product, best first. Two implementations compute the same function:

* `triton`: one kernel fuses the matmul with a running per-query top-k
  (`utils/search/fused_topk_triton.py`); only (Q, splits, k) candidates reach memory and one small
  `torch.topk` merges the splits. Used on CUDA when `triton` is importable (it ships with
  CUDA builds of torch; it is not a dependency of this project). It also runs on CPU tensors
  under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check it without
  a GPU.
* `torch`: `exact_topk`, the project's one chunked implementation: keys in
  chunks whose top-k merge into a running top-k, memory bounded by `max_block_elements`.
  Runs everywhere.

Scores are accumulated in float32 whatever the input dtype (fp16 / bf16 keys stay in their
dtype in memory; the queries are cast to the keys' dtype). When k exceeds the number of keys
the result has only `N` columns: ids are never repeated to pad a list (SPEC 7). The order of
exactly tied scores is unspecified, as with `torch.topk`.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

BACKENDS = ("auto", "triton", "torch")
# Largest k the kernel keeps in registers (the list is padded to a power of two per query).
MAX_TRITON_K = 256
# Bound on one (queries x key chunk) fp32 score block of the torch path: 2^25 = 128 MiB.
DEFAULT_BLOCK_ELEMENTS = 1 << 25
# Bound on one (query block x corpus block) score matrix of `exact_topk`.
EXACT_BLOCK_ELEMENTS = 1 << 24
# faiss's id for an empty result slot.
MISSING_ID = -1
ArrayLike = np.ndarray | torch.Tensor
# Programs per streaming multiprocessor the split heuristic aims for (latency hiding).
_PROGRAMS_PER_SM = 4
# Fewest key tiles a split should stream, so the running list amortises its start-up.
_MIN_TILES_PER_SPLIT = 4


@dataclass(frozen=True)
class TopKConfig:
    """Launch parameters of the Triton kernel.

    Attributes:
        block_q: queries per program (>= 16: the smallest `tl.dot` tile).
        block_n: keys per streamed tile.
        block_d: slice of the embedding dimension per `tl.dot`.
        num_splits: key splits (the second grid axis); merged afterwards in torch.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the inner loop.
    """

    block_q: int = 64
    block_n: int = 128
    block_d: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def triton_available() -> bool:
    """True when `triton` can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton's interpreter is requested, so the kernel may run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_config(num_q: int, num_keys: int, dim: int, k: int, device: torch.device) -> TopKConfig:
    """A reasonable kernel configuration for a problem size (the benchmark sweeps others).

    Small Q is bound by reading the keys once, so it needs many key splits to spread the
    stream over every multiprocessor; large Q is bound by the matmul, so it takes wide query
    blocks (each key tile is reused by more queries) and fewer splits.
    """
    block_q = min(128, max(16, _next_pow2(num_q)))
    if _next_pow2(k) >= 64:
        # The running list lives in registers beside the score tile: keep their sum bounded.
        block_q = min(block_q, 64)
    block_n = 128 if block_q <= 64 else 64
    block_d = min(64, max(16, _next_pow2(dim)))
    num_warps = 8 if block_q * block_n >= 8192 else 4
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sm_count = 1
    q_blocks = _cdiv(max(num_q, 1), block_q)
    max_splits = max(1, _cdiv(num_keys, block_n * _MIN_TILES_PER_SPLIT))
    num_splits = max(1, min(max_splits, _cdiv(_PROGRAMS_PER_SM * sm_count, q_blocks)))
    return TopKConfig(block_q, block_n, block_d, num_splits, num_warps, num_stages=3)


def _check_inputs(queries: torch.Tensor, keys: torch.Tensor, k: int) -> None:
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(
            f"queries and keys must be 2-D, got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"dimension mismatch: queries {queries.shape[1]} vs keys {keys.shape[1]}")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def topk_dense(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward version: the full (Q, N) score matrix, then `torch.topk`.

    The benchmark's baseline and the tests' reference; its memory grows with Q x N.

    Returns:
        (Q, min(k, N)) float32 scores, best first, and their int64 key indices.
    """
    _check_inputs(queries, keys, k)
    scores = block_scores(queries.to(keys.dtype), keys)
    return scores.topk(min(k, keys.shape[0]), dim=1)


def topk_triton(
    queries: torch.Tensor, keys: torch.Tensor, k: int, config: TopKConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k through the fused Triton kernel (CUDA, or CPU under `TRITON_INTERPRET=1`).

    Args:
        queries: (Q, D) query embeddings.
        keys: (N, D) key embeddings (fp32, fp16 or bf16).
        k: results per query, at most `MAX_TRITON_K`.
        config: launch parameters; `default_config` when None.

    Returns:
        (Q, min(k, N)) float32 scores, best first, and their int64 key indices.

    Raises:
        ImportError: triton is not installed.
        ValueError: k is larger than `MAX_TRITON_K`, or a bad config.
    """
    _check_inputs(queries, keys, k)
    from utils.search.fused_topk_triton import launch_fused_topk

    queries = queries.to(keys.dtype)
    num_q, dim = queries.shape
    num_keys = keys.shape[0]
    k_eff = min(k, num_keys)
    if k_eff > MAX_TRITON_K:
        raise ValueError(f"the Triton kernel keeps at most {MAX_TRITON_K} results per query, got k={k}")
    if k_eff == 0 or num_q == 0:
        empty = torch.empty((num_q, k_eff), device=keys.device)
        return empty.float(), empty.long()
    cfg = config if config is not None else default_config(num_q, num_keys, dim, k_eff, keys.device)
    if cfg.block_q < 16 or cfg.block_d < 16 or cfg.block_n < 16:
        raise ValueError(f"block sizes must be >= 16 (tl.dot), got {cfg}")
    cand_val, cand_idx = launch_fused_topk(
        queries,
        keys,
        k_eff,
        block_q=cfg.block_q,
        block_n=cfg.block_n,
        block_d=cfg.block_d,
        num_splits=cfg.num_splits,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        upcast=triton_interpreting() and keys.dtype == torch.bfloat16,
    )
    cand_val = cand_val.view(num_q, -1)
    best_val, pos = cand_val.topk(k_eff, dim=1)
    best_idx = cand_idx.view(num_q, -1).gather(1, pos).long()
    return best_val, best_idx


def resolve_backend(backend: str, device: torch.device, k: int) -> str:
    """The implementation `fused_topk` will use: `triton` or `torch`.

    `auto` picks Triton on CUDA when it is importable and k fits the kernel, else torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and k <= MAX_TRITON_K and triton_available():
        return "triton"
    return "torch"


def fused_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    backend: str = "auto",
    config: TopKConfig | None = None,
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search: for each query the k best keys, best first.

    Args:
        queries: (Q, D) query embeddings (cast to the keys' dtype).
        keys: (N, D) key embeddings on the same device.
        k: results per query; the result has min(k, N) columns (never padded).
        backend: `auto` (Triton on CUDA when available, else torch), `triton` or `torch`.
        config: Triton launch parameters (ignored by the torch path).
        max_block_elements: bound on one score block of the torch path.

    Returns:
        (Q, min(k, N)) float32 scores and (Q, min(k, N)) int64 key indices.
    """
    _check_inputs(queries, keys, k)
    if resolve_backend(backend, keys.device, k) == "triton":
        return topk_triton(queries, keys, k, config)
    corpus_block = max(min(k, keys.shape[0]), max_block_elements // max(1, queries.shape[0]))
    return exact_topk(queries, keys, k, device=keys.device, dtype=keys.dtype, corpus_block=corpus_block)


def _block(x: ArrayLike, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of a tensor or numpy array (memmap) as a tensor on `device`."""
    part = x[start:stop]
    if isinstance(part, np.ndarray):
        part = np.ascontiguousarray(part, dtype=np.float32)
        # Read-only memmaps cannot back a tensor; the copy is one bounded block.
        part = torch.from_numpy(part if part.flags.writeable else part.copy())
    return part.to(device=device, dtype=dtype, non_blocking=True)


def block_scores(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    """(Q, C) float32 scores of one block, accumulated in float32 whatever the input dtype."""
    if queries.is_cuda and corpus.dtype in (torch.float16, torch.bfloat16):
        try:
            # fp32 output straight from the half-precision GEMM: no rounded half scores.
            return torch.mm(queries, corpus.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            return (queries @ corpus.t()).float()
    # CPU half-precision GEMMs are slow and round their output: compute in float32.
    return queries.float() @ corpus.float().t()


def _default_dtype(x: ArrayLike) -> torch.dtype:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return x.dtype
    return torch.float32


def exact_topk(
    queries: ArrayLike,
    corpus: ArrayLike,
    k: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    query_block: int | None = None,
    corpus_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of every query over the corpus.

    Args:
        queries: (Q, D) tensor or numpy array (memmap fine).
        corpus: (N, D) tensor or numpy array (memmap fine).
        k: wanted hits per query; more than N returns N (never padded).
        device: compute device; default the corpus tensor's device, or CUDA when available
            for numpy input, else CPU.
        dtype: compute dtype for the products (fp32 / fp16 / bf16); default the corpus dtype.
            Scores are returned in fp32 either way.
        query_block: queries per block (default: bounded by EXACT_BLOCK_ELEMENTS).
        corpus_block: corpus rows per block (default: bounded by EXACT_BLOCK_ELEMENTS).

    Returns:
        (scores fp32 (Q, min(k, N)), indices int64 (Q, min(k, N))) on the compute device,
        best first; equal scores are ordered by corpus index.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != corpus dim {corpus.shape[1]}")
    if device is None:
        if isinstance(corpus, torch.Tensor):
            device = corpus.device
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = dtype or _default_dtype(corpus)
    n_q, n_c = queries.shape[0], corpus.shape[0]
    k_eff = min(k, n_c)
    scores_out = torch.empty((n_q, k_eff), dtype=torch.float32, device=device)
    index_out = torch.empty((n_q, k_eff), dtype=torch.long, device=device)
    if n_q == 0 or k_eff == 0:
        return scores_out, index_out
    corpus_block = corpus_block or max(k_eff, min(n_c, 1 << 16))
    query_block = query_block or max(1, EXACT_BLOCK_ELEMENTS // corpus_block)
    # A corpus already on the device, or small enough to fit, is moved there once, not once
    # per query block; blocks are then views of it.
    on_device = isinstance(corpus, torch.Tensor) and corpus.device == device
    resident = on_device or corpus_block >= n_c
    corpus_dev = _block(corpus, 0, n_c, device, dtype) if resident else None
    if resident and _use_fused_kernel(device, k_eff):

        best_s, best_i = topk_triton(_block(queries, 0, n_q, device, dtype), corpus_dev, k_eff)
        return _order_ties_by_index(best_s, best_i)
    for q0 in range(0, n_q, query_block):
        q = _block(queries, q0, q0 + query_block, device, dtype)
        best_s = torch.empty((q.shape[0], 0), dtype=torch.float32, device=device)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=device)
        for c0 in range(0, n_c, corpus_block):
            c = corpus_dev[c0 : c0 + corpus_block] if resident else _block(corpus, c0, c0 + corpus_block, device, dtype)
            s = block_scores(q, c)
            top_s, top_i = s.topk(min(k_eff, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top_s], dim=1)
            cand_i = torch.cat([best_i, top_i + c0], dim=1)
            keep = min(k_eff, cand_s.shape[1])
            best_s, pos = cand_s.topk(keep, dim=1)
            best_i = cand_i.gather(1, pos)
        best_s, best_i = _order_ties_by_index(best_s, best_i)
        scores_out[q0 : q0 + q.shape[0]] = best_s
        index_out[q0 : q0 + q.shape[0]] = best_i
    return scores_out, index_out


def _use_fused_kernel(device: torch.device, k: int) -> bool:
    """On CUDA with Triton, the fused matmul + running top-k kernel replaces the block loop."""
    if device.type != "cuda":
        return False

    return resolve_backend("auto", device, k) == "triton"


def _order_ties_by_index(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by score (descending), equal scores by index, so output is reproducible."""
    by_index = index.argsort(dim=1)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), index.gather(1, order)


def results_to_lists(scores: ArrayLike, ids: ArrayLike) -> list[list[tuple[int, float]]]:
    """Per query, [(id, score), ...] best first, dropping the -1 slots faiss could not fill."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return [
        [(int(i), float(s)) for i, s in zip(row_i, row_s) if i != MISSING_ID]
        for row_i, row_s in zip(ids, scores)
    ]
