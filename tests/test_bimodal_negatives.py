"""VLDeformer's bi-modal hard negatives (data/composed_negatives.py): word replacement, region
mixing, the dataset / collate rows and keys, the loss with them by hand, and two gloo ranks
against one process on the concatenated batch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train_itm
from data.composed_negatives import (
    composed_caption_id,
    composed_image_name,
    is_composed,
    mix_regions,
    read_object_vocab,
    replace_words,
    write_object_vocab,
)
from data.datasets import RetrievalDataset, retrieval_collate
from data.img_db import image_key
from data.synthetic import COLOURS, OBJECTS, SIZES, vocabulary
from data.txt_db import TxtDb
from model.losses import contrastive_loss
from tests.helpers import first_epoch_rank_batches, itm_config, write_config
from tests.test_distributed_training import PER_RANK_BATCH, WORLD, _torchrun
from utils.config import BimodalNegatives, DataConfig, load_config
from utils.engine.metrics_log import read_metrics
from utils.errors import ConfigError, DataError
from utils.pipeline.evaluation import open_img_db

GROUPS = [[10, 11, 12, 13], [20, 21]]


def test_word_replacement_touches_only_vocabulary_words_within_their_group():
    ids = [101, 5, 10, 6, 20, 12, 7, 102]
    words = {t: g for g, group in enumerate(GROUPS) for t in group}
    changed = 0
    for seed in range(200):
        out = replace_words(ids, GROUPS, 0.3, np.random.default_rng(seed))
        assert len(out) == len(ids)
        diff = [p for p, (a, b) in enumerate(zip(ids, out)) if a != b]
        assert diff, "a composed caption must differ from the positive"
        for p in diff:
            assert ids[p] in words and out[p] in words and words[out[p]] == words[ids[p]]
        changed += len(diff)
    # About 0.3 of the 3 vocabulary words, at least one: between 0.9 and 1.4 per caption.
    assert 0.9 * 200 <= changed <= 1.4 * 200
    assert replace_words([101, 5, 6, 102], GROUPS, 0.3, np.random.default_rng(0)) is None


def test_vocabulary_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "v.txt"
    write_object_vocab(path, [12, 10, 20, 21, 30], ["obj", "obj", "col", "col", "lonely"], ["a", "b", "c", "d", "e"])
    assert read_object_vocab(path) == [[20, 21], [10, 12]]
    (tmp_path / "bad.txt").write_text("10 obj\n10 col\n")
    with pytest.raises(DataError, match="groups"):
        read_object_vocab(tmp_path / "bad.txt")
    (tmp_path / "one.txt").write_text("10\n")
    with pytest.raises(DataError, match="two token ids"):
        read_object_vocab(tmp_path / "one.txt")


def test_synthetic_vocabulary_file_lists_its_object_and_attribute_words(tiny_data):
    vocab = vocabulary()
    groups = read_object_vocab(tiny_data["root"] + "/object_vocab.txt")
    as_words = sorted(sorted(vocab[t] for t in g) for g in groups)
    assert as_words == sorted([sorted(OBJECTS), sorted(COLOURS), sorted(SIZES)])


@pytest.mark.parametrize("n,m", [(10, 12), (10, 3), (1, 5), (7, 7)])
def test_region_mix_keeps_the_box_count_and_the_rows(n, m):
    own = (torch.arange(n * 2.0).view(n, 2), torch.arange(n * 7.0).view(n, 7), torch.arange(n)[:, None] + 0.5)
    other = (-1 - torch.arange(m * 2.0).view(m, 2), -1 - torch.arange(m * 7.0).view(m, 7), -torch.arange(m)[:, None])
    feat, pos, labels = mix_regions(own, other, 0.5, np.random.default_rng(1))
    assert feat.shape[0] == pos.shape[0] == labels.shape[0] == n
    from_own = [r for r in range(n) if feat[r, 0] >= 0]
    borrowed = [r for r in range(n) if feat[r, 0] < 0]
    expected_borrowed = min(max(1, min(round(n * 0.5), n - 1)), m) if n >= 2 else min(round(n * 0.5), m)
    assert len(borrowed) == expected_borrowed
    # Each row keeps its own box and label: a region moves with its position.
    for r in from_own:
        i = int(feat[r, 0]) // 2
        assert torch.equal(pos[r], own[1][i]) and torch.equal(labels[r], own[2][i])
    for r in borrowed:
        i = int(-1 - feat[r, 0]) // 2
        assert torch.equal(pos[r], other[1][i]) and torch.equal(labels[r], other[2][i])
    assert from_own == sorted(from_own) and all(r < min(borrowed, default=n) for r in from_own)


def test_config_spec_is_checked():
    assert BimodalNegatives.from_config({}) is None
    assert BimodalNegatives.from_config({"text": 0, "image": 0}) is None
    spec = BimodalNegatives.from_config({"image": 2})
    assert (spec.text, spec.image, spec.region_mix) == (0, 2, 0.5)
    for bad, key in (({"text": 1}, "vocab"), ({"image": -1}, "image"), ({"images": 1}, "unknown"),
                     ({"image": 1, "region_mix": 1.0}, "region_mix")):
        with pytest.raises(ConfigError, match=key):
            BimodalNegatives.from_config(bad)


def _dataset(data, spec: dict, seed: int = 3) -> RetrievalDataset:
    dataset = RetrievalDataset([TxtDb(data["txt_db"]["train"], 40)], [open_img_db(data["img_db"], DataConfig())])
    dataset.set_bimodal_negatives(BimodalNegatives.from_config(spec), seed)
    return dataset


def test_dataset_adds_composed_rows_with_keys_of_no_real_image(tiny_data):
    spec = {"text": 2, "image": 2, "vocab": tiny_data["root"] + "/object_vocab.txt"}
    dataset = _dataset(tiny_data, spec)
    items = [dataset[i] for i in range(4)]
    batch = retrieval_collate(items)
    assert batch["num_pos"] == 4
    assert len(batch["txt_ids"]) == 4 + 4 * 2 and len(batch["img_names"]) == 4 + 4 * 2
    real_keys = {image_key(n) for n in dataset.img_names}
    for row, name in enumerate(batch["img_names"][4:], start=4):
        assert is_composed(name) and int(batch["img_keys"][row]) not in real_keys
        # The composed image has as many real regions as its positive.
        positive = batch["img_names"].index(items[(row - 4) // 2]["img_name"])
        assert int(batch["img"]["img_mask"][row].sum()) == int(batch["img"]["img_mask"][positive].sum())
    for row, txt_id in enumerate(batch["txt_ids"][4:], start=4):
        assert is_composed(txt_id) and int(batch["txt_img_keys"][row]) not in real_keys
        positive = (row - 4) // 2
        n = int(batch["txt"]["attention_mask"][positive].sum())
        assert int(batch["txt"]["attention_mask"][row].sum()) == n
        assert not torch.equal(batch["txt"]["input_ids"][row, :n], batch["txt"]["input_ids"][positive, :n])
    # The same example of the same epoch gives the same negatives; another epoch, others.
    again = dataset[0]
    assert torch.equal(again["neg_imgs"][0][1], items[0]["neg_imgs"][0][1])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["neg_imgs"][0][1], items[0]["neg_imgs"][0][1])


def test_loss_with_bimodal_negatives_by_hand():
    """Two pairs (A, B) and a second caption of A's image, plus one composed caption of A and
    one composed image of B: composed rows are candidates in both directions and are never
    masked as duplicates; the real duplicate is."""
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.1], [0.9, 0.3]])  # a1, b1, a2 (dup), a1'
    img = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.3, 0.9]])  # IA, IB, IB'
    ka, kb = image_key("A"), image_key("B")
    txt_keys = torch.tensor([ka, kb, ka, image_key(composed_caption_id("a1", 0))])
    img_keys = torch.tensor([ka, kb, image_key(composed_image_name("b1", 0))])
    # a2 pairs with IA as well, so it is a positive row of the batch (rows 0..2 positives).
    txt_p = txt[[0, 1, 2, 3]]
    img_p = torch.cat([img[:2], img[:1], img[2:]])  # IA, IB, IA (a2's image), IB'
    img_keys_p = torch.tensor([ka, kb, ka, int(img_keys[2])])
    out = contrastive_loss(txt_p, img_p, num_pos=3, txt_img_keys=txt_keys, img_keys=img_keys_p, gather=False,
                           temperature=0.5)
    s = (txt_p @ img_p.t() / 0.5).tolist()

    def ce(row: list[float], target: int, keep: list[int]) -> float:
        return -row[target] + math.log(sum(math.exp(row[c]) for c in keep))

    # t2i: caption r against images; columns holding its own image elsewhere are dropped.
    t2i = [ce(s[0], 0, [0, 1, 3]), ce(s[1], 1, [0, 1, 2, 3]), ce(s[2], 2, [1, 2, 3])]
    # i2t: image r against captions 0..3; other captions of its image dropped, a1' kept.
    col = [[s[t][i] for t in range(4)] for i in range(3)]
    i2t = [ce(col[0], 0, [0, 1, 3]), ce(col[1], 1, [0, 1, 2, 3]), ce(col[2], 2, [1, 2, 3])]
    assert out.loss.item() == pytest.approx(0.5 * sum(t2i) / 3 + 0.5 * sum(i2t) / 3, rel=1e-6)


def _vld_config(tiny_data, tiny_models, tmp_path) -> str:
    cfg = itm_config(tiny_data, tiny_models, train_batch_size=PER_RANK_BATCH, num_train_steps=1,
                     warmup_steps=0, valid_steps=100, save_steps=0)
    cfg["model"] = {"type": "vldeformer", "img_model_config": tiny_models["img"], "project_dim": 0,
                    "dropout": 0.0, "temperature": 0.05}
    cfg["train"]["bimodal_negatives"] = {"text": 1, "image": 1, "vocab": tiny_data["root"] + "/object_vocab.txt"}
    return write_config(tmp_path / "c.yaml", cfg)


def test_two_gloo_ranks_give_the_loss_of_one_process(tiny_data, tiny_models, tmp_path):
    config = _vld_config(tiny_data, tiny_models, tmp_path)
    out = tmp_path / "ddp"
    proc = _torchrun("train_itm.py", config, out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logged = [r["loss"] for r in read_metrics(out, "train")]

    cfg = load_config(config)
    model = train_itm.build_model(cfg)
    dataset = RetrievalDataset([TxtDb(p, cfg.data.max_txt_len) for p in cfg.data.train_txt_dbs],
                               [open_img_db(p, cfg.data) for p in cfg.data.train_img_dbs])
    dataset.set_bimodal_negatives(cfg.data.bimodal_negatives, cfg.train.seed)
    dataset.set_epoch(0)
    first = [batches[0] for batches in first_epoch_rank_batches(dataset, cfg, WORLD, PER_RANK_BATCH)]
    # One process: rank 0's examples then rank 1's; the positives first, then the negatives
    # of rank 0 and those of rank 1, as the gather orders them.
    batches = [retrieval_collate([dataset[i] for i in first[r]]) for r in range(WORLD)]
    assert all(len(b["txt_ids"]) > b["num_pos"] and len(b["img_names"]) > b["num_pos"] for b in batches)
    with torch.no_grad():
        # The model returns its embedding levels; a flat model has one.
        embs = [tuple(levels[-1] for levels in model(b)) for b in batches]

    def order(side: int, keys: str) -> tuple[torch.Tensor, torch.Tensor]:
        pos = [e[side][: b["num_pos"]] for e, b in zip(embs, batches)]
        neg = [e[side][b["num_pos"]:] for e, b in zip(embs, batches)]
        kpos = [b[keys][: b["num_pos"]] for b in batches]
        kneg = [b[keys][b["num_pos"]:] for b in batches]
        return torch.cat(pos + neg), torch.cat(kpos + kneg)

    txt, txt_keys = order(0, "txt_img_keys")
    img, img_keys = order(1, "img_keys")
    ref = contrastive_loss(txt, img, num_pos=WORLD * PER_RANK_BATCH, txt_img_keys=txt_keys, img_keys=img_keys,
                           gather=False, temperature=model.loss_temperature)
    assert logged[0] == pytest.approx(ref.loss.item(), rel=1e-5)


def test_make_object_vocab_keeps_single_piece_names(tiny_data, tmp_path):
    from scripts import make_object_vocab

    objects = tmp_path / "objects_vocab.txt"
    objects.write_text("dog\ncat,car\ntraffic light\nzebra\ndog\n")
    out = tmp_path / "vocab.txt"
    assert make_object_vocab.main(["--objects", str(objects), "--tokenizer", tiny_data["tokenizer"],
                                   "--output", str(out)]) == 0
    vocab = vocabulary()
    assert read_object_vocab(out) == [sorted(vocab.index(w) for w in ("dog", "cat", "car"))]
