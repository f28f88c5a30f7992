"""Shared test set-up: the `slow` marker, the repo root on sys.path, the shared fixtures.

pytest finds the fixtures here without an import. Non-fixture helpers (the tiny model
config, reference computations, config builders, raw database writers) are in
tests/helpers.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Two cores: torch and faiss each spin their own OpenMP pool; keep them from fighting.
# (Set before tests.helpers imports torch.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.helpers import Workspace, build_workspace, tiny_bert_config


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


# ---------------------------------------------------------------- synthetic data


@pytest.fixture(scope="session")
def synthetic_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Manifest (absolute paths) of the tiny synthetic dataset, generated once per session."""
    from data.synthetic import TINY, generate

    # generate() reuses the directory when its manifest matches, so the data is built once.
    return generate(str(tmp_path_factory.getbasetemp() / "synthetic_tiny"), TINY,
                    progress=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic `TINY` dataset (32 / 8 / 12 images, 5 captions each), generated once."""
    from data.synthetic import TINY, generate

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return generate(str(root), TINY, progress=False)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A synthetic set large enough for held-out recall to mean something (about 2 s)."""
    from data.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("synthetic") / "small"
    return generate(str(root), SyntheticConfig(num_train=300, num_val=40, num_test=40), progress=False)


# ---------------------------------------------------------------- tiny models of the training-script tests


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of tiny text / image tower configs whose vocabulary is the synthetic one.

    Dropout off (runs are functions of weights and data) and initializer range 0.1 (the
    tiny model leaves the contrastive plateau quickly): see `tiny_bert_config`.
    """
    from data.synthetic import vocabulary

    folder = tmp_path_factory.mktemp("tiny_models")
    config = tiny_bert_config(len(vocabulary()), dropout=0.0, initializer_range=0.1)
    paths = {}
    for name in ("txt", "img"):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config))
        paths[name] = str(path)
    return paths


# ---------------------------------------------------------------- the inference / re-ranking workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Tiny synthetic data, tiny configs and checkpoints in every supported format."""
    return build_workspace(tmp_path_factory.getbasetemp() / "inference_workspace")


@pytest.fixture(scope="session")
def retrieval_dir(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inference run of our checkpoint on the test split (shared by the re-ranking tests)."""
    import inference

    out = tmp_path_factory.getbasetemp() / "inference_workspace" / "retrieval"
    if not (out / "info.json").is_file():
        inference.main(["--config", str(workspace.config), "--checkpoint", str(workspace.our_ckpt),
                        "--output_dir", str(out)])
    return out
