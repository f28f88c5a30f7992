"""Exact top-k, the faiss index variants, and sharded embedding storage."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utils.search.indexes import (
    FlatIndex,
    HNSWIndex,
    IVFPQIndex,
    build_index,
    index_embeddings,
    load_index,
)
from utils.search.shards import EmbeddingShardWriter, merge_shards, remove_shards
from utils.search.topk import exact_topk, results_to_lists

# Stated recall of the approximate indexes against exact top-10, on 2,000 Gaussian vectors.
HNSW_MIN_RECALL = 0.95
IVFPQ_MIN_RECALL = 0.6


def reference_topk(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((2000, 32)).astype(np.float32),
        rng.standard_normal((64, 32)).astype(np.float32),
    )


@pytest.mark.parametrize("blocks", [(None, None), (7, 100), (64, 2000), (1, 13)])
def test_exact_topk_is_exact(data, blocks):
    corpus, queries = data
    scores, ids = exact_topk(queries, corpus, 10, query_block=blocks[0], corpus_block=blocks[1])
    assert ids.shape == (64, 10) and scores.dtype == torch.float32 and ids.dtype == torch.long
    np.testing.assert_array_equal(ids.numpy(), reference_topk(queries, corpus, 10))
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(queries @ corpus.T, ids.numpy(), 1), rtol=1e-5)
    assert (np.diff(scores.numpy(), axis=1) <= 0).all()


def test_exact_topk_accepts_tensors_and_memmaps(data, tmp_path):
    corpus, queries = data
    path = tmp_path / "corpus.npy"
    np.save(path, corpus)
    mm = np.load(path, mmap_mode="r")
    ref = reference_topk(queries, corpus, 5)
    np.testing.assert_array_equal(exact_topk(queries, mm, 5, corpus_block=300)[1].numpy(), ref)
    np.testing.assert_array_equal(
        exact_topk(torch.from_numpy(queries), torch.from_numpy(corpus), 5)[1].numpy(), ref
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_topk_low_precision(data, dtype):
    corpus, queries = data
    scores, ids = exact_topk(queries, corpus, 10, dtype=dtype, corpus_block=500)
    assert scores.dtype == torch.float32
    exact = queries @ corpus.T
    kth = np.sort(exact, axis=1)[:, -10]
    # Every returned hit is a true top-10 hit up to the rounding of the low-precision product.
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    assert (np.take_along_axis(exact, ids.numpy(), 1) >= kth[:, None] - tol).all()


def test_exact_topk_never_pads():
    corpus = np.eye(3, dtype=np.float32)
    queries = np.ones((2, 3), dtype=np.float32)
    scores, ids = exact_topk(queries, corpus, 10)
    assert scores.shape == (2, 3)
    assert ids.shape == (2, 3)
    for row in ids.tolist():
        assert sorted(row) == [0, 1, 2]  # each id once, no -1, no repeats
    with pytest.raises(ValueError):
        exact_topk(queries, corpus, 0)


def test_exact_topk_orders_ties_by_index():
    corpus = np.array([[1.0], [2.0], [1.0], [2.0], [1.0]], dtype=np.float32)
    scores, ids = exact_topk(np.ones((1, 1), np.float32), corpus, 4, corpus_block=2)
    assert scores.tolist() == [[2.0, 2.0, 1.0, 1.0]]
    # Which tied rows fill the last slots is unspecified (as with torch.topk); their order is not.
    row = ids.tolist()[0]
    assert row[:2] == [1, 3] and row[2] < row[3] and set(row[2:]) <= {0, 2, 4}


def _recall_at_10(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), ref.tolist())]))


@pytest.mark.parametrize(
    "kind, min_recall", [("flat", 1.0), ("hnsw", HNSW_MIN_RECALL), ("ivfpq", IVFPQ_MIN_RECALL)]
)
def test_index_top_k_and_round_trip(data, tmp_path, kind, min_recall):
    corpus, queries = data
    index = index_embeddings(build_index(kind, 32), corpus, batch_size=512)
    assert index.ntotal == 2000 and index.kind == kind
    scores, ids = index.search(queries, 10)
    assert ids.shape == (64, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    ref = reference_topk(queries, corpus, 10)
    if kind == "flat":
        np.testing.assert_array_equal(ids, ref)
    assert _recall_at_10(ids, ref) >= min_recall
    path = tmp_path / f"{kind}.index"
    index.serialize(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = load_index(path)
    assert type(loaded) is type(index) and loaded.ntotal == 2000
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], ids)


def test_index_k_above_ntotal_is_not_padded():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    for index in (FlatIndex(8), HNSWIndex(8)):
        index.add(x)
        scores, ids = index.search(x[:2], 50)
        assert ids.shape == (2, 6)
        for row in results_to_lists(scores, ids):
            assert sorted(i for i, _ in row) == list(range(6))


def test_missing_slots_are_dropped_never_mapped_to_ids():
    # IVF with one probed list out of many cannot fill k slots: faiss answers -1 there.
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((8, 16)).astype(np.float32) * 10
    x = (centers[rng.integers(0, 8, 400)] + rng.standard_normal((400, 16))).astype(np.float32)
    index = IVFPQIndex(16, nlist=8, m=4, nbits=4, nprobe=1)
    index_embeddings(index, x)
    scores, ids = index.search(x[:5], 400)
    assert (ids == -1).any(), "the test needs unfilled slots"
    assert np.isneginf(scores[ids == -1]).all()
    lists = results_to_lists(scores, ids)
    for row, raw in zip(lists, ids):
        assert len(row) == int((raw != -1).sum())
        assert all(0 <= i < 400 for i, _ in row)
        assert len({i for i, _ in row}) == len(row)


def test_results_to_lists_drops_minus_one():
    scores = np.array([[3.0, 2.0, -np.inf]], np.float32)
    ids = np.array([[5, 1, -1]])
    assert results_to_lists(scores, ids) == [[(5, 3.0), (1, 2.0)]]


def test_index_errors():
    with pytest.raises(ValueError, match="index type"):
        build_index("lsh", 8)
    with pytest.raises(ValueError, match="shape"):
        FlatIndex(8).add(np.zeros((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="trained"):
        IVFPQIndex(8).add(np.zeros((2, 8), np.float32))
    with pytest.raises(FileNotFoundError):
        load_index("/nonexistent/img.index")


def test_shards_merge_to_canonical_order_and_index(tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((103, 8)).astype(np.float32)
    order = rng.permutation(103)  # encoded in, say, length order
    writer = EmbeddingShardWriter(tmp_path / "shards", "img", dim=8, shard_size=20)
    for start in range(0, 103, 9):
        pos = order[start : start + 9]
        writer.add(torch.from_numpy(pos), torch.from_numpy(emb[pos]))
    manifest = writer.close()
    meta = json.loads(manifest.read_text())
    assert meta["total"] == 103 and len(meta["shards"]) == 6
    out = merge_shards(manifest, tmp_path / "img_emb.npy", 103)
    merged = np.load(out, mmap_mode="r")
    np.testing.assert_array_equal(merged, emb)
    index = index_embeddings(FlatIndex(8), merged, batch_size=10)
    np.testing.assert_array_equal(index.search(emb[:3], 4)[1], reference_topk(emb[:3], emb, 4))
    remove_shards(manifest)
    assert list((tmp_path / "shards").iterdir()) == []


def test_merge_refuses_missing_or_repeated_rows(tmp_path):
    writer = EmbeddingShardWriter(tmp_path, "txt", dim=2, shard_size=100)
    writer.add(np.array([0, 2]), np.zeros((2, 2), np.float32))
    manifest = writer.close()
    with pytest.raises(ValueError, match="missing"):
        merge_shards(manifest, tmp_path / "txt_emb.npy", 3)
    assert not (tmp_path / "txt_emb.npy").exists()
    writer = EmbeddingShardWriter(tmp_path, "dup", dim=2, shard_size=1)
    writer.add(np.array([0, 1]), np.zeros((2, 2), np.float32))
    writer.add(np.array([1]), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="already written"):
        merge_shards(writer.close(), tmp_path / "dup_emb.npy", 2)
    assert not (tmp_path / "dup_emb.npy").exists()
