"""Index types are a registry; their parameters come from `retrieval.index` of the config."""
from __future__ import annotations

import numpy as np
import pytest

from utils.config import load_config
from utils.search.indexes import (
    INDEX_CLASSES,
    FaissIndex,
    FlatIndex,
    HNSWIndex,
    build_index,
    index_embeddings,
    index_parameters,
    load_index,
    register_index,
    split_index_spec,
)


def test_registry_names_every_index_type():
    assert set(INDEX_CLASSES) == {"flat", "hnsw", "ivfpq"}
    assert index_parameters("hnsw") == ["m", "ef_construction", "ef_search"]
    assert index_parameters("ivfpq") == ["nlist", "m", "nbits", "nprobe", "use_gpu"]


def test_spec_from_config_builds_the_configured_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  index: {type: hnsw, m: 8}\n")
    cfg = load_config(path, ["retrieval.index.ef_search=64"])
    assert cfg.retrieval.index == {"type": "hnsw", "m": 8, "ef_search": 64}
    kind, params = split_index_spec(cfg.retrieval.index)
    index = build_index(kind, 16, **params)
    assert isinstance(index, HNSWIndex) and index._index.hnsw.efSearch == 64
    # The graph's M: level-0 neighbour lists hold 2 * M entries.
    assert index._index.hnsw.nb_neighbors(0) == 16
    # Our earlier flat spelling still selects the type.
    assert load_config(path, ["index_type=flat"]).retrieval.index == {"type": "flat"}


def test_bad_spec_names_the_type_and_the_parameter():
    with pytest.raises(ValueError, match="'lsh'"):
        split_index_spec({"type": "lsh"})
    with pytest.raises(ValueError, match=r"takes \['m', 'ef_construction', 'ef_search'\], not \['nprobe'\]"):
        split_index_spec({"type": "hnsw", "nprobe": 4})
    assert split_index_spec({}) == ("flat", {})


def test_a_registered_type_is_built_and_read_back(tmp_path):
    @register_index
    class SmallFlat(FlatIndex):
        kind = "test-small-flat"
        faiss_type = "IndexFlatIP-test"

    try:
        index = build_index("test-small-flat", 4)
        assert type(index) is SmallFlat and isinstance(index, FaissIndex)
        rows = np.eye(4, dtype=np.float32)
        index_embeddings(index, rows)
        scores, ids = index.search(rows[:1], 2)
        assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1.0)
        index.serialize(tmp_path / "x.index")
        # The stored faiss type is IndexFlatIP: it reads back as the registered flat class.
        assert isinstance(load_index(tmp_path / "x.index"), FlatIndex)
    finally:
        del INDEX_CLASSES["test-small-flat"]
