"""img_db reader against hand-built databases, nbb rule, box feature, writer (SPEC 2)."""
from __future__ import annotations

import json

import lmdb
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from data.img_db import (
    ImgDb,
    ImgDbWriter,
    box7,
    compute_nbb,
    feat_dir_name,
    image_key,
    nbb_file_name,
)
from data.lmdb_io import CorruptRecordError
from tests.helpers import leftovers, put_raw, random_detections, write_raw_img_db

NBB_FILE = "nbb_th0.2_max100_min10.json"
FEAT = "feat_th0.2_max100_min10"


def test_compute_nbb_threshold_is_strict_in_float16():
    conf = np.array([0.9, 0.5, 0.2001, 0.2, 0.2, 0.1], dtype=np.float16)
    # float16(0.2) == float16 threshold: not counted; float16(0.2001) is the next value up.
    assert compute_nbb(conf, 0.2, max_bb=100, min_bb=1) == 3
    assert compute_nbb(conf.reshape(-1, 1), 0.2, max_bb=100, min_bb=1) == 3
    # The comparison is made in float16: float16(0.3) = 0.30005 is not above 0.3.
    assert compute_nbb(np.array([0.3, 0.3], dtype=np.float16), 0.3, 100, 0) == 0
    assert compute_nbb(conf, 0.2, max_bb=100, min_bb=5) == 5
    assert compute_nbb(conf, 0.2, max_bb=2, min_bb=1) == 2
    assert compute_nbb(conf, 0.2, max_bb=100, min_bb=10) == 10  # may exceed the rows


def test_box7_hand_computed():
    bb = np.array([[0.1, 0.2, 0.5, 0.7, 0.4, 0.5], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]],
                  dtype=np.float16)
    out = box7(bb)
    assert out.dtype == np.float32 and out.shape == (2, 7)
    w, h = np.float32(np.float16(0.4)), np.float32(np.float16(0.5))
    np.testing.assert_array_equal(out[0, :6], bb[0].astype(np.float32))
    assert out[0, 6] == w * h  # float32 product of the float16 values
    assert out[1, 6] == 1.0
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        box7(np.zeros((2, 4)))


def test_names_and_image_key():
    assert nbb_file_name(0.2, 100, 10) == NBB_FILE
    assert nbb_file_name(0, 100, 10) == "nbb_th0.0_max100_min10.json"
    assert feat_dir_name(0.2, 100, 10, 36, compressed=False) == FEAT
    assert feat_dir_name(0.2, 100, 10, 36, compressed=True) == FEAT + "_compressed"
    assert feat_dir_name(-1, 100, 10, 36, compressed=False) == "feat_numbb36"
    k = image_key("flickr30k_000001.npz")
    assert k == image_key("flickr30k_000001.npz") and isinstance(k, int)
    assert -2**63 <= k < 2**63 and k != image_key("flickr30k_000002.npz")
    assert torch.tensor([k]).dtype == torch.long


def _images(rng):
    confs = {"a.npz": [0.9, 0.8, 0.7, 0.2, 0.1, 0.05],   # 0.2 not counted -> 3 kept
             "b.npz": [0.95, 0.6, 0.5, 0.4, 0.3, 0.25, 0.21, 0.1],
             "c.npz": [0.3, 0.1, 0.1, 0.1]}
    return {n: random_detections(rng, len(c), np.array(c)) for n, c in confs.items()}


@pytest.mark.parametrize("compressed", [False, True])
def test_reader_both_variants(tmp_path, compressed):
    rng = np.random.default_rng(0)
    images = _images(rng)
    name2nbb = {"a.npz": 3, "b.npz": 7, "c.npz": 2}
    feat_dir = FEAT + ("_compressed" if compressed else "")
    write_raw_img_db(tmp_path / "img", images, name2nbb, feat_dir, compressed, NBB_FILE)
    db = ImgDb(str(tmp_path / "img"), compressed=compressed)
    assert db.names == ["a.npz", "b.npz", "c.npz"]
    assert db.name2nbb == name2nbb
    assert "b.npz" in db and "zzz.npz" not in db and len(db) == 3
    got = db.get("b.npz")
    assert set(got) == {"features", "norm_bb", "conf", "soft_labels"}  # no 'allow_pickle'
    for k, arr in got.items():
        assert arr.dtype == np.float16 and arr.shape[0] == 7
        np.testing.assert_array_equal(arr, images["b.npz"][k][:7])
    feat, pos, soft = db.tensors("a.npz")
    assert feat.dtype == pos.dtype == soft.dtype == torch.float32
    assert feat.shape == (3, 2048) and pos.shape == (3, 7) and soft.shape == (3, 1601)
    np.testing.assert_array_equal(feat.numpy(), images["a.npz"]["features"][:3].astype(np.float32))
    np.testing.assert_array_equal(pos.numpy(), box7(images["a.npz"]["norm_bb"][:3]))
    assert db.tensors("c.npz", with_soft_labels=False)[2] is None
    with pytest.raises(KeyError, match="zzz.npz"):
        db.get("zzz.npz")


def test_reader_keeps_first_nbb_rows_of_longer_arrays(tmp_path):
    rng = np.random.default_rng(1)
    images = _images(rng)
    # Arrays stored unclipped: the reader still keeps the first nbb rows.
    write_raw_img_db(tmp_path / "img", images, None, FEAT, False)
    (tmp_path / "img" / NBB_FILE).write_text(json.dumps({"a.npz": 3, "b.npz": 7, "c.npz": 2}))
    db = ImgDb(str(tmp_path / "img"))
    np.testing.assert_array_equal(db.get("a.npz")["conf"], images["a.npz"]["conf"][:3])


