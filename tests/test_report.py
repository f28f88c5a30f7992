"""scripts/report.py: results JSON files -> the paper-style markdown table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import report


def recall(tr1: float, ir1: float) -> dict:
    tr = {"R@1": tr1, "R@5": 90.0, "R@10": 95.0}
    ir = {"R@1": ir1, "R@5": 80.0, "R@10": 85.0}
    rsum = sum(tr.values()) + sum(ir.values())
    return {"text_to_image": ir, "image_to_text": tr, "rsum": rsum, "ar": rsum / 6}


def write(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_table_from_inference_and_rerank_outputs(tmp_path, capsys):
    run = tmp_path / "flickr"
    write(run / "recall.json", recall(70.0, 55.0))
    write(run / "info.json", {"timing": {"encode_s": 12.5, "search_s": 0.25}})
    write(
        run / "rerank.json",
        {"before": recall(70.0, 55.0), "after": recall(80.0, 60.0), "top_m": 20, "alpha": 0.0,
         "timing": {"rerank_s": 30.0}},
    )
    table = report.main([str(run), "--paper"])
    assert table == capsys.readouterr().out
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model / setting | TR R@1 | TR R@5 | TR R@10 | IR R@1 | IR R@5 | IR R@10 | RSUM | AR |")
    assert lines[0].endswith("encode (s) | search (s) | rerank (s) |")
    body = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(body) == {
        "flickr",
        "flickr / stage 1 (top-20)",
        "flickr / re-ranked (top-20, alpha 0.0)",
        *report.PAPER_ROWS,
    }
    cells = [c.strip() for c in body["flickr"].strip("|").split("|")]
    # TR first (image -> text), then IR, RSUM, AR, timings.
    assert cells[1:] == ["70.0", "90.0", "95.0", "55.0", "80.0", "85.0", "475.0", "79.2", "12.50", "0.25", "-"]
    assert body["flickr / re-ranked (top-20, alpha 0.0)"].rstrip(" |").endswith("30.00")
    assert body["flickr / stage 1 (top-20)"].rstrip(" |").endswith("- | - | -")
    assert body["paper: Flickr30k fine-tuned"].split(" | ")[1] == "83.9"


def test_nested_summary_labels_and_output_file(tmp_path):
    summary = write(
        tmp_path / "demo" / "summary.json",
        {"zero_shot": {"recall": recall(10.0, 5.0)}, "finetuned": {"recall": recall(50.0, 40.0),
         "timing": {"encode_s": 1.0}}, "steps": 3},
    )
    out = tmp_path / "table.md"
    table = report.main([f"demo run={summary}", "--output", str(out), "--timing", "all"])
    assert out.read_text() == table
    assert "| demo run / zero_shot / recall | 10.0 |" in table
    assert "| demo run / finetuned / recall | 50.0 |" in table
    assert "encode (s)" in table


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        report.main([str(tmp_path / "missing.json")])
    bad = write(tmp_path / "test_results.json", {"loss": 1.0})
    with pytest.raises(ValueError, match="test_results.json"):
        report.main([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        report.main([str(tmp_path / "empty")])


def test_demo_summary_timing_columns(tmp_path):
    """The demo's summary keeps timings apart (`timing_s` by row): they fill the timing columns."""
    summary = write(tmp_path / "demo" / "summary.json", {
        "rows": {"finetuned": recall(50.0, 40.0), "reranked": recall(60.0, 45.0)},
        "chance": recall(0.2, 0.2),
        "timing_s": {"finetuned": {"encode": 0.5, "search": 0.125},
                     "reranked": {"encode": 0.5, "search": 0.125, "rerank": 12.25}},
    })
    lines = report.main([f"demo={summary}"]).strip().splitlines()[2:]
    body = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")] for line in lines}
    assert body["demo / rows / finetuned"][-3:] == ["0.50", "0.12", "-"]
    assert body["demo / rows / reranked"][-3:] == ["0.50", "0.12", "12.25"]
    assert body["demo / chance"][-3:] == ["-", "-", "-"]


def test_demo_rows_name_their_split_and_cross_encoder_seconds(tmp_path):
    """The demo's summary rows carry `split` and `timing`: a split column, and only the timing
    columns some row has, the cross-encoder's seconds among them."""
    summary = write(tmp_path / "demo" / "summary.json", {
        "rows": {"cross_encoder": {**recall(60.0, 50.0), "split": "test[:100]",
                                   "timing": {"cross_encoder_s": 22.5, "total_s": 22.5}},
                 "lightningdot": {**recall(50.0, 40.0), "split": "test[:100]",
                                  "timing": {"encode_s": 0.25, "search_s": 0.125, "total_s": 0.375}}},
    })
    lines = report.main([f"demo={summary}"]).strip().splitlines()
    assert lines[0].split(" | ")[1] == "split"
    assert lines[0].rstrip(" |").endswith("encode (s) | search (s) | cross_encoder (s)")
    body = {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert body["demo / rows / cross_encoder"][1] == "test[:100]"
    assert body["demo / rows / cross_encoder"][-3:] == ["-", "-", "22.50"]
    assert body["demo / rows / lightningdot"][-3:] == ["0.25", "0.12", "-"]
