"""Tiny synthetic data and tiny model configs for the training-script tests.

A test module uses the fixtures by declaring `pytest_plugins = ["tests._training_fixtures"]`.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from data.synthetic import TINY, SyntheticConfig, generate, vocabulary
from tests._training_configs import tiny_bert_config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic `TINY` dataset (32 / 8 / 12 images, 5 captions each), generated once."""
    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return generate(str(root), TINY, progress=False)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A synthetic set large enough for held-out recall to mean something (about 2 s)."""
    root = tmp_path_factory.mktemp("synthetic") / "small"
    return generate(str(root), SyntheticConfig(num_train=300, num_val=40, num_test=40), progress=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of tiny text / image tower configs whose vocabulary is the synthetic one."""
    folder = tmp_path_factory.mktemp("tiny_models")
    config = tiny_bert_config(len(vocabulary()))
    paths = {}
    for name in ("txt", "img"):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config))
        paths[name] = str(path)
    return paths
