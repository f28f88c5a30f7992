"""Sections under time limits: a section that raises or runs out of time is recorded and the
run goes on; one stuck where Python cannot interrupt it ends the process.

The soft limit (`--section-timeout`) is a SIGALRM timer whose handler raises `SectionTimeout`
inside the section. Python runs the handler between bytecodes, so it stops anything but one
long native call (a CUDA synchronisation, a faiss build, a kernel compilation). For those a
watchdog thread is the hard stop: when the section still runs `grace_s` after the soft limit,
it marks the section as timed out, hands the records to `on_hard_stop` (which writes and prints
the result) and ends the process with `EXIT_HARD_STOP`: no thread can interrupt another
thread's native call, so ending the process is the only stop left.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scripts.benchmark.context import Context, Row
from utils.errors import UserError

logger = logging.getLogger("bench")

# Exit statuses of `scripts/bench.py` (0: every section ran, every check passed; 2: a user
# error, utils/errors.py).
EXIT_CHECKS_FAILED = 1
EXIT_SECTION_FAILED = 3
EXIT_HARD_STOP = 4
# How long a section may run past its limit before the watchdog ends the process: time to
# unwind (a DataLoader's workers, the serve section's server) after the soft stop.
DEFAULT_GRACE_S = 60.0

SectionFn = Callable[[Context], None]


class SectionTimeout(BaseException):
    """Raised inside a section when its time is up.

    A BaseException, as KeyboardInterrupt is: the `except Exception` with which a section
    survives its own expected failures (a kernel configuration that does not compile) lets
    it through.
    """


@dataclass
class SectionRecord:
    """What happened to one section of a run: an entry of the JSON's `sections`."""

    section: str
    status: str = "pending"  # pending | running | ok | failed | timeout
    seconds: float | None = None
    error: str = ""

    def failure_row(self) -> Row:
        """The table row of a section that failed or timed out (not a numerical check)."""
        first_line = self.error.splitlines()[0] if self.error else ""
        return Row(self.section, f"section {self.status}", self.seconds, "s", check=first_line[:160],
                   extra={"status": self.status, "error": self.error})


@contextlib.contextmanager
def soft_limit(seconds: float | None) -> Iterator[None]:
    """Raise `SectionTimeout` in the block when it runs longer than `seconds` (main thread only)."""
    if seconds is None:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"timed out after {seconds:g} s (--section-timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def watchdog(seconds: float | None, on_expiry: Callable[[], None]) -> Iterator[None]:
    """Call `on_expiry` from another thread when the block has not finished after `seconds`."""
    if seconds is None:
        yield
        return
    finished = threading.Event()

    def watch() -> None:
        if not finished.wait(seconds):
            on_expiry()

    threading.Thread(target=watch, name="bench-watchdog", daemon=True).start()
    try:
        yield
    finally:
        finished.set()


def run_sections(
    ctx: Context,
    sections: Sequence[tuple[str, SectionFn]],
    timeout_s: float | None,
    grace_s: float,
    save: Callable[[Sequence[SectionRecord]], None],
    on_hard_stop: Callable[[Sequence[SectionRecord]], None],
) -> list[SectionRecord]:
    """Run the sections in turn; one that raises or times out is recorded and the next runs.

    A section's rows measured before it stopped stay in `ctx.rows`; a stopped section also
    gets its `failure_row`. A `UserError` (a wrong path or flag) is not a section's failure:
    it ends the run as it always does.

    Args:
        ctx: the run context the sections fill.
        sections: (name, function) pairs in run order.
        timeout_s: the limit of each section in seconds; None for none.
        grace_s: how long a section may run past `timeout_s` before the watchdog ends the
            process with `EXIT_HARD_STOP`.
        save: called with the records when a section starts and when it ends (the JSON on
            disk then always holds every finished section).
        on_hard_stop: called from the watchdog thread with the records, the stuck section
            marked timed out, just before the process ends.

    Returns:
        One record per section, in run order.
    """
    records = [SectionRecord(name) for name, _ in sections]
    for record, (name, fn) in zip(records, sections):
        t0 = time.perf_counter()

        def stuck(record: SectionRecord = record, t0: float = t0) -> None:
            record.status, record.seconds = "timeout", time.perf_counter() - t0
            record.error = (f"still running {grace_s:g} s after its {timeout_s:g} s limit (stuck in native code): "
                            "the watchdog ended the process")
            ctx.add(record.failure_row())
            print(f"section {record.section}: {record.error}", file=sys.stderr)
            on_hard_stop(records)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_HARD_STOP)

        record.status = "running"
        save(records)
        try:
            with watchdog(None if timeout_s is None else timeout_s + grace_s, stuck), soft_limit(timeout_s):
                fn(ctx)
            record.status = "ok"
        except SectionTimeout as err:
            record.status, record.error = "timeout", str(err)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 (any error of a section is recorded; the run goes on)
            record.status, record.error = "failed", f"{type(err).__name__}: {err}"
            traceback.print_exc()
        record.seconds = time.perf_counter() - t0
        if record.status != "ok":
            print(f"section {name}: {record.error}", file=sys.stderr)
            ctx.add(record.failure_row())
        logger.info("section %s: %s, %.1f s", name, record.status, record.seconds)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        save(records)
    return records
