"""scripts/plots.py: training curves and recall@K curves, written as non-empty PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import plots
from utils.engine.metrics_log import MetricsLogger
from utils.errors import MissingPathError


def _tiny_run(run_dir: Path) -> list[dict]:
    """A few records through the trainers' own logger (train loss per task, lr, validation recall)."""
    logger = MetricsLogger(run_dir, enabled=True)
    logged = []
    for step in (10, 20, 30, 40):
        train = {"itm": {"loss": 2.0 / step, "acc_t2i": 0.5}, "mlm": {"loss": 3.0 / step}, "loss": 5.0 / step,
                 "lr": 1e-4 * step / 40, "grad_norm": 1.0}
        logger.log(step, train)
        logged.append(("train", step, train))
        if step % 20 == 0:
            val = {"text_to_image": {"R@1": step / 2, "R@5": step}, "image_to_text": {"R@1": step / 4, "R@5": step},
                   "rsum": 3.0 * step}
            logger.log(step, val, split="val")
            logged.append(("val", step, val))
    logger.close()
    return logged


def _assert_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side
        extrema = img.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # something is drawn


def test_training_series_and_plot(tmp_path):
    run = tmp_path / "run"
    _tiny_run(run)
    panels = plots.training_series(plots.read_metrics(run / "metrics.jsonl"))
    assert set(panels["loss"]) == {"loss", "itm/loss", "mlm/loss"}
    assert panels["loss"]["itm/loss"] == ([10, 20, 30, 40], [0.2, 0.1, 2.0 / 30, 0.05])
    assert panels["lr"]["lr"][1] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4])
    assert panels["val R@1"] == {"text_to_image/R@1": ([20, 40], [10.0, 20.0]),
                                 "image_to_text/R@1": ([20, 40], [5.0, 10.0])}
    assert panels["val RSUM"] == {"rsum": ([20, 40], [60.0, 120.0])}
    out = plots.plot_training(run, tmp_path / "out" / "train.png")
    _assert_png(out)


def test_recall_curve_by_hand():
    gold = {"c1": "A", "c2": "A", "c3": "B"}
    t2i = {"c1": [["B", 0.9], ["A", 0.8]], "c2": [["A", 0.7]], "c3": [["A", 0.5], ["C", 0.4]]}
    # c1 found at 2, c2 at 1, c3 never: R@1 = 1/3, R@2 = 2/3, R@3 = 2/3.
    np.testing.assert_allclose(plots.recall_curve(t2i, gold, True, ["c1", "c2", "c3"], 3),
                               [100 / 3, 200 / 3, 200 / 3])
    i2t = {"A": [["c3", 1.0], ["c2", 0.9]], "B": [["c3", 0.3]]}
    # A: first of its captions at rank 2; B at rank 1.
    np.testing.assert_allclose(plots.recall_curve(i2t, gold, False, ["A", "B"], 2), [50.0, 100.0])


def test_recall_curves_agree_with_recall_json(retrieval_dir, tmp_path):
    """R@1/5/10 read off the curves equal the evaluation's recall.json (SPEC 7 over the full ranking)."""
    curves = plots.curves_of(retrieval_dir)
    recall = json.loads((retrieval_dir / "recall.json").read_text())
    info = json.loads((retrieval_dir / "info.json").read_text())
    for direction in ("text_to_image", "image_to_text"):
        assert len(curves[direction]) == info["top_k"]
        assert np.all(np.diff(curves[direction]) >= 0)
        for k in (1, 5, 10):
            assert curves[direction][k - 1] == pytest.approx(recall[direction][f"R@{k}"], abs=1e-6)


def test_write_plots_for_a_tree(retrieval_dir, tmp_path):
    tree = tmp_path / "demo"
    _tiny_run(tree / "finetune")
    _tiny_run(tree / "pretrain")
    paths = plots.main([str(tree), f"eval={retrieval_dir}", "--out_dir", str(tmp_path / "plots")])
    names = sorted(p.name for p in paths)
    assert names == ["finetune_training.png", "pretrain_training.png", "recall_at_k.png"]
    for path in paths:
        _assert_png(path)
    # Default output: FIRST_DIR/plots.
    assert plots.write_plots([tree])[0].parent == tree / "plots"
    with pytest.raises(MissingPathError, match="nothing to plot"):
        plots.write_plots([tmp_path / "plots"])
    with pytest.raises(MissingPathError, match="does not exist"):
        plots.write_plots([tmp_path / "missing"])
