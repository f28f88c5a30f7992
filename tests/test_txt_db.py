"""txt_db reader against hand-built databases, and the writer round trip (SPEC 1)."""
from __future__ import annotations

import json
import multiprocessing
import pickle

import lmdb
import lz4.frame
import msgpack
import pytest

from data.lmdb_io import CorruptRecordError
from data.txt_db import TxtDb, TxtDbWriter
from tests.helpers import BERT_META, leftovers, put_raw, write_raw_txt_db


def _rec(ids: list[int], img: str, **extra) -> dict:
    return {"input_ids": ids, "img_fname": img, **extra}


@pytest.fixture()
def raw_db(tmp_path):
    # JSON order '2', '10', '1' (neither string nor numeric order): it IS the dataset order.
    records = {"2": _rec([5, 6, 7], "b.npz", raw="two"),
               "10": _rec([5, 6, 7, 8, 9], "a.npz", raw="ten"),
               "1": _rec([5], "b.npz", raw="one"),
               "7": _rec([9] * 8, "c.npz", raw="seven")}
    return write_raw_txt_db(tmp_path / "db", records, img_order=["c.npz", "b.npz", "a.npz"])


def test_ids_follow_id2len_key_order(raw_db):
    db = TxtDb(str(raw_db))
    assert db.ids == ["2", "10", "1", "7"]
    assert db.lens == [3, 5, 1, 8]
    assert len(db) == 4
    assert db.img_order == ["c.npz", "b.npz", "a.npz"]
    assert db.img2txts == {"c.npz": ["7"], "b.npz": ["2", "1"], "a.npz": ["10"]}
    assert db.txt2img == {"2": "b.npz", "10": "a.npz", "1": "b.npz", "7": "c.npz"}


def test_max_txt_len_filter(raw_db):
    db = TxtDb(str(raw_db), max_txt_len=3)
    assert db.ids == ["2", "1"]
    assert db.lens == [3, 1]
    assert set(db.txt2img) == {"2", "1"}
    # The canonical image order is not filtered; filtered images keep an empty caption list.
    assert db.img_order == ["c.npz", "b.npz", "a.npz"]
    assert db.img2txts == {"c.npz": [], "b.npz": ["2", "1"], "a.npz": []}
    assert TxtDb(str(raw_db), max_txt_len=5).ids == ["2", "10", "1"]


def test_record_input_ids_and_meta(raw_db):
    db = TxtDb(str(raw_db))
    assert db.record("10") == {"input_ids": [5, 6, 7, 8, 9], "img_fname": "a.npz", "raw": "ten"}
    assert db.input_ids("2") == [5, 6, 7]
    assert (db.cls_id, db.sep_id, db.mask_id, db.unk_id) == (101, 102, 103, 100)
    assert db.v_range == (999, 28996)
    assert db.meta["bert"] == "bert-base-cased"
    with pytest.raises(KeyError, match="'99'"):
        db.record("99")


def test_missing_directory_and_files(tmp_path, raw_db):
    with pytest.raises(FileNotFoundError, match=r"nope.*data\.mdb"):
        TxtDb(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*data\.mdb"):
        TxtDb(str(tmp_path / "empty"))
    (raw_db / "img2txts.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"img2txts\.json"):
        TxtDb(str(raw_db))


def test_corrupt_value_names_the_key(raw_db):
    put_raw(raw_db, "10", b"not lz4 at all")
    put_raw(raw_db, "2", lz4.frame.compress(b"\xc1"))  # 0xc1 is never valid msgpack
    db = TxtDb(str(raw_db))
    with pytest.raises(CorruptRecordError, match=r"'10'"):
        db.record("10")
    with pytest.raises(CorruptRecordError, match=r"'2'"):
        db.input_ids("2")


def test_reader_pickles_and_reads_in_forked_child(raw_db):
    db = TxtDb(str(raw_db))
    assert db.input_ids("1") == [5]  # the parent opens the environment first
    clone = pickle.loads(pickle.dumps(db))
    assert clone.ids == db.ids
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(db.input_ids, ("10",)) == [5, 6, 7, 8, 9]
    # Two readers of one directory in one process share the environment.
    assert TxtDb(str(raw_db)).input_ids("7") == [9] * 8


def test_writer_round_trip(tmp_path):
    meta = {**BERT_META, "extra": "kept"}
    out = tmp_path / "out_db"
    with TxtDbWriter(str(out), meta) as w:
        for key, img in [("10", "x.npz"), ("2", "y.npz"), ("1", "x.npz"), ("33", "z.npz")]:
            w.add(key, _rec(list(range(int(key) % 7 + 1)), img, raw=f"caption {key}"))
    # Side files, read as plain JSON: numeric id order, first-appearance image order.
    assert list(json.loads((out / "id2len.json").read_text())) == ["1", "2", "10", "33"]
    assert list(json.loads((out / "img2txts.json").read_text()).items()) == [
        ("x.npz", ["1", "10"]), ("y.npz", ["2"]), ("z.npz", ["33"])]
    assert json.loads((out / "meta.json").read_text()) == meta
    # The value encoding, decoded by hand.
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        value = msgpack.loads(lz4.frame.decompress(txn.get(b"33")), raw=False)
    env.close()
    assert value == {"input_ids": [0, 1, 2, 3, 4, 5], "img_fname": "z.npz", "raw": "caption 33"}
    db = TxtDb(str(out))
    assert db.ids == ["1", "2", "10", "33"]
    assert db.lens == [2, 3, 4, 6]
    assert db.input_ids("10") == [0, 1, 2, 3]
    assert leftovers(tmp_path) == []


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "db"
    with pytest.raises(RuntimeError, match="boom"), TxtDbWriter(str(out), BERT_META) as w:
        w.add("1", _rec([1, 2], "a.npz"))
        raise RuntimeError("boom")
    assert not out.exists() and leftovers(tmp_path) == []
    with TxtDbWriter(str(out), BERT_META) as w:
        w.add("1", _rec([1, 2], "a.npz"))
        with pytest.raises(ValueError, match="duplicate caption id '1'"):
            w.add("1", _rec([3], "a.npz"))
    with pytest.raises(FileExistsError, match="overwrite"), TxtDbWriter(str(out), BERT_META):
        pass
    with TxtDbWriter(str(out), BERT_META, overwrite=True) as w:
        w.add("5", _rec([7], "b.npz"))
    assert TxtDb(str(out)).ids == ["5"]
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="MASK"):
        TxtDbWriter(str(tmp_path / "x"), {"UNK": 1, "CLS": 2, "SEP": 3, "v_range": [4, 5]})
