"""Shared test set-up: the `slow` marker, the repo root on sys.path, the original-config fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Fixtures of the original LightningDOT / UNITER config layouts (see tests/fixtures/README.md).
ORIGINAL_CONFIGS_DIR = Path(__file__).resolve().parent / "fixtures" / "original_configs"

# Two cores: torch and faiss each spin their own OpenMP pool; keep them from fighting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes long on a 2-core CPU; run with --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
