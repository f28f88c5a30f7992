"""Synthetic dataset: layout, determinism, reuse, and the structure the demo relies on."""
from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data.img_db import ImgDb
from data.synthetic import (
    OBJECTS,
    TINY,
    SyntheticConfig,
    generate,
    load_manifest,
    vg_class_id,
    vocabulary,
)
from data.txt_db import TxtDb
from scripts import make_synthetic


def test_layout_and_readers(synthetic_tiny):
    m = synthetic_tiny
    assert m["counts"]["test"] == {"images": TINY.num_test, "captions": 5 * TINY.num_test}
    idb = ImgDb(m["img_db"], **{k: v for k, v in m["img_db_args"].items()})
    seen = set()
    for split in ("train", "val", "test"):
        tdb = TxtDb(m["txt_db"][split])
        assert len(tdb.img_order) == m["counts"][split]["images"]
        assert len(tdb) == m["counts"][split]["captions"]
        assert all(len(tdb.img2txts[n]) == 5 for n in tdb.img_order)
        assert all(n in idb for n in tdb.img_order)
        assert not seen & set(tdb.img_order)  # splits do not share images
        seen |= set(tdb.img_order)
        assert tdb.meta["bert"] == m["tokenizer"]
    assert seen == set(idb.names)
    objects = json.loads(Path(m["objects"]).read_text())
    assert set(objects) == seen
    assert {"object", "colour", "size", "box"} <= set(objects[idb.names[0]][0])
    assert not os.path.exists(os.path.join(m["root"], "npz"))


def test_tokenizer_loads_offline_and_covers_the_grammar(synthetic_tiny):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(synthetic_tiny["tokenizer"], local_files_only=True)
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id] == [0, 100, 101, 102, 103]
    assert tok.convert_ids_to_tokens(1) == "[unused1]" and len(tok.get_vocab()) == len(vocabulary())
    tdb = TxtDb(synthetic_tiny["txt_db"]["train"])
    assert all(tok.unk_token_id not in tdb.input_ids(i) for i in tdb.ids)
    assert tok.unk_token_id not in tok("zebra", add_special_tokens=False)["input_ids"]


def test_features_and_labels_carry_the_object_structure(synthetic_tiny):
    m = synthetic_tiny
    idb = ImgDb(m["img_db"])
    objects = json.loads(Path(m["objects"]).read_text())
    feats, classes, clipped = [], [], 0
    for name in idb.names:
        arrays = idb.get(name)
        conf = arrays["conf"].ravel().astype(np.float32)
        assert np.all(np.diff(conf) <= 0) and idb.name2nbb[name] >= 10
        clipped += int(conf.min() < 0.2)  # min_bb keeps some sub-threshold rows
        soft = arrays["soft_labels"].astype(np.float32)
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=2e-2)
        # The most confident rows are the objects; their soft labels peak on their class.
        n = len(objects[name])
        wanted = {vg_class_id(OBJECTS.index(o["object"])) for o in objects[name]}
        assert set(soft[:n].argmax(1).tolist()) == wanted
        for row in range(n):
            feats.append(arrays["features"][row].astype(np.float32))
            classes.append(int(soft[row].argmax()))
    assert clipped > 0
    f = np.stack(feats)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    sim, same = f @ f.T, np.equal.outer(classes, classes)
    off_diag = ~np.eye(len(f), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.2
    # Families: images with the same objects but colours bound differently.
    keyed = defaultdict(set)
    for name, objs in objects.items():
        keyed[tuple(sorted(o["object"] for o in objs))].add(
            tuple(sorted((o["object"], o["colour"]) for o in objs)))
    assert any(len(v) > 1 for v in keyed.values())


def test_deterministic_reused_and_regenerated(tmp_path, capsys):
    cfg = SyntheticConfig(seed=7, num_train=6, num_val=2, num_test=3, keep_npz=True)
    a = generate(str(tmp_path / "a"), cfg, progress=False)
    b = generate(str(tmp_path / "b"), cfg, progress=False)
    assert Path(a["karpathy_json"]).read_text() == Path(b["karpathy_json"]).read_text()
    assert sorted(os.listdir(tmp_path / "a" / "npz")) == sorted(os.listdir(tmp_path / "b" / "npz"))
    fa, fb = ImgDb(a["img_db"]).get("synth_000004.npz"), ImgDb(b["img_db"]).get("synth_000004.npz")
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])
    # Every image has clutter rows that the nbb rule drops.
    for name, nbb in ImgDb(a["img_db"]).name2nbb.items():
        with np.load(tmp_path / "a" / "npz" / name) as raw:
            assert raw["features"].shape[0] > nbb >= 10
    capsys.readouterr()
    mtime = os.path.getmtime(tmp_path / "a" / "manifest.json")
    assert generate(str(tmp_path / "a"), cfg, progress=False)["counts"] == a["counts"]
    assert "reusing" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "a" / "manifest.json") == mtime
    other = dataclasses.replace(cfg, seed=8)
    c = generate(str(tmp_path / "a"), other, progress=False)
    assert "regenerating" in capsys.readouterr().out
    assert Path(c["karpathy_json"]).read_text() != Path(b["karpathy_json"]).read_text()
    assert load_manifest(str(tmp_path / "a"))["args"]["seed"] == 8
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_refuses_foreign_directory_and_cli(tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="manifest.json"):
        generate(str(tmp_path / "foreign"), TINY, progress=False)
    assert make_synthetic.main(["--out", str(tmp_path / "cli"), "--tiny", "--num-test", "4",
                                "--captions-per-image", "2", "--no-progress"]) == 0
    assert "test: 4 images / 8 captions" in capsys.readouterr().out
    m = load_manifest(str(tmp_path / "cli"))
    assert m["args"]["num_train"] == TINY.num_train and m["args"]["num_test"] == 4
