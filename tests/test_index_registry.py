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
    IVFFlatIndex,
    build_index,
    index_embeddings,
    index_parameters,
    index_shards,
    load_index,
    register_index,
    split_index_spec,
)
from utils.search.shards import EmbeddingShardWriter
from utils.search.topk import MISSING_ID


def test_registry_names_every_index_type():
    assert set(INDEX_CLASSES) == {"flat", "hnsw", "ivfpq", "ivfflat"}
    assert index_parameters("hnsw") == ["m", "ef_construction", "ef_search"]
    assert index_parameters("ivfpq") == ["nlist", "m", "nbits", "nprobe", "use_gpu"]
    assert index_parameters("ivfflat") == ["nlist", "nprobe", "use_gpu"]


def test_spec_from_config_builds_the_configured_index(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  index: {type: hnsw, m: 8}\n")
    cfg = load_config(path, ["retrieval.index.ef_search=64"])
    assert cfg.retrieval.index.to_dict() == {"type": "hnsw", "m": 8, "ef_search": 64}
    index = build_index(cfg.retrieval.index.type, 16, **cfg.retrieval.index.params)
    assert isinstance(index, HNSWIndex) and index._index.hnsw.efSearch == 64
    # The graph's M: level-0 neighbour lists hold 2 * M entries.
    assert index._index.hnsw.nb_neighbors(0) == 16
    # Our earlier flat spelling still selects the type.
    assert load_config(path, ["index_type=flat"]).retrieval.index.to_dict() == {"type": "flat"}


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


def _brute_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and rows of the k best inner products."""
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def _gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_ivfflat_probing_every_list_is_brute_force(tmp_path):
    corpus, queries = _gaussian(2000, 16, 0), _gaussian(25, 16, 1)
    index = build_index("ivfflat", 16, nlist=8, nprobe=8, use_gpu=False)
    assert isinstance(index, IVFFlatIndex) and not index.is_trained and index.ntotal == 0
    index_embeddings(index, corpus, batch_size=300)
    assert index._index.nlist == 8 and index.ntotal == 2000
    ref_s, ref_i = _brute_topk(queries, corpus, 50)
    scores, ids = index.search(queries, 50)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    # Written and read back: the same type, nprobe and results.
    index.serialize(tmp_path / "ivf.index")
    back = load_index(tmp_path / "ivf.index", use_gpu=False)
    assert isinstance(back, IVFFlatIndex) and back._index.nprobe == 8
    np.testing.assert_array_equal(back.search(queries, 50)[1], ref_i)


def test_ivfflat_one_probe_scans_only_the_nearest_list():
    corpus, queries = _gaussian(2000, 8, 2), _gaussian(10, 8, 3)
    index = index_embeddings(build_index("ivfflat", 8, nlist=16, nprobe=1, use_gpu=False), corpus)
    # Reference: the list of each row and of each query's best centroid, from the quantiser.
    centroids = index._index.quantizer.reconstruct_n(0, 16)
    row_list = np.argmax(corpus @ centroids.T, axis=1)
    scores, ids = index.search(queries, 2000)
    for q in range(10):
        members = np.nonzero(row_list == np.argmax(centroids @ queries[q]))[0]
        ref_s, ref_i = _brute_topk(queries[q : q + 1], corpus[members], members.size)
        # Exactly the members of one list, exactly scored; the rest of the slots are empty.
        np.testing.assert_array_equal(ids[q, : members.size], members[ref_i[0]])
        np.testing.assert_allclose(scores[q, : members.size], ref_s[0], rtol=1e-5, atol=1e-5)
        assert (ids[q, members.size :] == MISSING_ID).all() and np.isneginf(scores[q, members.size :]).all()


def test_ivfflat_from_shards_equals_in_memory_build(tmp_path):
    corpus, queries = _gaussian(1200, 8, 4), _gaussian(10, 8, 5)
    order = np.random.default_rng(6).permutation(1200)
    manifests = []
    for rank, rows in enumerate(np.array_split(order, 2)):
        writer = EmbeddingShardWriter(tmp_path, f"r{rank}", 8, shard_size=100)
        writer.add(rows, corpus[rows])
        manifests.append(writer.close())
    params = {"nlist": 12, "nprobe": 3, "use_gpu": False}
    built = index_shards(build_index("ivfflat", 8, **params), manifests, 1200, train_size=600, seed=1)
    memory = index_embeddings(build_index("ivfflat", 8, **params), corpus, train_size=600, seed=1)
    s_b, i_b = built.search(queries, 30)
    s_m, i_m = memory.search(queries, 30)
    # Same quantiser, same lists: the same hits (equal scores may be listed in any order).
    np.testing.assert_array_equal(s_b, s_m)
    for row in range(10):
        assert sorted(zip(-s_b[row], i_b[row])) == sorted(zip(-s_m[row], i_m[row]))


def test_ivfflat_needs_training_first():
    index = build_index("ivfflat", 4, nlist=2)
    with pytest.raises(RuntimeError, match="trained"):
        index.add(np.zeros((3, 4), np.float32))
    assert index.search(np.zeros((2, 4), np.float32), 5)[1].shape == (2, 0)
