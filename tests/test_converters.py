"""Converters and their CLIs on small inputs, with the synthetic tokenizer as local HF tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data.converters import (
    convert_karpathy,
    convert_npz_dir,
    load_tokenizer,
    vocab_range,
)
from data.img_db import ImgDb
from data.txt_db import TxtDb
from scripts import build_img_db, build_txt_db
from tests.helpers import leftovers, random_detections


def _karpathy(path):
    def img(imgid, split, fname, sentids, raws):
        return {"filename": fname, "imgid": imgid, "split": split, "sentids": sentids,
                "sentences": [{"raw": r, "tokens": r.lower().split(), "sentid": s, "imgid": imgid}
                              for s, r in zip(sentids, raws)]}

    data = {"dataset": "coco", "images": [
        img(0, "train", "COCO_train2014_000000000009.jpg", [12, 3],
            ["A red dog next to a blue car.", "A dog"]),
        img(1, "test", "COCO_val2014_000000000042.jpg", [7], ["A small cat"]),
        img(2, "restval", "COCO_val2014_000000000073.jpg", [100, 20],
            ["Two green birds", "a kite above a tree"]),
    ]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def tok_dir(synthetic_tiny):
    return synthetic_tiny["tokenizer"]


def test_karpathy_train_restval(tmp_path, tok_dir):
    src = _karpathy(tmp_path / "dataset_coco.json")
    stats = convert_karpathy(str(src), str(tmp_path / "db"), tok_dir, ["train", "restval"],
                             progress=False)
    assert stats["captions"] == 4 and stats["images"] == 2
    db = TxtDb(str(tmp_path / "db"))
    assert db.ids == ["3", "12", "20", "100"]  # numeric order
    assert db.img_order == ["COCO_train2014_000000000009.npz", "COCO_val2014_000000000073.npz"]
    tok = load_tokenizer(tok_dir)
    rec = db.record("12")
    assert rec["input_ids"] == tok("A red dog next to a blue car.", add_special_tokens=False)[
        "input_ids"]
    assert rec["toked_caption"] == ["a", "red", "dog", "next", "to", "a", "blue", "car", "."]
    assert rec["img_fname"] == "COCO_train2014_000000000009.npz"
    assert (rec["raw"], rec["sentid"], rec["imgid"]) == ("A red dog next to a blue car.", 12, 0)
    assert rec["tokens"] == ["a", "red", "dog", "next", "to", "a", "blue", "car."]
    assert tok.unk_token_id not in rec["input_ids"]
    meta = db.meta
    assert (meta["UNK"], meta["CLS"], meta["SEP"], meta["MASK"]) == (100, 101, 102, 103)
    assert meta["v_range"] == vocab_range(tok) == [104, len(tok.get_vocab())]
    assert meta["bert"] == tok_dir
    with pytest.raises(ValueError, match="splits present"):
        convert_karpathy(str(src), str(tmp_path / "db2"), tok_dir, ["val"], progress=False)


def test_txt_cli_karpathy_and_multi30k(tmp_path, tok_dir, capsys):
    src = _karpathy(tmp_path / "k.json")
    assert build_txt_db.main(["--karpathy", str(src), "--split", "test", "--tokenizer", tok_dir,
                              "--out", str(tmp_path / "test_db"), "--no-progress"]) == 0
    assert "1 captions of 1 images" in capsys.readouterr().out
    assert TxtDb(str(tmp_path / "test_db")).ids == ["7"]

    (tmp_path / "images.txt").write_text("1000092795.jpg\n10002456.jpg\n")
    (tmp_path / "c1.de").write_text("ein roter hund\nzwei katzen\n")
    (tmp_path / "c2.de").write_text("a dog\na cat\n")
    captions = [str(tmp_path / "c1.de"), str(tmp_path / "c2.de")]
    assert build_txt_db.main(["--multi30k-captions", *captions,
                              "--multi30k-images", str(tmp_path / "images.txt"),
                              "--tokenizer", tok_dir, "--out", str(tmp_path / "m30k"),
                              "--no-progress"]) == 0
    db = TxtDb(str(tmp_path / "m30k"))
    assert db.ids == ["0", "1", "2", "3"]
    assert db.img2txts == {"1000092795.npz": ["0", "1"], "10002456.npz": ["2", "3"]}
    assert db.record("3")["raw"] == "a cat"
    (tmp_path / "short.de").write_text("only one line\n")
    with pytest.raises(ValueError, match="1 captions but .* lists 2 images"):
        build_txt_db.main(["--multi30k-captions", str(tmp_path / "short.de"),
                           "--multi30k-images", str(tmp_path / "images.txt"),
                           "--tokenizer", tok_dir, "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):
        build_txt_db.main(["--karpathy", str(src), "--tokenizer", tok_dir, "--out", "x"])


def test_tokenizer_must_be_a_local_directory(tmp_path):
    src = _karpathy(tmp_path / "k.json")
    with pytest.raises(FileNotFoundError, match="'bert-base-cased'.*local directory"):
        convert_karpathy(str(src), str(tmp_path / "db"), "bert-base-cased", ["train"],
                         progress=False)
    assert not (tmp_path / "db").exists()


def test_npz_dir_to_img_db(tmp_path, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "npz"
    npz.mkdir()
    arrays = {}
    for i, n in enumerate([12, 15, 8]):
        arrays[f"im{i}.npz"] = random_detections(rng, n)
        np.savez(npz / f"im{i}.npz", **arrays[f"im{i}.npz"])
    shuffled = {k: a[::-1] for k, a in arrays["im1.npz"].items()}  # ascending conf
    np.savez(npz / "im1.npz", **shuffled)
    assert build_img_db.main(["--npz-dir", str(npz), "--out", str(tmp_path / "img"),
                              "--variant", "msgpack", "--variant", "compressed",
                              "--no-progress"]) == 0
    assert "1 re-sorted" in capsys.readouterr().out
    for compressed in (False, True):
        db = ImgDb(str(tmp_path / "img"), compressed=compressed)
        assert db.names == ["im0.npz", "im1.npz", "im2.npz"]
        conf = arrays["im1.npz"]["conf"].ravel()
        assert db.name2nbb["im1.npz"] == max(10, int((conf > np.float16(0.2)).sum()))
        got = db.get("im1.npz")
        np.testing.assert_array_equal(got["features"],
                                      arrays["im1.npz"]["features"][:db.name2nbb["im1.npz"]])
        assert db.get("im2.npz")["features"].shape[0] == 8
    stats = convert_npz_dir(str(npz), str(tmp_path / "fixed"), conf_th=-1, num_bb=5,
                            progress=False)
    assert stats["images"] == 3
    assert ImgDb(str(tmp_path / "fixed"), conf_th=-1, num_bb=5).get("im0.npz")["conf"].shape == (
        5, 1)


def test_failed_conversion_leaves_nothing(tmp_path):
    rng = np.random.default_rng(1)
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "a.npz", **random_detections(rng, 11))
    bad = random_detections(rng, 11)
    del bad["conf"]
    np.savez(npz / "b.npz", **bad)
    with pytest.raises(ValueError, match=r"b\.npz.*conf"):
        convert_npz_dir(str(npz), str(tmp_path / "img"), progress=False)
    assert not (tmp_path / "img").exists() and leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no .npz files"):
        convert_npz_dir(str(tmp_path), str(tmp_path / "img2"), progress=False)
