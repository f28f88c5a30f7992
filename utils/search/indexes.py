"""faiss indexes: the index types (a registry by name), and building one from an array or shards.

* `DenseIndex` (after DPR's `DenseIndexer`): `FlatIndex` (exact), `HNSWIndex`, `IVFPQIndex`,
  `IVFFlatIndex`, registered by their config name (`INDEX_CLASSES`, `split_index_spec`,
  `build_index`), with `serialize` / `load_index`. faiss moves Flat / IVF to the GPU when it
  is a GPU build and a GPU is present; otherwise exact search on a GPU goes through
  `utils.search.topk.exact_topk`. faiss marks slots it could not fill with id -1:
  `DenseIndex.search` keeps that mark (score -inf) and `results_to_lists` drops it; no -1 is
  ever turned into a real id.
* `index_embeddings` trains and fills an index from an (N, dim) array or memmap in bounded
  batches; `index_shards` straight from embedding shards (`utils/search/shards.py`), one
  shard in memory at a time, so a corpus larger than memory works.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import DataError, MissingPathError
from utils.files import atomic_output
from utils.search.shards import (
    iter_shards,
    mark_rows,
    read_manifests,
    sample_from_shards,
)
from utils.search.topk import MISSING_ID, exact_topk

logger = logging.getLogger(__name__)


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise RuntimeError(
            "faiss is not installed: `pip install faiss-cpu` (or a faiss GPU build matching "
            "your CUDA) to build HNSW / IVF-PQ indexes; exact search works without it"
        ) from err
    return faiss


def faiss_gpu_available() -> bool:
    """True when faiss is a GPU build and sees a GPU."""
    try:
        faiss = _import_faiss()
    except RuntimeError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class DenseIndex(ABC):
    """Inner-product index over vectors numbered 0..ntotal-1 in the order they were added."""

    kind: str = ""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = dim

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Vectors in the index."""

    @property
    def is_trained(self) -> bool:
        """Whether `add` may be called (IVF-PQ needs `train` first)."""
        return True

    def train(self, vectors: np.ndarray) -> None:
        """Fit quantisers on a sample; a no-op for indexes that need none."""

    @abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (N, dim); they get ids ntotal .. ntotal+N-1."""

    @property
    def can_add_at(self) -> bool:
        """Whether rows can be added under given ids in any order (`start_add_at` / `add_at`),
        which `index_shards` needs; graph indexes (HNSW) depend on insertion order and cannot."""
        return False

    def start_add_at(self, num_rows: int) -> None:
        """Prepare an empty (trained) index for `add_at` of ids 0..num_rows-1."""
        raise NotImplementedError(f"{self.kind} indexes cannot add rows out of order")

    def add_at(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` (n, dim) under the ids `positions` (n,), in any order."""
        raise NotImplementedError(f"{self.kind} indexes cannot add rows out of order")

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Returns:
            (scores float32 (Q, min(k, ntotal)), ids int64 same shape), best first. An
            approximate index may leave slots unfilled: id -1, score -inf.
        """

    @abstractmethod
    def serialize(self, path: str | os.PathLike) -> None:
        """Write the index to `path` (atomically)."""

    @staticmethod
    def deserialize(path: str | os.PathLike, use_gpu: bool | None = None) -> DenseIndex:
        """Read an index written by `serialize` (same as `load_index`)."""
        return load_index(path, use_gpu)

    def _check(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {vectors.shape}")
        return vectors


class FaissIndex(DenseIndex):
    """A DenseIndex backed by one faiss index (CPU, or GPU when the build supports it)."""

    # HNSW has no faiss GPU implementation.
    _gpu_capable = True

    def __init__(self, index, dim: int, use_gpu: bool | None = None):
        super().__init__(dim)
        faiss = _import_faiss()
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("only inner-product faiss indexes are supported")
        self._gpu_resources = None
        want_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
        if want_gpu and self._gpu_capable:
            resources = faiss.StandardGpuResources()
            try:
                index = faiss.index_cpu_to_gpu(resources, 0, index)
                self._gpu_resources = resources
            except RuntimeError as err:
                # e.g. IVF-PQ codes of other than 8 bits (shrunk for a small corpus).
                logger.warning("faiss could not move the %s index to the GPU (%s); searching on CPU", self.kind, err)
        self._index = index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def on_gpu(self) -> bool:
        """Whether the faiss index lives on a GPU."""
        return self._gpu_resources is not None

    def add(self, vectors: np.ndarray) -> None:
        if not self.is_trained:
            raise RuntimeError(f"{self.kind} index must be trained before vectors are added")
        self._index.add(self._check(vectors, "vectors"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = self._check(queries, "queries")
        k_eff = min(k, self.ntotal)
        if k_eff == 0 or queries.shape[0] == 0:
            return np.empty((queries.shape[0], k_eff), np.float32), np.empty((queries.shape[0], k_eff), np.int64)
        scores, ids = self._index.search(queries, k_eff)
        ids = ids.astype(np.int64, copy=False)
        scores = np.where(ids == MISSING_ID, -np.inf, scores).astype(np.float32)
        return scores, ids

    def serialize(self, path: str | os.PathLike) -> None:
        faiss = _import_faiss()
        path = Path(path)
        index = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        with atomic_output(path) as tmp:
            faiss.write_index(index, str(tmp))


# Index types by name: `retrieval.index.type` of a config, `kind` of a class. A new index type
# is a FaissIndex subclass with `kind`, `faiss_type` and `from_faiss`, decorated below.
INDEX_CLASSES: dict[str, type[FaissIndex]] = {}


def register_index(cls: type[FaissIndex]) -> type[FaissIndex]:
    """Class decorator: make `cls` buildable by `build_index` and readable by `load_index`."""
    INDEX_CLASSES[cls.kind] = cls
    return cls


@register_index
class FlatIndex(FaissIndex):
    """Exact inner-product search (faiss IndexFlatIP storage).

    On a machine with a GPU but a CPU faiss build, search runs through `exact_topk` on the GPU
    over the stored vectors (a view, not a copy).
    """

    kind = "flat"
    faiss_type = "IndexFlatIP"

    def __init__(self, dim: int, use_gpu: bool | None = None, _index=None):
        faiss = _import_faiss()
        super().__init__(_index if _index is not None else faiss.IndexFlatIP(dim), dim, use_gpu)

    @classmethod
    def from_faiss(cls, raw, use_gpu: bool | None) -> FlatIndex:
        """Wrap a faiss index read from disk."""
        return cls(raw.d, use_gpu=use_gpu, _index=raw)

    def vectors(self) -> np.ndarray:
        """The stored (ntotal, dim) vectors: a view of a CPU index, a copy from a GPU one."""
        faiss = _import_faiss()
        if self.on_gpu:
            return self._index.reconstruct_n(0, self.ntotal)
        flat = faiss.rev_swig_ptr(self._index.get_xb(), self.ntotal * self.dim)
        return np.asarray(flat).reshape(self.ntotal, self.dim)

    @property
    def can_add_at(self) -> bool:
        # Rows are written into the CPU storage in place; a GPU copy has no such view.
        return not self.on_gpu

    def start_add_at(self, num_rows: int, batch_size: int = 65536) -> None:
        """Zero-fill `num_rows` rows (in batches: memory stays the index itself)."""
        if self.ntotal:
            raise RuntimeError("start_add_at needs an empty index")
        for start in range(0, num_rows, batch_size):
            self._index.add(np.zeros((min(batch_size, num_rows - start), self.dim), np.float32))

    def add_at(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        if not self.can_add_at:
            raise RuntimeError("add_at needs a CPU flat index")
        self.vectors()[np.asarray(positions, dtype=np.int64)] = self._check(vectors, "vectors")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.on_gpu and torch.cuda.is_available() and self.ntotal:
            queries = self._check(queries, "queries")
            scores, ids = exact_topk(queries, self.vectors(), k, device="cuda")
            return scores.cpu().numpy(), ids.cpu().numpy()
        return super().search(queries, k)


@register_index
class HNSWIndex(FaissIndex):
    """Approximate search on an HNSW graph (CPU only in faiss), inner-product metric."""

    kind = "hnsw"
    faiss_type = "IndexHNSWFlat"
    _gpu_capable = False

    def __init__(
        self, dim: int, m: int = 32, ef_construction: int = 200, ef_search: int = 128, _index=None
    ):
        faiss = _import_faiss()
        if _index is None:
            _index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            _index.hnsw.efConstruction = ef_construction
        _index.hnsw.efSearch = ef_search
        super().__init__(_index, dim, use_gpu=False)

    @classmethod
    def from_faiss(cls, raw, use_gpu: bool | None) -> HNSWIndex:
        """Wrap a faiss index read from disk (HNSW stays on the CPU)."""
        return cls(raw.d, ef_search=raw.hnsw.efSearch, _index=raw)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # efSearch below k would return fewer than k hits.
        self._index.hnsw.efSearch = max(self._index.hnsw.efSearch, k)
        return super().search(queries, k)


class TrainedIVFIndex(FaissIndex):
    """What the inverted-file types share: no faiss index until `train` (which picks sizes the
    training sample supports), then rows added whole or by position (`add_at`, shard by shard).

    Subclasses set `label` (for messages) and implement `_build(vectors)`, returning the
    trained faiss index and its coarse quantizer.
    """

    label = "IVF"

    def __init__(self, dim: int, nprobe: int, use_gpu: bool | None, _index=None):
        self._nprobe = nprobe
        self._use_gpu = use_gpu
        self._built = _index is not None
        self._gpu_resources = None
        DenseIndex.__init__(self, dim)
        if _index is not None:
            _index.nprobe = nprobe
            FaissIndex.__init__(self, _index, dim, use_gpu)

    @classmethod
    def from_faiss(cls, raw, use_gpu: bool | None) -> TrainedIVFIndex:
        """Wrap a faiss index read from disk."""
        return cls(raw.d, nprobe=raw.nprobe, use_gpu=use_gpu, _index=raw)

    @property
    def ntotal(self) -> int:
        return super().ntotal if self._built else 0

    @property
    def is_trained(self) -> bool:
        return self._built and super().is_trained

    @abstractmethod
    def _build(self, vectors: np.ndarray):
        """The trained faiss index for `vectors` (checked float32) and its quantizer."""

    def train(self, vectors: np.ndarray) -> None:
        vectors = self._check(vectors, "training vectors")
        index, quantizer = self._build(vectors)
        index.nprobe = min(self._nprobe, index.nlist)
        # faiss IVF indexes do not own their quantizer from Python: keep it alive with the index.
        self._quantizer = quantizer
        FaissIndex.__init__(self, index, self.dim, self._use_gpu)
        self._built = True

    def _need_built(self) -> None:
        if not self._built:
            raise RuntimeError(f"{self.label} index must be trained before vectors are added")

    def add(self, vectors: np.ndarray) -> None:
        self._need_built()
        super().add(vectors)

    @property
    def can_add_at(self) -> bool:
        return True

    def start_add_at(self, num_rows: int) -> None:
        """Nothing to prepare: inverted lists store each row's id."""
        self._need_built()
        if self.ntotal:
            raise RuntimeError("start_add_at needs an empty index")

    def add_at(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        self._need_built()
        ids = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        self._index.add_with_ids(self._check(vectors, "vectors"), ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._built:
            n = self._check(queries, "queries").shape[0]
            return np.empty((n, 0), np.float32), np.empty((n, 0), np.int64)
        return super().search(queries, k)

    def serialize(self, path: str | os.PathLike) -> None:
        if not self._built:
            raise RuntimeError(f"cannot serialize an untrained {self.label} index")
        super().serialize(path)


@register_index
class IVFPQIndex(TrainedIVFIndex):
    """Inverted lists over product-quantised codes (compressed, approximate).

    The requested sizes are shrunk to what the training sample supports (faiss needs at least
    as many training points as centroids), and `m` is reduced to a divisor of `dim`.
    """

    kind = "ivfpq"
    faiss_type = "IndexIVFPQ"
    label = "IVF-PQ"

    def __init__(
        self,
        dim: int,
        nlist: int = 1024,
        m: int = 64,
        nbits: int = 8,
        nprobe: int = 32,
        use_gpu: bool | None = None,
        _index=None,
    ):
        self._requested = {"nlist": nlist, "m": m, "nbits": nbits}
        super().__init__(dim, nprobe, use_gpu, _index)

    def _build(self, vectors: np.ndarray):
        faiss = _import_faiss()
        n = vectors.shape[0]
        if n < 2:
            raise ValueError(f"IVF-PQ needs at least 2 training vectors, got {n}")
        # faiss wants ~39 points per coarse centroid and 2^nbits per PQ codebook.
        nlist = max(1, min(self._requested["nlist"], n // 39))
        nbits = max(1, min(self._requested["nbits"], int(math.log2(n))))
        m = max(d for d in range(1, min(self._requested["m"], self.dim) + 1) if self.dim % d == 0)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        if n < 39 * 2**nbits:
            # faiss would print a warning per sub-quantiser; say it once, here.
            logger.warning(
                "IVF-PQ: %d training vectors for %d-bit codebooks (faiss advises %d); codes "
                "will be coarse", n, nbits, 39 * 2**nbits
            )
            index.pq.cp.min_points_per_centroid = 1
        index.train(vectors)
        logger.info("IVF-PQ trained on %d vectors: nlist=%d m=%d nbits=%d", n, nlist, m, nbits)
        return index, quantizer


@register_index
class IVFFlatIndex(TrainedIVFIndex):
    """Inverted lists over the uncompressed vectors: exact scores within the `nprobe` lists
    searched, so with nprobe == nlist it is exact search. A cascade's first stage at a short
    level: it scores about nprobe / nlist of the corpus instead of all of it.

    As for IVF-PQ, `nlist` is shrunk to what the training sample supports (39 per list).
    """

    kind = "ivfflat"
    faiss_type = "IndexIVFFlat"
    label = "IVF-Flat"

    def __init__(
        self, dim: int, nlist: int = 1024, nprobe: int = 32, use_gpu: bool | None = None, _index=None
    ):
        self._nlist = nlist
        # (ntotal when taken, `lists()`): the inverted lists as arrays, taken on first use.
        self._lists_cache: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        super().__init__(dim, nprobe, use_gpu, _index)

    def _build(self, vectors: np.ndarray):
        faiss = _import_faiss()
        n = vectors.shape[0]
        if n < 1:
            raise ValueError("IVF-Flat needs at least 1 training vector")
        nlist = max(1, min(self._nlist, n // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        logger.info("IVF-Flat trained on %d vectors: nlist=%d nprobe=%d", n, nlist, min(self._nprobe, nlist))
        return index, quantizer

    @property
    def nprobe(self) -> int:
        """Lists searched per query."""
        return int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._need_built()
        if value < 1:
            raise ValueError(f"nprobe must be positive, got {value}")
        self._index.nprobe = min(value, int(self._cpu_ivf().nlist))

    def centroids(self) -> np.ndarray:
        """The (nlist, dim) coarse centroids (a query probes those of highest inner product)."""
        ivf = self._cpu_ivf()
        return ivf.quantizer.reconstruct_n(0, ivf.nlist)

    def _cpu_ivf(self):
        """The faiss IndexIVF (a CPU copy of a GPU one)."""
        self._need_built()
        faiss = _import_faiss()
        return faiss.extract_index_ivf(faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index)

    def lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inverted lists as arrays: (offsets (nlist + 1,), ids (ntotal,), vectors
        (ntotal, dim)), list l being rows offsets[l]:offsets[l+1]. A copy (ntotal x dim
        floats), cached until the index changes, for batched search outside faiss."""
        if self._lists_cache is not None and self._lists_cache[0] == self.ntotal:
            return self._lists_cache[1]
        faiss = _import_faiss()
        ivf = self._cpu_ivf()
        invlists = ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.empty(offsets[-1], dtype=np.int64)
        vectors = np.empty((offsets[-1], self.dim), dtype=np.float32)
        for i in np.nonzero(sizes)[0]:
            lo, hi = offsets[i], offsets[i + 1]
            ids[lo:hi] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            codes = faiss.rev_swig_ptr(invlists.get_codes(int(i)), int(sizes[i]) * self.dim * 4)
            vectors[lo:hi] = np.frombuffer(codes, dtype=np.float32).reshape(-1, self.dim)
        self._lists_cache = (self.ntotal, (offsets, ids, vectors))
        return offsets, ids, vectors


def index_parameters(kind: str) -> list[str]:
    """The parameters an index type takes besides `dim` (its constructor's keywords)."""
    if kind not in INDEX_CLASSES:
        raise ValueError(f"index type must be one of {sorted(INDEX_CLASSES)}, got {kind!r}")
    names = inspect.signature(INDEX_CLASSES[kind].__init__).parameters
    return [n for n in names if n not in ("self", "dim") and not n.startswith("_")]


def split_index_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(type, parameters) of an index spec such as `{"type": "hnsw", "m": 32}`, checked.

    Raises:
        ValueError: an unknown type, or a parameter the type does not take (both named).
    """
    params = dict(spec)
    kind = params.pop("type", "flat")
    allowed = index_parameters(kind)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"index type {kind!r} takes {allowed}, not {unknown}")
    return kind, params


def build_index(kind: str, dim: int, **params) -> DenseIndex:
    """A new empty index of `kind` (a name of `INDEX_CLASSES`) with its optional parameters.

    Raises:
        ValueError: an unknown type, or a parameter the type does not take (both named).
    """
    kind, params = split_index_spec({"type": kind, **params})
    return INDEX_CLASSES[kind](dim, **params)


def load_index(path: str | os.PathLike, use_gpu: bool | None = None) -> DenseIndex:
    """Read an index written by `DenseIndex.serialize` (or any faiss IP Flat/HNSW/IVF-PQ)."""
    faiss = _import_faiss()
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"index file {path} does not exist")
    raw = faiss.read_index(str(path))
    name = type(raw).__name__
    for cls in INDEX_CLASSES.values():
        if cls.faiss_type == name:
            return cls.from_faiss(raw, use_gpu)
    raise DataError(f"{path}: unsupported faiss index type {name}")


def index_embeddings(
    index: DenseIndex,
    embeddings: np.ndarray,
    batch_size: int = 65536,
    train_size: int = 262144,
    seed: int = 0,
) -> DenseIndex:
    """Train (when needed) and fill `index` from an (N, dim) array, batch by batch.

    Args:
        index: an empty index.
        embeddings: array or memmap in id order (row i gets id i).
        batch_size: rows read and added at a time (bounds memory for memmaps).
        train_size: rows sampled (sorted, so reads stay sequential) for training.
        seed: sampling seed.

    Returns:
        The same index, filled.
    """
    n = embeddings.shape[0]
    if not index.is_trained:
        rows = train_sample_rows(n, train_size, seed)
        sample = embeddings if n <= train_size else embeddings[rows]
        index.train(np.asarray(sample, dtype=np.float32))
    for start in range(0, n, batch_size):
        index.add(np.asarray(embeddings[start : start + batch_size], dtype=np.float32))
    return index


def train_sample_rows(num_rows: int, train_size: int = 262144, seed: int = 0) -> np.ndarray:
    """The sorted rows an index is trained on: all of them, or `train_size` drawn at random.

    `index_embeddings` and `index_shards` draw the same rows, so both train the same quantiser.
    """
    if num_rows <= train_size:
        return np.arange(num_rows, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_rows, train_size, replace=False))


def index_shards(
    index: DenseIndex,
    manifests: Sequence[str | os.PathLike],
    num_rows: int,
    train_size: int = 262144,
    seed: int = 0,
) -> DenseIndex:
    """Train (when needed) and fill `index` straight from embedding shards, one at a time.

    The quantiser is trained on the rows `train_sample_rows` draws (read across the shards),
    then every shard is added under its rows' canonical positions. Memory: the index plus one
    shard (plus the training sample while training). The result equals `index_embeddings`
    over the merged array: the same storage for a flat index, the same quantiser and codes
    (hence the same search results) for IVF-PQ.

    Args:
        index: an empty index whose type supports `add_at` (flat on CPU, ivfpq).
        manifests: shard manifests (`utils.search.shards.EmbeddingShardWriter.close`), e.g.
            one per rank.
        num_rows: rows of the canonical order; every one must be in exactly one shard.
        train_size: rows sampled for training.
        seed: sampling seed.

    Returns:
        The same index, filled.
    """
    if not index.can_add_at:
        raise ValueError(f"a {index.kind} index cannot be built from shards; use index_embeddings on the merged array")
    dim, _ = read_manifests(manifests)
    if dim != index.dim:
        raise ValueError(f"shards hold {dim}-d vectors, the index is {index.dim}-d")
    if not index.is_trained:
        index.train(sample_from_shards(manifests, train_sample_rows(num_rows, train_size, seed)))
    index.start_add_at(num_rows)
    seen = np.zeros(num_rows, dtype=bool)
    for path, pos, emb in iter_shards(manifests):
        mark_rows(seen, pos, path.name, "added")
        index.add_at(pos, emb)
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {num_rows} rows are in no shard")
    return index