@pytest.mark.parametrize("with_keys", [True, False])
def test_conf_th_minus_one_variant(tmp_path, with_keys):
    rng = np.random.default_rng(2)
    images = {f"{i}.npz": random_detections(rng, 5) for i in range(3)}
    write_raw_img_db(tmp_path / "img", images, None, "feat_numbb5", False, with_keys=with_keys)
    db = ImgDb(str(tmp_path / "img"), conf_th=-1, num_bb=5)
    assert sorted(db.names) == ["0.npz", "1.npz", "2.npz"]
    assert set(db.name2nbb.values()) == {5}
    assert db.tensors("1.npz")[0].shape == (5, 2048)


def test_missing_files_are_named(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImgDb(str(tmp_path / "nowhere"))
    write_raw_img_db(tmp_path / "img", _images(rng), {"a.npz": 3, "b.npz": 7, "c.npz": 2},
                     FEAT, False, nbb_file=None)
    with pytest.raises(FileNotFoundError, match=NBB_FILE.replace(".", r"\.")):
        ImgDb(str(tmp_path / "img"))
    with pytest.raises(FileNotFoundError, match=f"{FEAT}_compressed.*present.*{FEAT}"):
        ImgDb(str(tmp_path / "img"), compressed=True)
    with pytest.raises(FileNotFoundError, match="feat_th0.3_max100_min10"):
        ImgDb(str(tmp_path / "img"), conf_th=0.3)


def test_corrupt_values_name_the_key(tmp_path):
    rng = np.random.default_rng(4)
    name2nbb = {"a.npz": 3, "b.npz": 7, "c.npz": 2, "gone.npz": 10}
    for compressed in (False, True):
        feat_dir = FEAT + ("_compressed" if compressed else "")
        write_raw_img_db(tmp_path / "img", _images(rng), name2nbb, feat_dir, compressed, NBB_FILE)
        put_raw(tmp_path / "img" / feat_dir, "b.npz", b"\xc1garbage")
        db = ImgDb(str(tmp_path / "img"), compressed=compressed)
        with pytest.raises(CorruptRecordError, match="'b.npz'"):
            db.get("b.npz")
        with pytest.raises(KeyError, match="gone.npz.*missing from its LMDB"):
            db.tensors("gone.npz")


def test_writer_round_trip_both_variants(tmp_path):
    rng = np.random.default_rng(5)
    images = _images(rng)
    out = tmp_path / "img"
    with ImgDbWriter(str(out), variants=("msgpack", "compressed")) as w:
        for name, arrays in images.items():
            w.add(name, **arrays)
    assert json.loads((out / NBB_FILE).read_text()) == {"a.npz": 10, "b.npz": 10, "c.npz": 10}
    # The msgpack value decoded with msgpack-numpy itself, as the original reader did.
    env = lmdb.open(str(out / FEAT), readonly=True, lock=False)
    with env.begin() as txn:
        dump = msgpack.loads(txn.get(b"b.npz"), raw=False, object_hook=msgpack_numpy.decode)
        keys = json.loads(txn.get(b"__keys__"))
        raw_map = msgpack.loads(txn.get(b"a.npz"), raw=False)
    env.close()
    assert keys == ["a.npz", "b.npz", "c.npz"]
    assert list(dump) == ["norm_bb", "features", "conf", "soft_labels"]
    assert set(raw_map["features"]) == {b"nd", b"type", b"kind", b"shape", b"data"}
    assert raw_map["features"][b"type"] == "<f2"
    np.testing.assert_array_equal(dump["features"], images["b.npz"]["features"])
    for compressed in (False, True):
        db = ImgDb(str(out), compressed=compressed)
        np.testing.assert_array_equal(db.get("c.npz")["soft_labels"],
                                      images["c.npz"]["soft_labels"])
    assert leftovers(tmp_path) == []


def test_writer_clips_rows_and_is_atomic(tmp_path):
    rng = np.random.default_rng(6)
    conf = np.linspace(0.9, 0.3, 12)
    out = tmp_path / "img"
    with ImgDbWriter(str(out), max_bb=10, min_bb=2) as w:
        assert w.add("x.npz", **random_detections(rng, 12, conf)) == 10
        assert w.add("y.npz", **random_detections(rng, 4, [0.9, 0.5, 0.1, 0.1])) == 2
    db = ImgDb(str(out), max_bb=10, min_bb=2)
    assert db.get("x.npz")["features"].shape == (10, 2048)
    assert db.get("y.npz")["features"].shape == (2, 2048)
    with pytest.raises(RuntimeError, match="boom"), \
            ImgDbWriter(str(tmp_path / "bad"), variants=("compressed",)) as w:
        w.add("x.npz", **random_detections(rng, 3))
        raise RuntimeError("boom")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []
    arrays = random_detections(rng, 3)
    arrays["norm_bb"] = arrays["norm_bb"][:2]
    with pytest.raises(ValueError, match="inconsistent shapes"), \
            ImgDbWriter(str(tmp_path / "bad")) as w:
        w.add("x.npz", **arrays)
    assert leftovers(tmp_path) == []
    with ImgDbWriter(str(tmp_path / "fixed"), conf_th=-1, num_bb=3) as w:
        w.add("z.npz", **random_detections(rng, 5))
    assert ImgDb(str(tmp_path / "fixed"), conf_th=-1, num_bb=3).tensors("z.npz")[0].shape[0] == 3


def test_two_readers_of_one_directory(tmp_path):
    rng = np.random.default_rng(7)
    with ImgDbWriter(str(tmp_path / "img")) as w:
        w.add("x.npz", **random_detections(rng, 11))
    first, second = ImgDb(str(tmp_path / "img")), ImgDb(str(tmp_path / "img"))
    np.testing.assert_array_equal(first.get("x.npz")["features"], second.get("x.npz")["features"])
