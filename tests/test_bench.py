"""`scripts/bench.py --quick` runs on CPU, writes its JSON and every fast path passes its check;
a section that raises or runs out of time is recorded and the run goes on."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from scripts.benchmark import cli
from scripts.benchmark.cascade import CASCADES, IVF_CASCADES
from scripts.benchmark.context import Context, Row
from scripts.benchmark.flops import encoder_flops
from scripts.benchmark.runner import (
    EXIT_CHECKS_FAILED,
    EXIT_HARD_STOP,
    EXIT_SECTION_FAILED,
)
from scripts.benchmark.sections import SECTION_FNS, SECTIONS
from utils.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


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
    assert [s["status"] for s in result["sections"]] == ["ok"] * 4
    assert cli.exit_status(result) == 0


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


# ----------------------------------------------------------------------------- time limits
# Sections are replaced by stand-ins that finish at once, sleep far past the limit or raise,
# so nothing depends on how fast this machine is.


def _argv(tmp_path: Path, sections: str, *extra: str) -> list[str]:
    return ["--quick", "--sections", sections, "--workdir", str(tmp_path), "--out", str(tmp_path / "bench.json"), *extra]


def _instant(name: str) -> Any:
    def section(ctx: Context) -> None:
        ctx.add(Row(name, f"{name} figure", 1.0, "x"))

    return section


def _statuses(result: dict) -> dict[str, str]:
    return {entry["section"]: entry["status"] for entry in result["sections"]}


def test_timed_out_section_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    on_disk_while_stuck: list[dict] = []

    def sleepy_search(ctx: Context) -> None:
        on_disk_while_stuck.append(json.loads(out.read_text()))
        ctx.add(Row("search", "measured before the limit", 2.0, "ms"))
        time.sleep(120)

    monkeypatch.setitem(SECTION_FNS, "peak", _instant("peak"))
    monkeypatch.setitem(SECTION_FNS, "search", sleepy_search)
    monkeypatch.setitem(SECTION_FNS, "cross", _instant("cross"))
    t0 = time.perf_counter()
    status = cli.run(_argv(tmp_path, "peak,search,cross", "--section-timeout", "0.5"))
    assert time.perf_counter() - t0 < 60

    assert status == EXIT_SECTION_FAILED
    # While the section ran, the file already held the finished one and said which was running.
    (snapshot,) = on_disk_while_stuck
    assert [r["name"] for r in snapshot["rows"]] == ["peak figure"]
    assert _statuses(snapshot) == {"peak": "ok", "search": "running", "cross": "pending"}

    result = json.loads(out.read_text())
    assert _statuses(result) == {"peak": "ok", "search": "timeout", "cross": "ok"}
    search = next(e for e in result["sections"] if e["section"] == "search")
    assert search["seconds"] >= 0.5 and "--section-timeout" in search["error"]
    rows = [(r["section"], r["name"]) for r in result["rows"]]
    assert rows == [("peak", "peak figure"), ("search", "measured before the limit"),
                    ("search", "section timeout"), ("cross", "cross figure")]
    assert result["rows"][2]["extra"]["status"] == "timeout" and result["failed_checks"] == []
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "TIMED OUT sections: ['search']"


def test_section_that_raises_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_search(ctx: Context) -> None:
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(SECTION_FNS, "search", broken_search)
    monkeypatch.setitem(SECTION_FNS, "cross", _instant("cross"))
    # As scripts/bench.py calls it.
    assert run_cli(cli.run, _argv(tmp_path, "search,cross")) == EXIT_SECTION_FAILED

    result = json.loads((tmp_path / "bench.json").read_text())
    assert _statuses(result) == {"search": "failed", "cross": "ok"}
    assert result["sections"][0]["error"] == "RuntimeError: kernel exploded"
    failure = result["rows"][0]
    assert (failure["section"], failure["name"], failure["check"]) == ("search", "section failed", "RuntimeError: kernel exploded")
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "FAILED sections: ['search: RuntimeError: kernel exploded']"


@pytest.mark.parametrize(
    ("check_ok", "search_status", "expected"),
    [(True, "ok", 0), (False, "ok", EXIT_CHECKS_FAILED), (True, "timeout", EXIT_SECTION_FAILED),
     (False, "failed", EXIT_SECTION_FAILED)],
)
def test_exit_status(check_ok: bool, search_status: str, expected: int) -> None:
    result = {"failed_checks": [] if check_ok else ["cross/pairs/s fast"],
              "sections": [{"section": "cross", "status": "ok"}, {"section": "search", "status": search_status}]}
    assert cli.exit_status(result) == expected


def test_watchdog_ends_a_section_stuck_past_its_grace(tmp_path: Path) -> None:
    # The stand-in swallows the soft stop as a long native call would never see it.
    script = textwrap.dedent("""
        import sys, time
        from scripts.benchmark.cli import run
        from scripts.benchmark.context import Row
        from scripts.benchmark.runner import SectionTimeout
        from scripts.benchmark.sections import SECTION_FNS

        def stuck(ctx):
            ctx.add(Row("search", "measured before the limit", 2.0, "ms"))
            while True:
                try:
                    time.sleep(120)
                except SectionTimeout:
                    pass

        SECTION_FNS["search"] = stuck
        sys.exit(run(sys.argv[1:]))
    """)
    argv = _argv(tmp_path, "search,cross", "--section-timeout", "0.3", "--section-grace", "0.3")
    proc = subprocess.run([sys.executable, "-c", script, *argv], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)

    assert proc.returncode == EXIT_HARD_STOP, proc.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert _statuses(result) == {"search": "timeout", "cross": "pending"}
    assert "watchdog ended the process" in result["sections"][0]["error"]
    assert [r["name"] for r in result["rows"]] == ["measured before the limit", "section timeout"]
    assert "stuck in native code" in proc.stderr
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-2:] == ["TIMED OUT sections: ['search']", "NOT RUN sections (the watchdog ended the run): ['cross']"]
    assert not list(tmp_path.glob("ldot_bench_*"))  # the synthetic-data directory is gone too
