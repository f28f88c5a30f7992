"""Training batch samplers built from the run settings (length buckets, distinct images, ranks)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from data.samplers import DistinctImageBatchSampler, LengthBucketBatchSampler
from utils.distributed import DistEnv

logger = logging.getLogger(__name__)


def make_batch_sampler(
    lens: Sequence[int],
    batch_size: int,
    unit: str,
    env: DistEnv,
    *,
    seed: int,
    shuffle: bool,
    img_names: Sequence[str] | None = None,
    allow_duplicate_images: bool = False,
) -> Any:
    """A length-bucketed batch sampler sharded for this rank (`data/samplers.py`).

    Args:
        lens: bucketing length of every example (text tokens + boxes for pairs).
        batch_size: examples per batch, or tokens per batch when `unit` is `tokens`.
        unit: `examples` | `tokens` (UNITER's pre-training counts padded tokens).
        env: gives the rank and world size.
        seed: shuffle seed.
        shuffle: False for evaluation (canonical order).
        img_names: image of every example, for contrastive batches that must not repeat an
            image; such batches are counted in examples, so a token budget is converted
            with the median example length.
        allow_duplicate_images: with `img_names`, let an image repeat (the loss masks it).
    """

    if unit not in ("examples", "tokens"):
        raise ValueError(f"train.batch_size_unit must be 'examples' or 'tokens', got {unit!r}")
    shard = {"seed": seed, "shuffle": shuffle, "rank": env.rank, "world_size": env.world_size}
    if img_names is not None:
        if unit == "tokens":
            typical = max(1, int(np.median(lens))) if len(lens) else 1
            examples = max(1, batch_size // typical)
            logger.info("contrastive batches of %d tokens -> %d examples (median length %d)",
                        batch_size, examples, typical)
            batch_size = examples
        return DistinctImageBatchSampler(
            img_names, lens, batch_size, allow_duplicates=allow_duplicate_images, **shard
        )
    if unit == "tokens":
        return LengthBucketBatchSampler(lens, max_tokens=batch_size, **shard)
    return LengthBucketBatchSampler(lens, batch_size=batch_size, **shard)
