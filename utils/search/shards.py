"""Embeddings stored as shards: written in any order, read back one shard at a time.

Encoding produces embeddings in length order, and under torchrun rank by rank.
`EmbeddingShardWriter` buffers (canonical position, vector) pairs and writes them as shards
`{prefix}-{i:05d}.npz` holding `positions` (int64) and `embeddings` (float32), each
atomically; `close` writes `{prefix}-manifest.json` (`{"dim", "total", "shards"}`) listing
them. `merge_shards` writes one canonical-order .npy through a memmap, and
`utils.search.indexes.index_shards` fills an index straight from the shards, so a corpus
larger than memory works.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from utils.files import atomic_output, atomic_write_json
from utils.search.topk import ArrayLike


class EmbeddingShardWriter:
    """Buffer (position, vector) pairs produced in any order and write them as shards.

    Each shard is `{prefix}-{i:05d}.npz` holding `positions` (int64) and `embeddings`
    (float32), written atomically; `close` writes `{prefix}-manifest.json` listing them,
    so a crashed run never leaves a manifest that points at missing or partial shards.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, dim: int, shard_size: int = 65536):
        self.directory = Path(directory)
        self.prefix = prefix
        self.dim = dim
        self.shard_size = shard_size
        self._positions: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []
        self._buffered = 0
        self._shards: list[str] = []
        self._total = 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, positions: ArrayLike, vectors: ArrayLike) -> None:
        """Buffer rows; `positions` are their rows in the final canonical order."""
        if isinstance(positions, torch.Tensor):
            positions = positions.detach().cpu().numpy()
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (positions.shape[0], self.dim):
            raise ValueError(f"expected vectors of shape ({positions.shape[0]}, {self.dim}), got {vectors.shape}")
        self._positions.append(positions)
        self._vectors.append(vectors)
        self._buffered += positions.shape[0]
        if self._buffered >= self.shard_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write full shards of `shard_size` rows (and the remainder when `final`)."""
        if not self._buffered:
            return
        positions, vectors = np.concatenate(self._positions), np.concatenate(self._vectors)
        start = 0
        while positions.shape[0] - start >= self.shard_size or (final and start < positions.shape[0]):
            stop = start + self.shard_size
            self._write_shard(positions[start:stop], vectors[start:stop])
            start = min(stop, positions.shape[0])
        self._positions, self._vectors = [positions[start:]], [vectors[start:]]
        self._buffered = positions.shape[0] - start

    def _write_shard(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        name = f"{self.prefix}-{len(self._shards):05d}.npz"
        path = self.directory / name
        with atomic_output(path, suffix=".npz") as tmp:
            np.savez(tmp, positions=positions, embeddings=vectors)
        self._shards.append(name)
        self._total += positions.shape[0]

    def close(self) -> Path:
        """Write the last shard and the manifest; returns the manifest path."""
        self._flush(final=True)
        manifest = self.directory / f"{self.prefix}-manifest.json"
        atomic_write_json(manifest, {"dim": self.dim, "total": self._total, "shards": self._shards})
        return manifest


def read_manifests(manifests: Sequence[str | os.PathLike]) -> tuple[int, list[Path]]:
    """(dim, shard paths) of one or more shard manifests (e.g. one per rank)."""
    dims, paths = set(), []
    for manifest in manifests:
        manifest = Path(manifest)
        meta = json.loads(manifest.read_text())
        dims.add(int(meta["dim"]))
        paths += [manifest.parent / name for name in meta["shards"]]
    if len(dims) != 1:
        raise ValueError(f"shard manifests disagree on (or lack) the embedding size: {sorted(dims)}")
    return dims.pop(), paths


def combine_manifests(parts: Sequence[str | os.PathLike], target: str | os.PathLike) -> Path:
    """Write `target`: one manifest listing the shards of every manifest in `parts` (e.g. one
    per rank; shard names stay unique because each rank writes under its own prefix).

    Returns:
        `target`.
    """
    shards, total, dim = [], 0, None
    for part in parts:
        meta = json.loads(Path(part).read_text())
        shards += meta["shards"]
        total += meta["total"]
        dim = meta["dim"]
    target = Path(target)
    atomic_write_json(target, {"dim": dim, "total": total, "shards": shards})
    return target


def iter_shards(manifests: Sequence[str | os.PathLike]) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """(path, positions, embeddings) of every shard the manifests list, one shard in memory
    at a time."""
    _, paths = read_manifests(manifests)
    for path in paths:
        with np.load(path) as shard:
            positions, embeddings = shard["positions"], shard["embeddings"]
        yield path, positions, embeddings


def mark_rows(seen: np.ndarray, positions: np.ndarray, shard: str, action: str) -> None:
    """Mark a shard's `positions` in `seen` (one flag per canonical row).

    Args:
        seen: bool (num_rows,), True for the rows earlier shards held; updated in place.
        positions: the shard's canonical rows.
        shard: the shard's name (for messages).
        action: what the caller does with the rows ("written", "added"; for messages).

    Raises:
        ValueError: a position outside [0, num_rows), or a row seen before or twice.
    """
    num_rows = seen.shape[0]
    if positions.size and (positions.min() < 0 or positions.max() >= num_rows):
        raise ValueError(f"shard {shard}: positions outside [0, {num_rows})")
    if seen[positions].any() or np.unique(positions).size != positions.size:
        raise ValueError(f"shard {shard}: some rows were already {action}")
    seen[positions] = True


def sample_from_shards(manifests: Sequence[str | os.PathLike], rows: np.ndarray) -> np.ndarray:
    """(len(rows), dim) vectors of the canonical `rows` (sorted, unique), read shard by shard.

    Memory: the sample plus one shard; a shard none of whose rows is sampled has only its
    positions read.
    """
    dim, paths = read_manifests(manifests)
    out = np.empty((rows.shape[0], dim), dtype=np.float32)
    found = np.zeros(rows.shape[0], dtype=bool)
    if not rows.size:
        return out
    for path in paths:
        with np.load(path) as shard:
            pos = shard["positions"]
            slot = np.searchsorted(rows, pos)
            hit = (slot < rows.shape[0]) & (rows[np.minimum(slot, rows.shape[0] - 1)] == pos)
            if hit.any():
                out[slot[hit]] = shard["embeddings"][hit]
                found[slot[hit]] = True
    if not found.all():
        raise ValueError(f"{int((~found).sum())} sampled rows are in no shard (first {rows[~found][:5].tolist()})")
    return out


def merge_shards(manifest: str | os.PathLike, out_path: str | os.PathLike, num_rows: int) -> Path:
    """Merge the shards listed in `manifest` into one (num_rows, dim) float32 .npy.

    Rows go to their recorded positions through a memmap, one shard in memory at a time.
    Every row must be written exactly once; the output appears only when complete.

    Args:
        manifest: path written by `EmbeddingShardWriter.close` (or `combine_manifests`).
        out_path: the .npy to write (atomically).
        num_rows: rows of the canonical order.

    Returns:
        `out_path`.
    """
    manifest = Path(manifest)
    dim, _ = read_manifests([manifest])
    out_path = Path(out_path)
    seen = np.zeros(num_rows, dtype=bool)
    with atomic_output(out_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(num_rows, dim))
        for path, pos, emb in iter_shards([manifest]):
            mark_rows(seen, pos, path.name, "written")
            out[pos] = emb
        if not seen.all():
            missing = np.nonzero(~seen)[0]
            raise ValueError(f"{manifest}: {missing.size} of {num_rows} rows missing (first {missing[:5].tolist()})")
        out.flush()
        del out
    return out_path


def remove_shards(manifest: str | os.PathLike) -> None:
    """Delete the shards listed in `manifest` and the manifest itself."""
    manifest = Path(manifest)
    meta = json.loads(manifest.read_text())
    for name in meta["shards"]:
        (manifest.parent / name).unlink(missing_ok=True)
    manifest.unlink()


def remove_shard_dir(shard_dir: str | os.PathLike) -> None:
    """Delete a shard directory and everything in it (left by a crashed run, or emptied by a
    finished one); nothing when it does not exist."""
    shard_dir = Path(shard_dir)
    if shard_dir.is_dir():
        for stale in shard_dir.iterdir():
            stale.unlink()
        shard_dir.rmdir()
