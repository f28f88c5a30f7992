"""Re-rankers are a registry: a registered scorer runs through `rerank.py` like the cross-encoder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import rerank
from utils.errors import ConfigError
from utils.pipeline.reranking import RERANKERS, Reranker, register_reranker


def test_a_registered_reranker_runs_through_the_cli(workspace, retrieval_dir, tmp_path):
    txt2img = json.loads((Path(workspace.data["txt_db"]["test"]) / "txt2img.json").read_text())
    seen = {}

    @register_reranker("ground-truth")
    def ground_truth(checkpoint, model_config, config, txt_db, img_db, device, precision):
        seen["checkpoint"] = checkpoint
        return Reranker(lambda pairs: np.array([float(txt2img[t] == i) for t, i in pairs]), {"kind": "oracle"})

    try:
        result = rerank.main(["--config", str(workspace.config), "--retrieval_dir", str(retrieval_dir),
                              "--reranker_checkpoint", "unused.pt", "--output_dir", str(tmp_path),
                              "rerank.reranker=ground-truth", "rerank.top_m=10"])
    finally:
        del RERANKERS["ground-truth"]
    assert seen["checkpoint"] == "unused.pt" and result["kind"] == "oracle"
    # An oracle puts the true image first whenever stage 1 found it in the top 10.
    after, before = result["after"]["text_to_image"], result["before"]["text_to_image"]
    assert after["R@1"] == after["R@10"] == pytest.approx(before["R@10"])


def test_unknown_reranker_is_named(workspace, retrieval_dir, tmp_path):
    with pytest.raises(ConfigError, match="rerank.reranker: 'nope' is not one of"):
        rerank.main(["--config", str(workspace.config), "--retrieval_dir", str(retrieval_dir),
                     "--reranker_checkpoint", "x.pt", "--output_dir", str(tmp_path), "rerank.reranker=nope"])
