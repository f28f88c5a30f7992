"""Datasets and collators: the batch layout of docs/architecture.md."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.datasets import (
    IGNORE_INDEX,
    HardNegatives,
    ImageEvalDataset,
    ItmRankDataset,
    PairDataset,
    RetrievalDataset,
    SmrmDataset,
    TextEvalDataset,
    VmlmDataset,
    image_eval_collate,
    itm_rank_collate,
    mask_tokens,
    pair_collate,
    retrieval_collate,
    select_hard_negatives,
    smrm_collate,
    text_eval_collate,
    vmlm_collate,
)
from data.img_db import ImgDb, image_key
from data.samplers import DistinctImageBatchSampler
from data.txt_db import TxtDb, TxtDbWriter
from tests.helpers import BERT_META


@pytest.fixture()
def dbs(synthetic_tiny):
    return TxtDb(synthetic_tiny["txt_db"]["train"]), ImgDb(synthetic_tiny["img_db"])


def _check_text(txt, tdb, rows):
    ids, mask = txt["input_ids"], txt["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[0] == rows
    lens = mask.sum(1)
    assert (ids[:, 0] == tdb.cls_id).all()
    assert (ids[torch.arange(rows), lens - 1] == tdb.sep_id).all()
    assert (ids[mask == 0] == 0).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding


def _check_img(img, idb, names):
    b = len(names)
    assert img["img_feat"].shape[::2] == (b, 2048) and img["img_feat"].dtype == torch.float32
    assert img["img_pos"].shape[::2] == (b, 7) and img["img_mask"].dtype == torch.long
    assert img["img_mask"].sum(1).tolist() == [min(idb.name2nbb[n], 100) for n in names]
    assert (img["img_feat"][img["img_mask"] == 0] == 0).all()


def test_retrieval_batch_layout(dbs):
    tdb, idb = dbs
    ds = RetrievalDataset([tdb], [idb])
    assert len(ds) == len(tdb) and ds.img_names[0] == tdb.txt2img[tdb.ids[0]]
    batch = retrieval_collate([ds[i] for i in (0, 7, 13)])
    assert set(batch) == {"txt", "img", "num_pos", "txt_img_keys", "img_keys", "txt_ids",
                          "img_names"}
    assert batch["num_pos"] == 3 and batch["txt_ids"] == [tdb.ids[i] for i in (0, 7, 13)]
    assert batch["img_names"] == [tdb.txt2img[t] for t in batch["txt_ids"]]
    _check_text(batch["txt"], tdb, 3)
    _check_img(batch["img"], idb, batch["img_names"])
    assert batch["txt"]["input_ids"][1, 1:1 + tdb.lens[7]].tolist() == tdb.input_ids(tdb.ids[7])
    assert batch["img_keys"].tolist() == [image_key(n) for n in batch["img_names"]]
    assert batch["txt_img_keys"].tolist() == batch["img_keys"].tolist()
    feat, pos, _ = idb.tensors(batch["img_names"][2])
    n = feat.shape[0]
    assert torch.equal(batch["img"]["img_feat"][2, :n], feat)
    assert torch.equal(batch["img"]["img_pos"][2, :n], pos)


def test_retrieval_hard_negatives_appended_after_positives(dbs):
    tdb, idb = dbs
    ds = RetrievalDataset([tdb], [idb])
    rng = np.random.default_rng(0)
    t0, t1 = tdb.ids[0], tdb.ids[10]
    img0, img1 = tdb.txt2img[t0], tdb.txt2img[t1]
    others = [n for n in dict.fromkeys(tdb.txt2img.values()) if n not in (img0, img1)]
    txt2neg = {t0: select_hard_negatives(others, [img0], 2, "top", rng), t1: [img0, others[0]]}
    img2neg = {img0: [t for t in tdb.ids if tdb.txt2img[t] != img0][:2]}
    ds.set_hard_negatives(txt2neg, img2neg, num_hard_negatives=2)
    batch = retrieval_collate([ds[0], ds[10]])
    assert batch["num_pos"] == 2
    # img0 (a positive) and others[0] (already added) are not repeated.
    assert batch["img_names"] == [img0, img1, others[0], others[1]]
    assert batch["txt_ids"] == [t0, t1, *img2neg[img0]]
    assert batch["txt_img_keys"].tolist() == [image_key(tdb.txt2img[t]) for t in batch["txt_ids"]]
    assert batch["img"]["img_feat"].shape[0] == 4 and batch["txt"]["input_ids"].shape[0] == 4
    ds.set_hard_negatives(None, None, 0)
    assert retrieval_collate([ds[0]])["img_names"] == [img0]
    with pytest.raises(ValueError, match="'nope.npz'"):
        ds.set_hard_negatives({t0: ["nope.npz"]}, None, 1)


def test_missing_image_error_names_both_ids(dbs, tmp_path):
    _, idb = dbs
    with TxtDbWriter(str(tmp_path / "txt"), BERT_META) as w:
        w.add("4", {"input_ids": [1000], "img_fname": "synth_000000.npz"})
        w.add("5", {"input_ids": [1001], "img_fname": "missing.npz"})
    with pytest.raises(ValueError, match=r"caption '5'.*'missing\.npz'.*img_db .*img_db"):
        RetrievalDataset([TxtDb(str(tmp_path / "txt"))], [idb])
    with pytest.raises(ValueError, match="as many img_dbs"):
        RetrievalDataset([TxtDb(str(tmp_path / "txt"))], [])


def test_mask_tokens_statistics():
    rng = np.random.default_rng(0)
    ids = list(range(1000, 1100)) * 400
    out, labels = mask_tokens(ids, rng, 0.15, mask_id=103, v_range=(999, 28996))
    out, labels, ids = np.array(out), np.array(labels), np.array(ids)
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.mean() - 0.15) < 0.01
    assert (labels[chosen] == ids[chosen]).all() and (out[~chosen] == ids[~chosen]).all()
    masked = (out == 103)[chosen].mean()
    kept = (out == ids)[chosen].mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015  # (random may hit the same id)
    rand = out[chosen & (out != 103) & (out != ids)]
    assert rand.min() >= 999 and rand.max() < 28996
    # At least one masked, never more than the caption.
    for seed in range(50):
        _, lab = mask_tokens([5, 6], np.random.default_rng(seed), 0.15, 103, (999, 1000))
        assert sum(x != IGNORE_INDEX for x in lab) >= 1
    assert mask_tokens([], rng, 0.15, 103, (999, 1000)) == ([], [])


def test_vmlm_batch(dbs):
    tdb, idb = dbs
    ds = VmlmDataset([tdb], [idb], mask_prob=0.15, seed=3)
    batch = vmlm_collate([ds[i] for i in range(6)])
    assert set(batch) == {"txt", "img", "txt_labels", "txt_ids", "img_names"}
    _check_text(batch["txt"], tdb, 6)
    labels, mask = batch["txt_labels"], batch["txt"]["attention_mask"]
    assert labels.shape == mask.shape and labels.dtype == torch.long
    lens = mask.sum(1)
    assert (labels[:, 0] == IGNORE_INDEX).all()
    assert (labels[torch.arange(6), lens - 1] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert ((labels != IGNORE_INDEX).sum(1) >= 1).all()
    for row, i in enumerate(range(6)):
        orig = tdb.input_ids(tdb.ids[i])
        lab = labels[row, 1:1 + len(orig)]
        assert (lab[lab != IGNORE_INDEX] == torch.tensor(orig)[lab != IGNORE_INDEX]).all()
    # Deterministic per (seed, epoch, index), whatever the order of access.
    assert torch.equal(ds[4]["input_ids"], VmlmDataset([tdb], [idb], seed=3)[4]["input_ids"])
    draws = {tuple(ds[4]["txt_labels"].tolist())}
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        draws.add(tuple(ds[4]["txt_labels"].tolist()))
    assert len(draws) > 1


def test_smrm_batch(dbs):
    tdb, idb = dbs
    ds = SmrmDataset([tdb], [idb], mrm_prob=0.15, seed=1)
    items = [ds[i] for i in (0, 5, 20, 33)]
    batch = smrm_collate(items)
    assert set(batch) == {"txt", "img", "feat_targets", "label_targets", "txt_ids", "img_names"}
    img = batch["img"]
    masked = img["img_masked"]
    assert masked.dtype == torch.bool and masked.shape == img["img_mask"].shape
    assert (img["img_mask"][masked] == 1).all() and (masked.sum(1) >= 1).all()
    assert (img["img_feat"][masked] == 0).all()
    rows = masked.nonzero().tolist()
    assert batch["feat_targets"].shape == (len(rows), 2048)
    assert batch["label_targets"].shape == (len(rows), 1601)
    names = [tdb.txt2img[tdb.ids[i]] for i in (0, 5, 20, 33)]
    for r, (b, j) in enumerate(rows):
        feat, _, soft = idb.tensors(names[b])
        assert torch.equal(batch["feat_targets"][r], feat[j])
        assert torch.equal(batch["label_targets"][r], soft[j])
    unmasked = img["img_mask"].bool() & ~masked
    b, j = unmasked.nonzero()[0].tolist()
    assert torch.equal(img["img_feat"][b, j], idb.tensors(names[b])[0][j])
    # About mrm_prob of the boxes are masked over many draws.
    frac = np.mean([ds[i]["img_masked"].float().mean().item() for i in range(len(ds))])
    assert 0.1 < frac < 0.3


def test_eval_datasets_and_loader(dbs):
    tdb, idb = dbs
    images = ImageEvalDataset(idb, tdb.img_order)
    assert images.lens == [idb.name2nbb[n] for n in tdb.img_order]
    order = sorted(range(len(images)), key=lambda i: -images.lens[i])[:5]
    batch = image_eval_collate([images[i] for i in order])
    assert set(batch) == {"img", "img_names", "index"}
    assert batch["index"].tolist() == order
    assert batch["img_names"] == [tdb.img_order[i] for i in order]
    _check_img(batch["img"], idb, batch["img_names"])
    texts = TextEvalDataset(tdb)
    loader = DataLoader(texts, batch_size=64, collate_fn=text_eval_collate)
    got = [b for b in loader]
    assert set(got[0]) == {"txt", "txt_ids", "index"}
    assert torch.cat([b["index"] for b in got]).tolist() == list(range(len(tdb)))
    assert [t for b in got for t in b["txt_ids"]] == tdb.ids
    _check_text(got[0]["txt"], tdb, 64)
    with pytest.raises(ValueError, match="'x.npz'"):
        ImageEvalDataset(idb, ["x.npz"])


def test_pair_dataset(dbs):
    tdb, idb = dbs
    pairs = [(tdb.ids[0], tdb.img_order[3]), (tdb.ids[1], tdb.img_order[0])]
    batch = pair_collate([PairDataset(tdb, idb, pairs)[i] for i in range(2)])
    assert set(batch) == {"txt", "img", "txt_ids", "img_names"}
    assert batch["txt_ids"] == [tdb.ids[0], tdb.ids[1]]
    assert batch["img_names"] == [tdb.img_order[3], tdb.img_order[0]]
    _check_text(batch["txt"], tdb, 2)
    _check_img(batch["img"], idb, batch["img_names"])


@pytest.mark.parametrize("side,group", [("both", 5), ("image", 3), ("text", 3)])
def test_itm_rank_groups(dbs, side, group):
    tdb, idb = dbs
    ds = ItmRankDataset([tdb], [idb], negative_size=2, negative_side=side, seed=0)
    assert ds.group_size == group
    batch = itm_rank_collate([ds[i] for i in (0, 9, 17)])
    assert batch["group_size"] == group
    assert batch["labels"].tolist() == ([1] + [0] * (group - 1)) * 3
    _check_text(batch["txt"], tdb, 3 * group)
    _check_img(batch["img"], idb, batch["img_names"])
    for g, i in enumerate((0, 9, 17)):
        rows = range(g * group, (g + 1) * group)
        txts = [batch["txt_ids"][r] for r in rows]
        imgs = [batch["img_names"][r] for r in rows]
        assert (txts[0], imgs[0]) == (tdb.ids[i], tdb.txt2img[tdb.ids[i]])
        for t, n in zip(txts[1:], imgs[1:]):
            assert tdb.txt2img[t] != n  # every other row is a negative pair
            assert t == txts[0] or n == imgs[0]


def test_itm_rank_uses_hard_negatives_first(dbs):
    tdb, idb = dbs
    t0 = tdb.ids[0]
    img0 = tdb.txt2img[t0]
    hard_img = next(n for n in tdb.img_order if n != img0)
    hard_txt = next(t for t in tdb.ids if tdb.txt2img[t] != img0)
    ds = ItmRankDataset([tdb], [idb], negative_size=2,
                        hard_negatives=HardNegatives({t0: [img0, hard_img]}, {img0: [hard_txt]}))
    item = ds[0]
    assert item["img_names"][1] == hard_img and img0 not in item["img_names"][1:3]
    assert item["txt_ids"][3] == hard_txt
    with pytest.raises(ValueError, match="negative_size"):
        ItmRankDataset([tdb], [idb], negative_size=0)


def test_select_hard_negatives_modes():
    ranked = [f"c{i}" for i in range(100)]
    pos = {"c0", "c3"}
    rng = np.random.default_rng(0)
    assert select_hard_negatives(ranked, pos, 3, "none", rng) == []
    assert select_hard_negatives(ranked, pos, 3, "top", rng) == ["c1", "c2", "c4"]
    non_pos = [c for c in ranked if c not in pos]
    for mode, pool in [("random", non_pos), ("top-random", non_pos[:50]),
                       ("10-20", non_pos[10:20]), ("20-30", non_pos[20:30])]:
        got = select_hard_negatives(ranked, pos, 5, mode, rng)
        assert len(got) == len(set(got)) == 5 and set(got) <= set(pool), mode
    assert len(select_hard_negatives(ranked, pos, 40, "top-random", rng)) == 40
    assert set(select_hard_negatives(ranked, pos, 40, "top-random", rng)) <= set(non_pos[:90])
    assert len(select_hard_negatives(ranked[:4], pos, 5, "random", rng)) == 2
    with pytest.raises(ValueError, match="unknown hard negative"):
        select_hard_negatives(ranked, pos, 3, "best", rng)


def test_dataloader_workers_match_the_main_process(dbs):
    tdb, idb = dbs
    ds = VmlmDataset([tdb], [idb], seed=5)
    ds.set_epoch(2)
    sampler = DistinctImageBatchSampler(ds.img_names, ds.lens, batch_size=8, seed=1)

    def run(workers):
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=vmlm_collate,
                            num_workers=workers, multiprocessing_context="fork" if workers else None)
        return [b["txt"]["input_ids"] for b in loader], [b["txt_labels"] for b in loader]

    (ids0, lab0), (ids1, lab1) = run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(ids0 + lab0, ids1 + lab1))
