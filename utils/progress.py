"""Progress bars that suit a terminal and a log file alike.

On a terminal `progress` is a tqdm bar. When stderr goes to a file or a pipe, a tqdm bar would
still write one carriage-return frame per redraw (hundreds of KB over a demo run), so there it
writes a few plain lines instead: one at the start, one at each quarter of the total, and one
at the end with the elapsed time and the rate; at most five lines per bar, whatever its length.

The environment variable `LIGHTNINGDOT_PROGRESS` overrides the choice: `lines` writes plain
lines on a terminal too (several processes sharing one terminal, as the demo's workers),
`bar` draws a tqdm bar whatever stderr is.

A leaf module: it imports nothing of the project.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol, Self

from tqdm import tqdm

# Fractions of the total at which the plain-line mode reports (start and end come on top).
QUARTERS = (0.25, 0.5, 0.75)
PROGRESS_ENV = "LIGHTNINGDOT_PROGRESS"


class ProgressBar(Protocol):
    """What every progress bar offers: a tqdm bar and `LineProgress` alike."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> Any: ...


class LineProgress:
    """A progress report in a few plain lines, for a stream that is not a terminal.

    Used like a tqdm bar (`update`, `set_postfix`, `close`, iteration, `with`). It writes a
    line when it starts, when the count first reaches each quarter of `total`, and when it is
    closed (count, elapsed time, rate and the last postfix). Without a known total only the
    start and end lines are written.

    Args:
        iterable: items to iterate over while counting them (optional).
        total: the count at completion; defaults to `len(iterable)` when it has one.
        desc: label at the start of every line.
        unit: what one count is (`it`, `img`, `cap`, ...).
        disable: write nothing (the count is still kept).
        initial: the count to start from (a resumed run).
        file: the stream to write to; default `sys.stderr`.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        initial: int = 0,
        file: Any = None,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.n = initial
        self._initial = initial
        self._file = file if file is not None else sys.stderr
        self._postfix = ""
        self._start = time.perf_counter()
        self._quarter = self._quarters_reached()
        self._closed = False
        self._write(f"started, {self._count()}")

    def _quarters_reached(self) -> int:
        if not self.total:
            return len(QUARTERS)
        return sum(self.n >= fraction * self.total for fraction in QUARTERS)

    def _count(self) -> str:
        if not self.total:
            return f"{self.n} {self.unit}"
        return f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"

    def _timing(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._initial) / max(elapsed, 1e-9)
        return f"{elapsed:.1f}s, {rate:.2f} {self.unit}/s"

    def _write(self, text: str) -> None:
        if self.disable:
            return
        label = f"{self.desc}: " if self.desc else ""
        self._file.write(f"{label}{text}{self._postfix}\n")
        self._file.flush()

    def update(self, n: int = 1) -> None:
        """Count `n` more; write a line when this reaches a new quarter of the total."""
        self.n += n
        reached = self._quarters_reached()
        if reached > self._quarter and self.total and self.n < self.total:
            self._write(f"{self._count()}, {self._timing()}")
        self._quarter = max(self._quarter, reached)

    def set_postfix(self, **values: Any) -> None:
        """Values appended to the following lines, e.g. `loss="0.1234"`."""
        self._postfix = "".join(f", {key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Write the end line (once)."""
        if self._closed:
            return
        self._closed = True
        self._write(f"finished {self._count()} in {self._timing()}")

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
) -> ProgressBar:
    """A progress bar on stderr: tqdm on a terminal, a few plain lines otherwise.

    Args:
        iterable: items to iterate over while counting them (optional; else call `update`).
        total: the count at completion; defaults to `len(iterable)` when it has one.
        desc: the bar's label.
        unit: what one count is.
        disable: show nothing (e.g. on ranks other than 0, or when the caller asked for quiet).
        initial: the count to start from (a resumed run).

    Returns:
        An object with `update(n)`, `set_postfix(**values)`, `close()`, iteration (over
        `iterable`) and context-manager use.
    """
    mode = os.environ.get(PROGRESS_ENV, "auto")
    bar = mode == "bar" or (mode != "lines" and sys.stderr.isatty())
    if not disable and bar:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial)
