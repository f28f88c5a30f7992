"""`scripts/bench.py --quick` runs on CPU, writes its JSON and every fast path passes its check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.benchmark import cli
from scripts.benchmark.cascade import CASCADES, IVF_CASCADES
from scripts.benchmark.flops import encoder_flops
from scripts.benchmark.sections import SECTIONS


def _run(tmp_path: Path, sections: str) -> dict:
    out = tmp_path / "bench.json"
    result = cli.main(["--quick", "--sections", sections, "--steps", "1", "--warmup", "0",
                       "--workdir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    assert result["failed_checks"] == []
    return result


def test_quick_core_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(tmp_path, "peak,train,search,eval")
    names = {(r["section"], r["name"]) for r in result["rows"]}
    assert ("train", "itm fast") in names and ("search", "Q=1024 dense+topk ms") in names
    assert ("eval", "biencoder e2e s") in names
    itm = next(r for r in result["rows"] if r["name"] == "itm fast")
    assert itm["ok"] is True and itm["ratio"] > 0 and itm["extra"]["mfu"] > 0
    # Every fast search path was checked against the dense baseline.
    assert all(r["ok"] for r in result["rows"] if r["section"] == "search" and r["check"].startswith("recall"))
    table = capsys.readouterr().out
    assert "x base" in table and "PASS" in table and "FAIL" not in table


@pytest.mark.slow
def test_quick_all_sections(tmp_path: Path) -> None:
    result = _run(tmp_path, ",".join(SECTIONS))
    sections = {r["section"] for r in result["rows"]}
    assert sections == set(SECTIONS)
    ratio = next(r for r in result["rows"] if r["name"] == "ratio to train")
    assert ratio["value"] is not None and ratio["value"] > 0


def test_flop_count_matches_hand_count() -> None:
    # One layer, hidden 2, intermediate 3, one sequence of 4 tokens, all rows kept:
    # 4 * (8 * 4 + 4 * 2 * 3) + 4 * 16 * 2 = 352.
    assert encoder_flops([4], hidden=2, intermediate=3, layers=1, cls_only_last=False) == 352
    # [CLS]-only last layer: K, V for 4 tokens (4 * 4 * 4), Q, O, FFN for one row
    # (4 * 4 + 4 * 2 * 3), attention of one query over 4 keys (4 * 4 * 2).
    assert encoder_flops([4], hidden=2, intermediate=3, layers=1, cls_only_last=True) == 64 + 40 + 32


def test_unknown_section_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown sections"):
        cli.main(["--quick", "--sections", "gpu"])


def test_quick_cascade_section(tmp_path: Path) -> None:
    result = _run(tmp_path, "cascade")
    rows = {r["name"]: r for r in result["rows"] if r["section"] == "cascade"}
    assert "synthetic prefix-model vectors" in rows["data"]["check"]
    for q in (1, 64, 1024):
        assert rows[f"Q={q} flat exact ms"]["value"] > 0
        for name, stages in CASCADES.items():
            row = rows[f"Q={q} {name}"]
            # Checked: final scores are the rows' full dot products; recall vs flat is recorded.
            assert row["ok"] is True and row["ratio"] > 0
            assert [(s["dim"], s["keep"]) for s in row["extra"]["stages"]] == [tuple(st) for st in stages]
            assert 90.0 <= row["extra"]["recall_at_k"] <= 100.0 and len(row["extra"]["stage_ms"]) == len(stages)
        for name, (_, _, stages) in IVF_CASCADES.items():
            row = rows[f"Q={q} {name}"]
            assert row["ok"] is True and row["ratio"] > 0
            assert [(s["dim"], s["keep"]) for s in row["extra"]["stages"]] == [tuple(st) for st in stages]
            assert 0.0 <= row["extra"]["recall_at_k"] <= 100.0
    n = rows["data"]["value"]
    for name, (nlist, nprobe, stages) in IVF_CASCADES.items():
        # nlist scaled to the quick corpus, nprobe keeping the probed fraction.
        nlist_n = max(4, round(nlist * n / 1_000_000))
        assert rows[f"ivfflat {stages[0][0]}-d nlist {nlist_n} build s"]["value"] > 0
        assert rows[f"Q=64 {name}"]["extra"]["nprobe"] == max(1, round(nprobe * nlist_n / nlist))
    assert rows["data"]["extra"]["faiss_threads"] >= 1

