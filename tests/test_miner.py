"""The hard-negative miner (`HardNegativeMiner`, SPEC 6) against a brute-force reference.

Most tests hand the miner made-up embeddings (`encode_split` replaced) whose scores are
distinct integers, so every ranking is known exactly: `top` must pick the best-scoring
non-positives, `a-b` must pick from ranks a..b-1 of the non-positives, `random` and
`top-random` must never pick a positive and must repeat themselves for a seed. One test
mines with a real tiny model end to end.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from data.datasets import RetrievalDataset
from data.img_db import ImgDb
from data.txt_db import TxtDb
from model.biencoder import BiEncoder, BiEncoderConfig
from tests.helpers import randomize_, tiny_bert_config
from utils.config import DataConfig, TrainConfig
from utils.distributed import DistEnv
from utils.errors import ConfigError
from utils.pipeline import evaluation
from utils.pipeline.evaluation import (
    EvalSplit,
    HardNegativeMiner,
    encode_split,
    pool_size,
)
from utils.precision import Precision

ENV = DistEnv(backend="none", rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FP32 = Precision("fp32", "cpu")
TRAIN = TrainConfig(val_batch_size=64)
DATA = DataConfig(n_workers=0, pin_mem=False)


def hand_made_embeddings(split: EvalSplit, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose caption-image scores are distinct integers, exact in float32.

    Images are the unit vectors, so score(caption t, image j) = txt[t, j]: a random
    permutation of 0 .. n_txt * n_img - 1.
    """
    n_txt, n_img = len(split.txt_db.ids), len(split.img_names)
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_txt * n_img).reshape(n_txt, n_img).astype(np.float32)
    return torch.from_numpy(scores), torch.eye(n_img)


