"""The benchmark command (`make bench` = `scripts/bench.py --quick`); see docs/benchmarks.md.

The benchmark itself is the package `scripts/benchmark/`; `--help` lists the options and the
exit statuses.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.benchmark.cli import run
from utils.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(run))
