"""utils/progress.py: a tqdm bar on a terminal, a few plain lines in a log file."""
from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from utils.progress import LineProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_log_file_gets_a_few_lines_for_a_thousand_updates(capsys):
    bar = progress(total=1000, desc="encode", unit="img")
    assert isinstance(bar, LineProgress)
    for step in range(1000):
        bar.update(1)
        if step == 600:
            bar.set_postfix(loss="0.1234")
    bar.close()
    bar.close()
    lines = _lines(capsys)
    assert 2 <= len(lines) <= 6, lines
    assert all(line.startswith("encode: ") for line in lines)
    assert "\r" not in "".join(lines)
    assert bar.n == 1000
    assert "finished 1000/1000 img (100%)" in lines[-1] and "img/s" in lines[-1]
    assert lines[-1].endswith(", loss=0.1234")
    assert [line for line in lines if "(50%)" in line], lines


def test_iteration_and_context_use_count_every_item(capsys):
    items = list(progress(range(1000), desc="write"))
    assert items == list(range(1000))
    with progress(total=10, desc="tokenize", unit="cap") as bar:
        bar.update(4)
        bar.update(6)
    lines = _lines(capsys)
    assert sum(line.startswith("write: ") for line in lines) <= 6
    assert lines[-1].startswith("tokenize: finished 10/10 cap")
    assert "write: finished 1000/1000 it" in "\n".join(lines)


@pytest.mark.parametrize("chunk", [1, 7, 250, 1000])
def test_a_bar_never_writes_more_than_five_lines(capsys, chunk):
    with progress(total=1000, desc="x") as bar:
        for _ in range(0, 1000, chunk):
            bar.update(chunk)
    lines = _lines(capsys)
    assert len(lines) <= 5, lines
    assert lines[-1].startswith(f"x: finished {bar.n}/1000")


def test_unknown_total_writes_start_and_end_only(capsys):
    assert sum(1 for _ in progress((i for i in range(500)), desc="gen")) == 500
    lines = _lines(capsys)
    assert len(lines) == 2 and lines[-1].startswith("gen: finished 500 it")


def test_a_resumed_bar_starts_at_its_initial_count(capsys):
    with progress(total=100, initial=60, desc="train") as bar:
        for _ in range(40):
            bar.update(1)
    lines = _lines(capsys)
    assert lines[0] == "train: started, 60/100 it (60%)"
    assert len(lines) == 3 and "(75%)" in lines[1]
    assert lines[-1].startswith("train: finished 100/100 it")


def test_disabled_writes_nothing(capsys):
    with progress(total=100, desc="quiet", disable=True) as bar:
        bar.update(100)
    assert list(progress(range(3), disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress(total=1000, desc="train") as bar:
        assert isinstance(bar, tqdm)
        bar.update(1000)
    assert "\r" in terminal.getvalue() and "1000/1000" in terminal.getvalue()
    assert not isinstance(progress(total=3, disable=True), tqdm)


def test_the_environment_chooses_lines_on_a_terminal_or_a_bar_in_a_file(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.setenv("LIGHTNINGDOT_PROGRESS", "lines")
    assert isinstance(progress(total=3), LineProgress)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("LIGHTNINGDOT_PROGRESS", "bar")
    bar = progress(total=3)
    assert isinstance(bar, tqdm)
    bar.close()
