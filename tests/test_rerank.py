"""rerank.py: fusion rules, a stub cross-encoder, the CLI with original / our checkpoints,
clear errors, and ITM training of the re-ranker."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rerank
from model.state_dicts import CheckpointError
from tests.helpers import ORIGINAL_CONFIGS_DIR, Workspace
from utils.config import load_config
from utils.engine.run_dir import OutputDirError
from utils.errors import ConfigError
from utils.pipeline import cross_encoder_training, reranking
from utils.pipeline.retrieval_dir import (
    RetrievalDirError,
    load_biencoder,
    resolve_split,
)


class GroundTruthScorer:
    """Stub cross-encoder: 1 for a caption with its own image, 0 otherwise."""

    def __init__(self, txt2img: dict[str, str]) -> None:
        self.txt2img = txt2img
        self.calls = 0

    def __call__(self, pairs):
        self.calls += 1
        return np.array([1.0 if self.txt2img[t] == i else 0.0 for t, i in pairs])


class RandomScorer:
    def __call__(self, pairs):
        return np.random.default_rng(0).standard_normal(len(pairs))


def txt2img_of(ws: Workspace) -> dict[str, str]:
    return json.loads((Path(ws.data["txt_db"]["test"]) / "txt2img.json").read_text())


def cli(ws: Workspace, retrieval: Path, out: Path, *extra: str, checkpoint: Path | None = None,
        reranker_config: Path | None = None, config: Path | None = None) -> dict:
    args = ["--config", str(config or ws.config), "--retrieval_dir", str(retrieval),
            "--reranker_checkpoint", str(checkpoint or ws.uniter_ckpt), "--output_dir", str(out)]
    if reranker_config is not None:
        args += ["--reranker_config", str(reranker_config)]
    return rerank.main(args + list(extra))


def test_fuse_keeps_stage1_order_on_ties_and_mixes_scores():
    cands = {"q": [("a", 3.0), ("b", 2.0), ("c", 1.0)]}
    cross = {("q", "a"): 0.0, ("q", "b"): 5.0, ("q", "c"): 0.0}
    assert [r[0] for r in reranking.fuse(cands, cross, 0.0, True)["q"]] == ["b", "a", "c"]
    assert [r[0] for r in reranking.fuse(cands, cross, 1.0, True)["q"]] == ["a", "b", "c"]
    mixed = reranking.fuse(cands, cross, 0.5, True)["q"]
    assert mixed[0] == ("b", 2.0, 5.0, 3.5)
    # Image queries look the pair up as (caption, image).
    assert reranking.fuse({"img": [("t", 1.0)]}, {("t", "img"): 7.0}, 0.0, False)["img"][0][2] == 7.0


@pytest.mark.parametrize("top_m", [3, 5])
def test_ground_truth_scorer_gives_perfect_r1_whenever_found(workspace, retrieval_dir, tmp_path, top_m):
    config = load_config(workspace.config)
    scorer = GroundTruthScorer(txt2img_of(workspace))
    result = reranking.rerank_retrieval_dir(retrieval_dir, resolve_split(config), scorer, top_m, 0.0, tmp_path)
    before, after = result["before"], result["after"]
    # Before: the ground truth is among the candidates for R@top_m of the queries.
    topk = json.loads((retrieval_dir / "topk.json").read_text())
    txt2img = txt2img_of(workspace)
    found = np.mean([txt2img[q] in [c for c, _ in row[:top_m]] for q, row in topk["text_to_image"].items()])
    assert after["text_to_image"]["R@1"] == pytest.approx(100.0 * found)
    for d in ("text_to_image", "image_to_text"):
        assert after[d]["R@1"] == after[d]["R@5"] == after[d]["R@10"]
        assert after[d]["R@1"] >= before[d]["R@1"]
    assert scorer.calls == 1 and result["num_pairs"] <= (60 + 12) * top_m
    assert result["alpha_sweep"]["0.0"] == after and result["alpha_sweep"]["1.0"] == before
    assert {p.name for p in tmp_path.iterdir()} == {"rerank.json", "rerank_scores.json"}


def test_alpha_one_reproduces_stage_one(workspace, retrieval_dir, tmp_path):
    config = load_config(workspace.config)
    result = reranking.rerank_retrieval_dir(retrieval_dir, resolve_split(config), RandomScorer(), 4, 1.0, tmp_path)
    assert result["after"] == result["before"]
    # The sweep re-sorts the same scored lists: its alpha 1 is stage 1 again.
    assert result["alpha_sweep"]["1.0"] == result["before"]
    topk = json.loads((retrieval_dir / "topk.json").read_text())
    scores = json.loads((tmp_path / "rerank_scores.json").read_text())
    for direction in ("text_to_image", "image_to_text"):
        for q, rows in scores[direction].items():
            assert [r[0] for r in rows] == [c for c, _ in topk[direction][q][:4]]
            assert [r[1] for r in rows] == [s for _, s in topk[direction][q][:4]]


def test_cli_original_and_our_cross_encoder(workspace, retrieval_dir, tmp_path):
    ws = workspace
    a = cli(ws, retrieval_dir, tmp_path / "orig", "--top_m", "3", reranker_config=ws.uniter_config)
    b = cli(ws, retrieval_dir, tmp_path / "ours", "--top_m", "3", checkpoint=ws.our_cross_ckpt)
    assert a["reranker_format"] == "original" and b["reranker_format"] == "ours"
    sa = json.loads((tmp_path / "orig" / "rerank_scores.json").read_text())
    sb = json.loads((tmp_path / "ours" / "rerank_scores.json").read_text())
    assert set(sa) == {"text_to_image", "image_to_text"}
    for direction in sa:
        for q in sa[direction]:
            assert len(sa[direction][q]) == 3
            np.testing.assert_allclose([r[2] for r in sa[direction][q]], [r[2] for r in sb[direction][q]], rtol=1e-5)
    saved = json.loads((tmp_path / "orig" / "rerank.json").read_text())
    assert set(saved) >= {"before", "after", "top_m", "alpha", "timing", "split", "num_pairs"}
    assert set(saved["after"]) == {"text_to_image", "image_to_text", "rsum", "ar"}
    assert saved["top_m"] == 3 and saved["alpha"] == 0.0 and saved["timing"]["rerank_s"] >= 0
    # model.model_config of the config stands in for --reranker_config; rerank.top_m for --top_m.
    c = cli(ws, retrieval_dir, tmp_path / "cfg")
    assert c["top_m"] == 5


def test_clear_errors(workspace, retrieval_dir, tmp_path):
    ws = workspace
    with pytest.raises(CheckpointError, match=r"uniter_itm\.pt.*wide_uniter\.json.*shape mismatch"):
        cli(ws, retrieval_dir, tmp_path / "x", reranker_config=ws.wide_uniter_config)
    with pytest.raises(RetrievalDirError, match=r"different split(.|\n)*name: retrieval_dir has 'test'"):
        cli(ws, retrieval_dir, tmp_path / "x", "retrieval.eval_split=val")
    with pytest.raises(RetrievalDirError, match="max_txt_len"):
        cli(ws, retrieval_dir, tmp_path / "x", "max_txt_len=20")
    with pytest.raises(CheckpointError, match="not a cross-encoder"):
        cli(ws, retrieval_dir, tmp_path / "x", checkpoint=ws.our_ckpt)
    with pytest.raises(ConfigError, match="--reranker_config"):
        cli(ws, retrieval_dir, tmp_path / "x", "model_config=null")
    with pytest.raises(RetrievalDirError, match="info.json"):
        cli(ws, tmp_path, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _pretrained_uniter(ws: Workspace, path: Path) -> Path:
    """A UNITER pre-training checkpoint: body + ITM head + pre-training heads, no rank_output."""
    state = torch.load(ws.uniter_ckpt, weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("rank_output.")}
    state["cls.predictions.bias"] = torch.zeros(8)
    state["feat_regress.weight"] = torch.zeros(2048, 32)
    state["region_classifier.net.0.weight"] = torch.zeros(32, 32)
    torch.save(state, path)
    return path


def test_train_from_pretrained_uniter_with_hard_negatives_then_rerank(workspace, retrieval_dir, tmp_path):
    ws = workspace
    ckpt = _pretrained_uniter(ws, tmp_path / "uniter-base.pt")
    out = tmp_path / "itm"
    common = ["--config", str(ws.config), "--output_dir", str(out), f"model.checkpoint={ckpt}",
              "train.valid_steps=2", "train.log_steps=1", "retrieval.negative_size=2",
              "retrieval.num_hard_negatives=1", "retrieval.hard_negatives_sampling=top",
              f"model.biencoder_checkpoint={ws.our_ckpt}", "rerank.rank_loss=hinge"]
    result = rerank.main(["train", *common, "train.num_train_steps=2"])
    assert result["step"] == 2 and 0.0 <= result["val"]["accuracy"] <= 100.0
    assert {p.name for p in (out / "ckpt").iterdir()} == {"cross_encoder.best.pt", "cross_encoder.last.pt"}
    # Resume to a longer run; a second plain start refuses to overwrite.
    result = rerank.main(["train", *common, "train.num_train_steps=4", "--resume"])
    assert result["step"] == 4
    with pytest.raises(OutputDirError, match="--resume"):
        rerank.main(["train", *common, "train.num_train_steps=4"])
    # The trained checkpoint is our format: it re-ranks without a config.
    r = cli(ws, retrieval_dir, tmp_path / "rr", checkpoint=out / "ckpt" / "cross_encoder.best.pt")
    assert r["reranker_format"] == "ours"


def test_original_uniter_itm_config_loads_and_names_the_missing_path(tmp_path):
    config = ORIGINAL_CONFIGS_DIR / "uniter" / "train-itm-flickr-base-8gpu.json"
    with pytest.raises(FileNotFoundError, match="data.test_txt_db"):
        rerank.main(["--config", str(config), "--retrieval_dir", str(tmp_path), "--reranker_checkpoint", "x.pt"])
    with pytest.raises(FileNotFoundError, match="cross_encoder.checkpoint.*/pretrain/uniter-base.pt"):
        rerank.main(["train", "--config", str(config), "--output_dir", str(tmp_path / "run"),
                     "model_config=" + str(config)])
    assert not (tmp_path / "run").exists()


def test_hard_negatives_reach_the_itm_dataset(workspace):
    from data.datasets import ItmRankDataset
    from data.img_db import ImgDb
    from data.txt_db import TxtDb
    from utils.distributed import init_distributed
    from utils.precision import resolve_precision

    ws = workspace
    config = load_config(ws.config, ["retrieval.negative_size=2", "retrieval.num_hard_negatives=1",
                                      "retrieval.hard_negatives_sampling=top",
                                      f"model.biencoder_checkpoint={ws.our_ckpt}"])
    dataset = ItmRankDataset([TxtDb(ws.data["txt_db"]["train"])], [ImgDb(ws.data["img_db"])], 2, seed=0)
    miner = cross_encoder_training.hard_negative_miner(config, dataset)
    env = init_distributed("none", "cpu")
    model, _ = load_biencoder(ws.our_ckpt, config)
    miner.mine(model, 0, 0, env, resolve_precision("fp32", env.device), config.train, config.data)
    txt_id = dataset.txt_ids[0]
    mined = dataset.hard_negatives.txt2neg_imgs[txt_id]
    assert len(mined) == 1 and mined[0] != dataset.img_names[0]
    item = dataset[0]
    assert item["img_names"][1] == mined[0]  # the mined negative comes first, then samples
    assert len(item["img_names"]) == dataset.group_size == 5
    with pytest.raises(ConfigError, match="biencoder_checkpoint"):
        cross_encoder_training.hard_negative_miner(load_config(ws.config, ["retrieval.num_hard_negatives=1",
                                                           "retrieval.hard_negatives_sampling=top"]), dataset)
    with pytest.raises(ConfigError, match="negative_size"):
        cross_encoder_training.hard_negative_miner(load_config(ws.config, ["retrieval.num_hard_negatives=3",
                                                           "retrieval.hard_negatives_sampling=top"]), dataset)


def test_short_candidate_lists_warn_unless_they_hold_the_whole_corpus(tmp_path, caplog):
    """2 captions x 3 images: a caption's list of all 3 images is complete at top_m 5; an
    image's list of 1 caption (of 2) is short."""
    import logging

    from utils.run_files import IDS_FILE, TOPK_FILE

    ids = {"txt_ids": ["t0", "t1"], "img_ids": ["a", "b", "c"]}
    t2i = {t: [["a", 1.0], ["b", 0.5], ["c", 0.1]] for t in ids["txt_ids"]}
    complete = {i: [["t0", 1.0], ["t1", 0.5]] for i in ids["img_ids"]}
    (tmp_path / IDS_FILE).write_text(json.dumps(ids))
    (tmp_path / TOPK_FILE).write_text(json.dumps({"text_to_image": t2i, "image_to_text": complete}))
    with caplog.at_level(logging.WARNING):
        got_t2i, got_i2t, _ = reranking.load_candidates(tmp_path, 5)
    assert not caplog.records
    assert got_t2i["t0"] == [("a", 1.0), ("b", 0.5), ("c", 0.1)] and len(got_i2t["c"]) == 2
    short = {**complete, "b": [["t1", 0.5]]}
    (tmp_path / TOPK_FILE).write_text(json.dumps({"text_to_image": t2i, "image_to_text": short}))
    with caplog.at_level(logging.WARNING):
        reranking.load_candidates(tmp_path, 5)
    assert "some queries have only 1 candidates" in caplog.text
