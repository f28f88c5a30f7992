"""inference.py end to end on the tiny synthetic split, with our and the original checkpoints."""
from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

import inference
from model.state_dicts import CheckpointError
from tests.helpers import ORIGINAL_CONFIGS_DIR, Workspace, brute_force_recall
from tests.helpers import assert_same as assert_same_recall
from utils.errors import ConfigError
from utils.search.indexes import FlatIndex, HNSWIndex, IVFPQIndex, load_index
from utils.search.metrics import fold_recall_from_scores

EXPECTED_FILES = {
    "img_emb.npy", "txt_emb.npy", "ids.json", "img.index", "txt.index", "topk.json", "recall.json", "info.json",
}

def run(ws: Workspace, out: Path, *extra: str, checkpoint: Path | None = None, config: Path | None = None) -> dict:
    return inference.main([
        "--config", str(config or ws.config), "--checkpoint", str(checkpoint or ws.our_ckpt),
        "--output_dir", str(out), *extra,
    ])


def load_outputs(out: Path) -> dict:
    return {
        "img": np.load(out / "img_emb.npy"),
        "txt": np.load(out / "txt_emb.npy"),
        "ids": json.loads((out / "ids.json").read_text()),
        "topk": json.loads((out / "topk.json").read_text()),
        "recall": json.loads((out / "recall.json").read_text()),
        "info": json.loads((out / "info.json").read_text()),
    }


def split_files(ws: Workspace, split: str = "test") -> tuple[list[str], dict, dict]:
    db = Path(ws.data["txt_db"][split])
    img2txts = json.loads((db / "img2txts.json").read_text())
    id2len = json.loads((db / "id2len.json").read_text())
    txt2img = json.loads((db / "txt2img.json").read_text())
    return list(img2txts), id2len, txt2img


def test_outputs_orders_and_recall(workspace, retrieval_dir):
    ws = workspace
    assert {p.name for p in retrieval_dir.iterdir()} == EXPECTED_FILES  # no shards, no temporaries
    o = load_outputs(retrieval_dir)
    img_order, id2len, txt2img = split_files(ws)
    # Canonical orders: img2txts.json keys, id2len.json keys (all within max_txt_len 60).
    assert o["ids"]["img_ids"] == img_order
    assert o["ids"]["txt_ids"] == list(id2len)
    assert o["img"].dtype == np.float32 and o["img"].shape == (12, 16)
    assert o["txt"].dtype == np.float32 and o["txt"].shape == (60, 16)

    scores = o["txt"].astype(np.float64) @ o["img"].T.astype(np.float64)
    gt = [img_order.index(txt2img[t]) for t in o["ids"]["txt_ids"]]
    ref = brute_force_recall(scores.tolist(), gt, len(img_order))
    for d in ("text_to_image", "image_to_text"):
        for k in ("R@1", "R@5", "R@10"):
            assert o["recall"][d][k] == pytest.approx(ref[d][k])
    assert o["recall"]["rsum"] == pytest.approx(ref["rsum"])

    # topk.json: keyed by the query, best first, top_k (10) or fewer, never padded.
    t2i, i2t = o["topk"]["text_to_image"], o["topk"]["image_to_text"]
    assert list(t2i) == o["ids"]["txt_ids"] and list(i2t) == o["ids"]["img_ids"]
    for q, row in t2i.items():
        names = [c for c, _ in row]
        assert len(row) == 10 and len(set(names)) == 10 and set(names) <= set(img_order)
        t = o["ids"]["txt_ids"].index(q)
        expected = np.sort(scores[t])[::-1][:10]
        np.testing.assert_allclose([s for _, s in row], expected, rtol=1e-4, atol=1e-6)
    for q, row in i2t.items():
        assert len(row) == 10 and all(a[1] >= b[1] for a, b in pairwise(row))

    info = o["info"]
    assert info["split"]["txt_db"] == str(Path(ws.data["txt_db"]["test"]).resolve())
    assert info["split"]["img_db"] == str(Path(ws.data["img_db"]).resolve())
    assert (info["num_images"], info["num_captions"]) == (12, 60)
    assert info["checkpoint_format"] == "ours" and info["index_type"] == "flat" and info["protocol"] == "full"
    for key in ("encode_s", "encode_images_s", "encode_texts_s", "search_s", "index_s", "total_s"):
        assert info["timing"][key] >= 0
    assert isinstance(load_index(retrieval_dir / "img.index"), FlatIndex)


