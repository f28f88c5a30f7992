"""Length-bucketed, rank-sharded, resumable batch samplers.

An epoch's batches are a pure function of ``(seed, epoch)``: the examples are shuffled,
cut into chunks of about ``bucket_batches`` batches, sorted by length inside each chunk (so
padding stays small), batched, and the batches shuffled again. Rank ``r`` of ``world_size``
takes batches ``r, r + world_size, ...``; every rank gets the same number of batches (the
last few are repeated from the start of the epoch when needed, unless ``drop_last``).

Resuming: batches consumed so far are counted by the training loop (a DataLoader prefetches
ahead of it); restore with ``set_epoch(epoch)`` then ``skip_batches(consumed)``, or with
``load_state_dict({"epoch": epoch, "batches_done": consumed})``.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

DEFAULT_BUCKET_BATCHES = 100


class _ShardedBatchSampler(Sampler[list[int]]):
    """Sharding, epoch handling and resumption shared by the batch samplers."""

    def __init__(self, num_examples: int, seed: int, shuffle: bool, drop_last: bool, rank: int,
                 world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.num_examples = num_examples
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        if self.shuffle:
            return rng.permutation(self.num_examples)
        return np.arange(self.num_examples)

    def _rank_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            batches = self._epoch_batches(rng)
            if self.shuffle:
                batches = [batches[j] for j in rng.permutation(len(batches))]
            if self.drop_last:
                per_rank = len(batches) // self.world_size
            else:
                per_rank = math.ceil(len(batches) / self.world_size)
                missing = per_rank * self.world_size - len(batches)
                # Repeat batches from the start so every rank runs the same number of steps
                # (a rank running out first would hang the collective ops of the others).
                batches = batches + [batches[j % len(batches)] for j in range(missing)]
            mine = batches[self.rank:per_rank * self.world_size:self.world_size]
            self._cache = (self.epoch, mine)
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate (its shuffle) and clears any pending skip."""
        self.epoch = epoch
        self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Makes the next iteration start at this rank's batch ``n`` of the current epoch."""
        if n < 0:
            raise ValueError(f"cannot skip {n} batches")
        self._skip = n

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """State to resume from; pass the number of batches the training loop consumed."""
        return {"epoch": self.epoch, "batches_done": self._skip if batches_done is None
                else batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the epoch and the position inside it."""
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler "
                             f"uses seed {self.seed}")
        self.set_epoch(int(state["epoch"]))
        self.skip_batches(int(state["batches_done"]))

    def __iter__(self) -> Iterator[list[int]]:
        batches, start = self._rank_batches(), self._skip
        self._skip = 0  # the skip applies to one iteration only
        for batch in batches[start:]:
            yield list(batch)

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank (after any pending skip)."""
        return max(0, len(self._rank_batches()) - self._skip)


def _length_sorted_chunks(order: np.ndarray, lens: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    # Longest first inside a chunk, ties kept in shuffled order, as UNITER's bucket sampler.
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        yield part[np.argsort(-lens[part], kind="stable")]


class LengthBucketBatchSampler(_ShardedBatchSampler):
    """Batches of similar-length examples, of ``batch_size`` examples or up to ``max_tokens``.

    With ``max_tokens`` a batch grows while ``longest length * examples <= max_tokens``
    (padded size); an example longer than ``max_tokens`` forms a batch alone.
    """

    def __init__(self, lens: Sequence[int], batch_size: int | None = None,
                 max_tokens: int | None = None, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 bucket_batches: int = DEFAULT_BUCKET_BATCHES) -> None:
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("give exactly one of batch_size and max_tokens")
        if (batch_size or max_tokens or 0) < 1:
            raise ValueError("batch_size / max_tokens must be >= 1")
        super().__init__(len(lens), seed, shuffle, drop_last, rank, world_size)
        self.lens = np.asarray(lens, dtype=np.int64)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        if batch_size is not None:
            self._chunk = bucket_batches * batch_size
        else:
            typical = max(1, int(np.median(self.lens))) if len(self.lens) else 1
            self._chunk = bucket_batches * max(1, max_tokens // typical)

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        batches: list[list[int]] = []
        for part in _length_sorted_chunks(self._order(rng), self.lens, self._chunk):
            if self.batch_size is not None:
                batches += [part[s:s + self.batch_size].tolist()
                            for s in range(0, len(part), self.batch_size)]
                continue
            batch: list[int] = []
            longest = 0
            for j in part.tolist():
                cand = max(longest, int(self.lens[j]))
                if batch and cand * (len(batch) + 1) > self.max_tokens:
                    batches.append(batch)
                    batch, cand = [], int(self.lens[j])
                batch.append(j)
                longest = cand
            if batch:
                batches.append(batch)
        if self.drop_last and self.batch_size is not None:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches


class DistinctImageBatchSampler(_ShardedBatchSampler):
    """Length-bucketed batches of ``batch_size`` examples whose images are all different.

    In-batch contrastive training treats the other images of a batch as negatives, so a
    second caption of the same image would be a false negative. An example that would repeat
    an image waits for a later batch. Batches are full except possibly the last few, which
    hold the examples whose image could not be placed elsewhere (``drop_last`` drops them).
    With ``allow_duplicates`` this is a plain length-bucketed sampler. Batches of different
    ranks may share an image; the contrastive loss masks those with the batch's image keys.
    """

    def __init__(self, img_names: Sequence[str], lens: Sequence[int], batch_size: int,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, allow_duplicates: bool = False,
                 bucket_batches: int = DEFAULT_BUCKET_BATCHES) -> None:
        if len(img_names) != len(lens):
            raise ValueError(f"{len(img_names)} image names for {len(lens)} lengths")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        super().__init__(len(lens), seed, shuffle, drop_last, rank, world_size)
        _, self._img_ids = np.unique(np.asarray(img_names, dtype=object).astype(str),
                                     return_inverse=True)
        self.lens = np.asarray(lens, dtype=np.int64)
        self.batch_size = batch_size
        self.allow_duplicates = allow_duplicates
        self._chunk = bucket_batches * batch_size

    def _take(self, pending: deque[int]) -> list[int]:
        """Takes the next batch of distinct images from ``pending`` (order kept)."""
        batch, used, deferred = [], set(), []
        while pending and len(batch) < self.batch_size:
            j = pending.popleft()
            img = self._img_ids[j]
            if img in used and not self.allow_duplicates:
                deferred.append(j)
            else:
                used.add(img)
                batch.append(j)
        pending.extendleft(reversed(deferred))
        return batch

    def _epoch_batches(self, rng: np.random.Generator) -> list[list[int]]:
        batches: list[list[int]] = []
        pending: deque[int] = deque()
        for part in _length_sorted_chunks(self._order(rng), self.lens, self._chunk):
            pending.extend(part.tolist())
            while len(pending) >= self.batch_size:
                batch = self._take(pending)
                if len(batch) < self.batch_size:
                    # Not enough distinct images yet: wait for the next chunk.
                    pending.extendleft(reversed(batch))
                    break
                batches.append(batch)
        while pending:
            batch = self._take(pending)
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        return batches
