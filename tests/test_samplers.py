"""Batch samplers: buckets, distinct images, rank sharding, determinism, resumption."""
from __future__ import annotations

import numpy as np
import pytest

from data.samplers import DistinctImageBatchSampler, LengthBucketBatchSampler


def _lens(n=1000, seed=0):
    return np.random.default_rng(seed).integers(5, 60, size=n).tolist()


def _flat(batches):
    return [i for b in batches for i in b]


def test_length_buckets_cover_everything_once_and_pad_little():
    lens = _lens()
    s = LengthBucketBatchSampler(lens, batch_size=32, seed=1, bucket_batches=10)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(lens)))
    assert len(batches) == len(s)
    # Chunks of 320 examples: three full chunks, then 40 = 32 + 8.
    assert sorted(map(len, batches)) == [8] + [32] * 31

    def padding(bs):
        return sum(max(lens[i] for i in b) * len(b) - sum(lens[i] for i in b) for b in bs)

    rng = np.random.default_rng(0)
    perm = rng.permutation(len(lens))
    random_batches = [perm[i:i + 32].tolist() for i in range(0, len(lens), 32)]
    assert padding(batches) < 0.2 * padding(random_batches)


def test_deterministic_per_seed_and_epoch():
    lens = _lens()
    a = LengthBucketBatchSampler(lens, batch_size=16, seed=3)
    b = LengthBucketBatchSampler(lens, batch_size=16, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(LengthBucketBatchSampler(lens, batch_size=16, seed=4)) != first


def test_max_tokens_batches():
    lens = _lens() + [500]
    s = LengthBucketBatchSampler(lens, max_tokens=400, seed=0)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(lens)))
    for b in batches:
        assert len(b) == 1 or max(lens[i] for i in b) * len(b) <= 400
    assert [1000] in batches  # longer than max_tokens: alone
    with pytest.raises(ValueError, match="exactly one"):
        LengthBucketBatchSampler(lens, batch_size=4, max_tokens=100)


@pytest.mark.parametrize("n,world", [(960, 3), (1000, 3), (1000, 4)])
def test_rank_sharding(n, world):
    lens = _lens(n)
    shards = [list(LengthBucketBatchSampler(lens, batch_size=32, seed=5, rank=r, world_size=world))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    union = [i for s in shards for i in _flat(s)]
    assert set(union) == set(range(n))
    total_batches = -(-n // 32)
    if total_batches % world == 0:
        assert len(union) == n  # no overlap
    dropped = [list(LengthBucketBatchSampler(lens, batch_size=32, seed=5, rank=r, world_size=world,
                                             drop_last=True)) for r in range(world)]
    flat = [i for s in dropped for i in _flat(s)]
    assert len(flat) == len(set(flat)) and all(len(b) == 32 for s in dropped for b in s)
    assert len({len(s) for s in dropped}) == 1
    with pytest.raises(ValueError, match="rank"):
        LengthBucketBatchSampler(lens, batch_size=4, rank=world, world_size=world)


def test_distinct_image_batches():
    n_img, per = 120, 5
    names = [f"img{i % n_img}.npz" for i in range(n_img * per)]
    lens = _lens(len(names), seed=2)
    s = DistinctImageBatchSampler(names, lens, batch_size=32, seed=0, bucket_batches=4)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(names)))
    for b in batches:
        assert len({names[i] for i in b}) == len(b)
    assert sum(len(b) < 32 for b in batches) <= 2
    shards = [list(DistinctImageBatchSampler(names, lens, 32, seed=0, rank=r, world_size=2))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert set(_flat(shards[0])) | set(_flat(shards[1])) == set(range(len(names)))
    # Few images: batches shrink rather than repeat an image.
    few = DistinctImageBatchSampler(["a", "a", "a", "b"], [3, 3, 3, 3], batch_size=2, seed=0)
    got = list(few)
    assert sorted(_flat(got)) == [0, 1, 2, 3] and all(len(set(b)) == len(b) for b in got)
    assert all(len({["a", "a", "a", "b"][i] for i in b}) == len(b) for b in got)
    dup = list(DistinctImageBatchSampler(["a"] * 8, [1] * 8, batch_size=4, allow_duplicates=True))
    assert [len(b) for b in dup] == [4, 4]


@pytest.mark.parametrize("kind", ["bucket", "distinct"])
def test_resume_continues_at_the_same_batch(kind):
    lens = _lens(700)
    names = [f"i{j % 140}" for j in range(700)]

    def make():
        if kind == "bucket":
            return LengthBucketBatchSampler(lens, batch_size=20, seed=9, rank=1, world_size=2)
        return DistinctImageBatchSampler(names, lens, batch_size=20, seed=9, rank=1, world_size=2)

    full = make()
    full.set_epoch(2)
    reference = list(full)
    run = make()
    run.set_epoch(2)
    it = iter(run)
    consumed = [next(it) for _ in range(7)]
    state = run.state_dict(batches_done=len(consumed))
    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == len(reference) - 7
    assert consumed + list(resumed) == reference
    # The skip applies once; skip_batches is the same thing.
    assert list(resumed) == reference
    resumed.skip_batches(3)
    assert list(resumed) == reference[3:]
    with pytest.raises(ValueError, match="seed"):
        make().load_state_dict({**state, "seed": 1})