def test_order_does_not_depend_on_batching_or_shards(workspace, retrieval_dir, tmp_path):
    run(workspace, tmp_path / "b3", "--batch_size", "3", "--shard_size", "7")
    a, b = load_outputs(retrieval_dir), load_outputs(tmp_path / "b3")
    np.testing.assert_allclose(a["img"], b["img"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["txt"], b["txt"], rtol=1e-5, atol=1e-6)
    assert a["ids"] == b["ids"]


def test_top_k_above_corpus_size_is_not_padded_and_filter_applies(workspace, tmp_path):
    out = tmp_path / "k100"
    run(workspace, out, "retrieval.top_k=100", "max_txt_len=9")
    o = load_outputs(out)
    img_order, id2len, _ = split_files(workspace)
    kept = [t for t, n in id2len.items() if n <= 9]
    assert o["ids"]["txt_ids"] == kept and 0 < len(kept) < 60
    assert o["ids"]["img_ids"] == img_order  # every image stays a candidate
    for row in o["topk"]["text_to_image"].values():
        assert sorted(c for c, _ in row) == sorted(img_order)
    for row in o["topk"]["image_to_text"].values():
        assert sorted(c for c, _ in row) == sorted(kept)
    assert o["info"]["split"]["max_txt_len"] == 9


def test_original_config_and_original_checkpoints(workspace, tmp_path):
    ws = workspace
    a = run(ws, tmp_path / "orig", checkpoint=ws.original_ckpt, config=ws.original_config)
    b = run(ws, tmp_path / "pre", checkpoint=ws.pretrain_ckpt, config=ws.original_config)
    assert a["checkpoint_format"] == "original-biencoder" and b["checkpoint_format"] == "original-pretrain"
    oa, ob = load_outputs(tmp_path / "orig"), load_outputs(tmp_path / "pre")
    np.testing.assert_array_equal(oa["txt"], ob["txt"])
    np.testing.assert_array_equal(oa["img"], ob["img"])
    assert a["precision"] == "fp32"  # fp16: true of the original config means autocast on GPU only


def test_val_split_and_coco_1k(workspace, tmp_path):
    out = tmp_path / "val"
    result = run(workspace, out, "retrieval.eval_split=val", "retrieval.coco_1k=true")
    o = load_outputs(out)
    img_order, _, txt2img = split_files(workspace, "val")
    assert o["ids"]["img_ids"] == img_order and result["split"]["name"] == "val"
    assert result["protocol"] == "coco_1k" and "recall_full_split" in o["info"]
    scores = o["txt"] @ o["img"].T
    gt = [img_order.index(txt2img[t]) for t in o["ids"]["txt_ids"]]
    assert_same_recall(o["recall"], fold_recall_from_scores(scores, gt, n_folds=5))


def test_recall_of_the_search_lists_only(workspace, tmp_path):
    # A flat index returns the exact top-k: the recall of its lists equals the exact recall of
    # the whole split (brute force over the stored embeddings), without scoring every pair.
    out = tmp_path / "lists"
    result = run(workspace, out, "retrieval.exact_recall=false", "retrieval.top_k=10")
    o = load_outputs(out)
    img_order, _, txt2img = split_files(workspace)
    scores = o["txt"].astype(np.float64) @ o["img"].T.astype(np.float64)
    gt = [img_order.index(txt2img[t]) for t in o["ids"]["txt_ids"]]
    ref = brute_force_recall(scores.tolist(), gt, len(img_order))
    for d in ("text_to_image", "image_to_text"):
        for k in ("R@1", "R@5", "R@10"):
            assert o["recall"][d][k] == pytest.approx(ref[d][k])
    assert result["protocol"] == "search_lists"
    with pytest.raises(ConfigError, match="top_k"):
        run(workspace, tmp_path / "k5", "retrieval.exact_recall=false", "retrieval.top_k=5")
    with pytest.raises(ConfigError, match="coco_1k"):
        run(workspace, tmp_path / "folds", "retrieval.exact_recall=false", "retrieval.coco_1k=true")


@pytest.mark.parametrize("kind, cls", [("hnsw", HNSWIndex), ("ivfpq", IVFPQIndex)])
def test_approximate_indexes(workspace, tmp_path, kind, cls):
    out = tmp_path / kind
    result = run(workspace, out, f"retrieval.index_type={kind}")
    o = load_outputs(out)
    assert isinstance(load_index(out / "img.index"), cls)
    assert "recall_index" in o["info"] and result["index_type"] == kind
    img_ids = set(o["ids"]["img_ids"])
    for row in o["topk"]["text_to_image"].values():
        names = [c for c, _ in row]
        assert 0 < len(row) <= 10 and len(set(names)) == len(names) and set(names) <= img_ids


def test_query_modes(workspace, retrieval_dir, capsys):
    ws = workspace
    o = load_outputs(retrieval_dir)
    from data.txt_db import TxtDb

    db = TxtDb(ws.data["txt_db"]["test"])
    txt_id = o["ids"]["txt_ids"][3]
    caption = db.record(txt_id)["raw"]
    # A caption typed by a person encodes like the same caption read from the txt_db.
    got = inference.main(["query", "--index_dir", str(retrieval_dir), "--checkpoint", str(ws.our_ckpt),
                          "--top_k", "4", caption])
    expected = o["topk"]["text_to_image"][txt_id][:4]
    assert [n for n, _ in got["results"]] == [n for n, _ in expected]
    np.testing.assert_allclose([s for _, s in got["results"]], [s for _, s in expected], rtol=1e-4, atol=1e-6)
    printed = capsys.readouterr().out
    assert expected[0][0] in printed

    name = o["ids"]["img_ids"][2]
    got = inference.main(["query", "--index_dir", str(retrieval_dir), "--image", name, "--top_k", "3"])
    assert [n for n, _ in got["results"]] == [n for n, _ in o["topk"]["image_to_text"][name][:3]]
    printed = capsys.readouterr().out
    assert db.record(got["results"][0][0])["raw"] in printed

    with pytest.raises(KeyError, match="not_an_image"):
        inference.main(["query", "--index_dir", str(retrieval_dir), "--image", "not_an_image"])
    with pytest.raises(ConfigError, match="--checkpoint"):
        inference.main(["query", "--index_dir", str(retrieval_dir), "a dog"])


def test_clear_errors(workspace, tmp_path):
    ws = workspace
    with pytest.raises(CheckpointError, match=r"biencoder\.best\.pt.*shape mismatch"):
        run(ws, tmp_path / "bad", "project_dim=8", checkpoint=ws.original_ckpt)
    with pytest.raises(FileNotFoundError, match="data.test_txt_db"):
        run(ws, tmp_path / "missing", "test_txt_db=/nonexistent/txt_db")
    with pytest.raises(ConfigError, match="data.val_txt_db"):
        run(ws, tmp_path / "noval", "retrieval.eval_split=val", "val_txt_db=null")
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        run(ws, tmp_path / "nockpt", checkpoint=tmp_path / "none.pt")
    assert not (tmp_path / "bad").exists()  # inputs are checked before anything is written


@pytest.mark.parametrize("name", ["flickr30k_eval_config.json", "coco_eval_config.json"])
def test_original_eval_configs_load_unchanged_and_name_the_missing_path(name, tmp_path):
    config = ORIGINAL_CONFIGS_DIR / "lightningdot" / name
    with pytest.raises(FileNotFoundError, match="data.test_txt_db"):
        inference.main(["--config", str(config), "--checkpoint", str(tmp_path / "x.pt"),
                        "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(workspace, retrieval_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(repo / "inference.py"),
           "--config", str(workspace.config), "--checkpoint", str(workspace.our_ckpt), "--output_dir", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, timeout=300, capture_output=True)
    a, b = load_outputs(retrieval_dir), load_outputs(out)
    np.testing.assert_allclose(a["txt"], b["txt"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["img"], b["img"], rtol=1e-5, atol=1e-6)
    assert a["ids"] == b["ids"] and b["info"]["world_size"] == 2
    assert set(b["recall"]) == {"text_to_image", "image_to_text", "rsum", "ar"}
