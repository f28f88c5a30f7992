"""The `make demo` pipeline at tiny scale: every stage runs and clears its recall margin.

Chance levels are computed independently here (not taken from the demo's own summary), so a
regression in data, pre-training, fine-tuning, indexing, or re-ranking fails this test.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import demo

KS = (1, 5, 10)


def _chance(num_images: int, captions_per_image: int) -> dict[str, dict[str, float]]:
    # Brute force over positions: a random permutation puts one of the c right captions among
    # the first k of c*N with probability 1 - prod_{j<k} (cN - c - j) / (cN - j).
    n_cap = num_images * captions_per_image
    i2t = {}
    for k in KS:
        miss = 1.0
        for j in range(k):
            miss *= (n_cap - captions_per_image - j) / (n_cap - j)
        i2t[f"R@{k}"] = 100.0 * (1.0 - miss)
    return {"text_to_image": {f"R@{k}": 100.0 * k / num_images for k in KS}, "image_to_text": i2t}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("demo_tiny")
    summary = demo.main(["--preset", "tiny", "--run_dir", str(run_dir), "--no-examples"])
    return run_dir, summary


def test_summary_layout_and_chance(tiny_demo):
    run_dir, summary = tiny_demo
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    assert set(summary["rows"]) == {"zero_shot", "finetuned", "reranked", "hivlp", "hivlp_cascade", "vldeformer"}
    # Every stage's wall time is recorded, and the total is their sum.
    assert {"pretrain", "finetune", "train_reranker", "rerank", "finetune_hivlp", "vldeformer"} <= set(summary["stage_s"])
    assert summary["total_s"] == pytest.approx(sum(summary["stage_s"].values()))
    for row in summary["rows"].values():
        assert set(row) == {"text_to_image", "image_to_text", "rsum"}
        assert row["rsum"] == pytest.approx(
            sum(row[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in KS)
        )
    preset = demo.PRESETS["tiny"]
    chance = _chance(preset.num_test, 5)
    for direction in ("text_to_image", "image_to_text"):
        for k in KS:
            assert summary["chance"][direction][f"R@{k}"] == pytest.approx(chance[direction][f"R@{k}"])


def test_every_stage_clears_its_margin(tiny_demo):
    run_dir, summary = tiny_demo
    rows = summary["rows"]
    chance = _chance(demo.PRESETS["tiny"].num_test, 5)
    chance_rsum = sum(chance[d][f"R@{k}"] for d in chance for k in KS)
    # Pre-training alone (zero-shot) retrieves well above chance.
    assert rows["zero_shot"]["rsum"] > 3 * chance_rsum
    # Fine-tuning improves on it, with R@1 at least 10x chance in both directions.
    assert rows["finetuned"]["rsum"] > rows["zero_shot"]["rsum"]
    for direction in ("text_to_image", "image_to_text"):
        assert rows["finetuned"][direction]["R@1"] >= 10 * chance[direction]["R@1"]
    # The cross-encoder on its own (alpha 0) ranks the top-M far better than chance ...
    rerank = json.loads(next(run_dir.glob("reranked_alpha*/rerank.json")).read_text())
    alone = rerank["alpha_sweep"]["0.0"]
    for direction in ("text_to_image", "image_to_text"):
        assert alone[direction]["R@1"] >= 5 * chance[direction]["R@1"]
    # ... and the fused re-ranking, its weight chosen on val, does not lose to stage 1.
    assert rows["reranked"]["rsum"] >= rows["finetuned"]["rsum"] - 5.0
    # With M >= 10, recall of the stage-1 top-M lists equals recall over the whole split.
    assert rerank["top_m"] >= 10
    full = json.loads((run_dir / "eval_finetuned" / "recall.json").read_text())
    for direction in ("text_to_image", "image_to_text"):
        assert rerank["before"][direction] == pytest.approx(full[direction])


def test_cascade_keeps_flat_recall(tiny_demo):
    run_dir, summary = tiny_demo
    rows = summary["rows"]
    # The coarse-to-fine search over the hierarchy-trained prefixes finds what the flat search
    # of the full embedding finds: recall@10 within half a point, both directions.
    for direction in ("text_to_image", "image_to_text"):
        assert abs(rows["hivlp_cascade"][direction]["R@10"] - rows["hivlp"][direction]["R@10"]) <= 0.5
    recall = json.loads((run_dir / "eval_hivlp_cascade" / "recall.json").read_text())
    assert [stage["dim"] for stage in recall["cascade"]["stages"]] == [32, 64, 128]
    # The flat rows are the full-dimension recall of the same checkpoint.
    assert recall["rsum"] == pytest.approx(rows["hivlp"]["rsum"])


def test_vldeformer_row_learns(tiny_demo):
    _, summary = tiny_demo
    chance = _chance(demo.PRESETS["tiny"].num_test, 5)
    # The decomposed cross-encoder of the tiny run (300 steps) is weak; 200 contrastive steps
    # with bi-modal negatives still lift it well clear of chance (the full demo: 20x).
    for direction in ("text_to_image", "image_to_text"):
        assert summary["rows"]["vldeformer"][direction]["R@1"] >= 5 * chance[direction]["R@1"]


def test_plots_and_scenes_are_written(tiny_demo):
    run_dir, _ = tiny_demo
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert any(p.name == "recall_at_k.png" for p in plots)
    assert any(p.name.endswith("_training.png") for p in plots)
    assert all(p.stat().st_size > 1000 for p in plots)
    scenes = list((run_dir / "scenes").glob("*.png"))
    assert len(scenes) == demo.PRESETS["tiny"].num_test


def test_second_run_reuses_everything(tiny_demo, capsys):
    run_dir, summary = tiny_demo
    again = demo.main(["--preset", "tiny", "--run_dir", str(run_dir), "--no-examples"])
    assert again["rows"] == summary["rows"]
    out = capsys.readouterr().out
    assert "reusing" in out
    # A stage that runs prints "NAME ..."; a reused one "NAME: reusing PATH".
    assert not [line for line in out.splitlines() if line.startswith("[demo]") and line.endswith(" ...") and "synthetic" not in line]