def brute_force_rankings(split: EvalSplit, txt_emb: torch.Tensor, img_emb: torch.Tensor
                         ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Every caption's non-positive images and every image's non-positive captions, best first."""
    scores = (txt_emb.double() @ img_emb.double().t()).tolist()
    tdb, names, ids = split.txt_db, split.img_names, split.txt_db.ids
    txt2ranked = {}
    for t, txt_id in enumerate(ids):
        order = sorted(range(len(names)), key=lambda j: -scores[t][j])
        txt2ranked[txt_id] = [names[j] for j in order if names[j] != tdb.txt2img[txt_id]]
    img2ranked = {}
    for i, name in enumerate(names):
        order = sorted(range(len(ids)), key=lambda t: -scores[t][i])
        img2ranked[name] = [ids[t] for t in order if tdb.txt2img[ids[t]] != name]
    return txt2ranked, img2ranked


@pytest.fixture()
def dataset(synthetic_tiny) -> RetrievalDataset:
    """The tiny train split: 32 images, 5 captions each."""
    return RetrievalDataset([TxtDb(synthetic_tiny["txt_db"]["train"])], [ImgDb(synthetic_tiny["img_db"])])


@pytest.fixture()
def hand_made(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace the miner's encoder with `hand_made_embeddings`; returns what it handed out."""
    handed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake_encode_split(model, split, env, precision, train, data):
        handed[split.name] = hand_made_embeddings(split, seed=zlib.crc32(split.name.encode()))
        return handed[split.name]

    monkeypatch.setattr(evaluation, "encode_split", fake_encode_split)
    return handed


def mine(dataset: RetrievalDataset, num: int, mode: str, seed: int = 0, step: int = 0, epoch: int = 0
         ) -> HardNegativeMiner:
    miner = HardNegativeMiner(dataset, num, mode, seed)
    miner.mine(None, step, epoch, ENV, FP32, TRAIN, DATA)
    return miner


def test_pool_sizes_of_the_modes() -> None:
    assert pool_size(5, "none") == 0 and pool_size(0, "top") == 0
    assert pool_size(5, "top") == 5
    assert pool_size(5, "random") is None
    assert pool_size(3, "top-random") == 50 and pool_size(100, "top-random") == 210
    assert pool_size(1000, "top-random") == 1000
    assert pool_size(5, "10-20") == 20 and pool_size(5, "20-30") == 30
    for bad in ("best", "20-10", "10-10", "10-"):
        with pytest.raises(ConfigError, match="hard_negatives_sampling"):
            pool_size(3, bad)


def test_none_and_zero_are_disabled(dataset) -> None:
    assert not HardNegativeMiner(dataset, 3, "none", 0).enabled
    assert not HardNegativeMiner(dataset, 0, "top", 0).enabled
    assert HardNegativeMiner(dataset, 3, "top", 0).enabled


@pytest.mark.parametrize("num", [1, 4])
def test_top_picks_the_best_scoring_non_positives(dataset, hand_made, num) -> None:
    miner = mine(dataset, num, "top")
    split = miner._splits[0]
    txt2ranked, img2ranked = brute_force_rankings(split, *hand_made[split.name])
    assert miner.txt2neg_imgs == {t: ranked[:num] for t, ranked in txt2ranked.items()}
    assert miner.img2neg_txts == {i: ranked[:num] for i, ranked in img2ranked.items()}
    # Handed to the dataset, and recorded.
    assert dataset.hard_negatives.txt2neg_imgs == miner.txt2neg_imgs
    assert dataset.hard_negatives.img2neg_txts == miner.img2neg_txts
    assert dataset.num_hard_negatives == num
    assert (miner.mined_at, miner.mined_epoch) == (0, 0)


@pytest.mark.parametrize("mode, start, stop", [("10-20", 10, 20), ("20-30", 20, 30), ("top-random", 0, 50)])
def test_range_modes_pick_from_their_ranks(dataset, hand_made, mode, start, stop) -> None:
    num = 4
    miner = mine(dataset, num, mode, seed=5)
    split = miner._splits[0]
    txt2ranked, img2ranked = brute_force_rankings(split, *hand_made[split.name])
    assert set(miner.txt2neg_imgs) == set(split.txt_db.ids)
    assert set(miner.img2neg_txts) == set(split.img_names)
    for got, ranked in [(miner.txt2neg_imgs[t], txt2ranked[t]) for t in txt2ranked] + [
        (miner.img2neg_txts[i], img2ranked[i]) for i in img2ranked
    ]:
        assert len(got) == num and len(set(got)) == num
        assert set(got) <= set(ranked[start:stop]), (mode, got)
    # Not simply the first ranks of the pool: over all captions the picks spread out.
    picked_ranks = {txt2ranked[t].index(n) for t, negs in miner.txt2neg_imgs.items() for n in negs}
    assert picked_ranks == set(range(start, min(stop, len(split.img_names) - 1)))


@pytest.mark.parametrize("mode", ["random", "top-random", "10-20"])
def test_sampling_is_deterministic_per_seed_and_round(dataset, hand_made, mode) -> None:
    first = mine(dataset, 3, mode, seed=1, step=4, epoch=1)
    again = mine(dataset, 3, mode, seed=1, step=4, epoch=1)
    assert first.state_dict() == again.state_dict()
    other_seed = mine(dataset, 3, mode, seed=2, step=4, epoch=1)
    other_step = mine(dataset, 3, mode, seed=1, step=8, epoch=1)
    assert other_seed.txt2neg_imgs != first.txt2neg_imgs
    assert other_step.txt2neg_imgs != first.txt2neg_imgs


def test_random_never_picks_a_positive_and_needs_no_model(dataset, monkeypatch) -> None:
    def no_encoding(*args, **kwargs):
        raise AssertionError("mode random must not encode the split")

    monkeypatch.setattr(evaluation, "encode_split", no_encoding)
    num = 6
    miner = mine(dataset, num, "random", seed=3)
    tdb = dataset.txt_dbs[0]
    names = set(tdb.img_order)
    assert set(miner.txt2neg_imgs) == set(tdb.ids)
    for txt_id, negs in miner.txt2neg_imgs.items():
        assert len(negs) == num and len(set(negs)) == num
        assert tdb.txt2img[txt_id] not in negs and set(negs) <= names
    for name, negs in miner.img2neg_txts.items():
        assert len(negs) == num and len(set(negs)) == num
        assert all(tdb.txt2img[t] != name for t in negs) and set(negs) <= set(tdb.ids)
    # Uniform over the split: the picks reach (almost) every image and many captions.
    assert len({n for negs in miner.txt2neg_imgs.values() for n in negs}) == len(names)
    assert len({t for negs in miner.img2neg_txts.values() for t in negs}) > len(tdb.ids) // 2


def test_negatives_stay_within_their_own_pair(synthetic_tiny, hand_made) -> None:
    train, val = (TxtDb(synthetic_tiny["txt_db"][s]) for s in ("train", "val"))
    img = ImgDb(synthetic_tiny["img_db"])
    ds = RetrievalDataset([train, val], [img, img])
    miner = mine(ds, 3, "top")
    for tdb, split in zip((train, val), miner._splits):
        txt2ranked, img2ranked = brute_force_rankings(split, *hand_made[split.name])
        for txt_id in tdb.ids:
            assert miner.txt2neg_imgs[txt_id] == txt2ranked[txt_id][:3]
            assert set(miner.txt2neg_imgs[txt_id]) <= set(tdb.img_order)
        for name in tdb.img_order:
            assert miner.img2neg_txts[name] == img2ranked[name][:3]
            assert set(miner.img2neg_txts[name]) <= set(tdb.ids)


def test_state_round_trip_gives_the_dataset_the_same_negatives(synthetic_tiny, hand_made) -> None:
    def fresh() -> RetrievalDataset:
        return RetrievalDataset([TxtDb(synthetic_tiny["txt_db"]["train"])], [ImgDb(synthetic_tiny["img_db"])])

    miner = mine(fresh(), 2, "10-20", seed=9, step=12, epoch=2)
    state = miner.state_dict()
    assert (state["mined_at"], state["mined_epoch"]) == (12, 2)
    restored_set = fresh()
    restored = HardNegativeMiner(restored_set, 2, "10-20", 9)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored_set.hard_negatives.txt2neg_imgs == miner.txt2neg_imgs
    assert restored_set.hard_negatives.img2neg_txts == miner.img2neg_txts
    assert restored_set.num_hard_negatives == 2
    # Never mined: loading leaves the dataset without negatives.
    untouched = fresh()
    HardNegativeMiner(untouched, 2, "top", 0).load_state_dict(
        {"mined_at": -1, "mined_epoch": -1, "txt2neg_imgs": {}, "img2neg_txts": {}}
    )
    assert untouched.num_hard_negatives == 0


def test_top_with_a_real_model_matches_brute_force_on_its_embeddings(dataset) -> None:
    """End to end: the model encodes the split; `top` picks the best non-positives of its scores."""
    torch.manual_seed(0)
    tower = tiny_bert_config(int(dataset.txt_dbs[0].meta["v_range"][1]), dropout=0.0)
    model = BiEncoder(BiEncoderConfig(tower, tower, project_dim=16)).eval()
    randomize_(model, seed=1, scale=0.2)  # spread the embeddings apart
    num = 3
    miner = HardNegativeMiner(dataset, num, "top", 0)
    miner.mine(model, 0, 0, ENV, FP32, TRAIN, DATA)
    split = miner._splits[0]
    txt_emb, img_emb = encode_split(model, split, ENV, FP32, TRAIN, DATA)
    scores = (txt_emb.double() @ img_emb.double().t())
    position = {name: j for j, name in enumerate(split.img_names)}
    ids = split.txt_db.ids
    tol = 1e-4 * float(scores.abs().max())
    for t, txt_id in enumerate(ids):
        negs = miner.txt2neg_imgs[txt_id]
        positive = split.txt2img[t]
        assert len(negs) == num and split.img_names[positive] not in negs
        picked = [position[n] for n in negs]
        others = [j for j in range(len(split.img_names)) if j != positive and j not in picked]
        # Best first, and nothing left out scores above what was picked (up to float32 rounding).
        got = scores[t, picked]
        assert (got[:-1] >= got[1:] - tol).all()
        assert scores[t, others].max() <= got.min() + tol
    txt_index = {txt_id: t for t, txt_id in enumerate(ids)}
    for i, name in enumerate(split.img_names):
        negs = miner.img2neg_txts[name]
        assert len(negs) == num and all(split.txt_db.txt2img[t] != name for t in negs)
        picked = [txt_index[t] for t in negs]
        others = [t for t in range(len(ids)) if split.txt2img[t] != i and t not in picked]
        got = scores[picked, i]
        assert (got[:-1] >= got[1:] - tol).all()
        assert scores[others, i].max() <= got.min() + tol
