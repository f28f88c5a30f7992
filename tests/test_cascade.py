"""Coarse-to-fine cascade search and the shard-consuming index build (HiVLP retrieval)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import inference
import rerank
from model.biencoder import build_biencoder
from tests.helpers import PROJECT_DIM, brute_force_recall, randomize_, save_checkpoint
from utils.config import CascadeStage, RetrievalConfig
from utils.errors import ConfigError
from utils.search.cascade import (
    cascade_search,
    check_levels,
    ivf_threshold_topk,
    rescore_candidates,
    threshold_topk,
)
from utils.search.indexes import (
    FlatIndex,
    build_index,
    index_embeddings,
    index_shards,
    load_index,
    train_sample_rows,
)
from utils.search.shards import EmbeddingShardWriter, sample_from_shards

DIMS = (8, 16, 32)


def prefix_data(n: int, q: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Corpus and queries whose variance decays over dimensions, as a prefix-trained model's."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    corpus = rng.standard_normal((n, dim)).astype(np.float32) * scale
    queries = corpus[rng.choice(n, q, replace=False)] + 0.3 * rng.standard_normal((q, dim)).astype(np.float32) * scale
    return corpus, queries.astype(np.float32)


def levels(x: np.ndarray, dims=DIMS) -> list[np.ndarray]:
    return [np.ascontiguousarray(x[:, :d]) for d in dims]


def brute_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and rows of the k best, equal scores by row."""
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("first", [None, "flat", "ivfflat"])
def test_cascade_keeping_everything_is_flat_exact_topk(first):
    corpus, queries = prefix_data(300, 20)
    stages = [CascadeStage(8, 300), CascadeStage(16, 400), CascadeStage(32, 300)]
    # IVF-Flat probing all of its 4 lists scores every row exactly, as flat search does.
    index = {
        None: None,
        "flat": FlatIndex(8, use_gpu=False),
        "ivfflat": build_index("ivfflat", 8, nlist=4, nprobe=4, use_gpu=False),
    }[first]
    if index is not None:
        index_embeddings(index, corpus[:, :8])
    results = cascade_search(levels(queries), levels(corpus), stages, first_index=index)
    ref_s, ref_i = brute_topk(queries, corpus, 10)
    final = results[-1]
    assert final.ids.shape == (20, 300)
    np.testing.assert_array_equal(final.ids[:, :10], ref_i)
    np.testing.assert_allclose(final.scores[:, :10], ref_s, rtol=1e-5, atol=1e-6)
    assert all(r.seconds >= 0 for r in results)


def test_each_stage_rescores_with_a_brute_force_dot_product():
    corpus, queries = prefix_data(500, 16, seed=1)
    stages = [CascadeStage(8, 60), CascadeStage(16, 25), CascadeStage(32, 7)]
    results = cascade_search(levels(queries), levels(corpus), stages)
    # Stage 1: exact top-60 at 8 dims.
    _, i1 = brute_topk(queries[:, :8], corpus[:, :8], 60)
    np.testing.assert_array_equal(results[0].ids, i1)
    for prev, cur in itertools.pairwise(results):
        d = cur.stage.dim
        full = queries[:, :d].astype(np.float64) @ corpus[:, :d].T.astype(np.float64)
        # Scores are the level's dot products of the kept rows ...
        np.testing.assert_allclose(cur.scores, np.take_along_axis(full, cur.ids, 1), rtol=1e-5, atol=1e-6)
        # ... and the kept rows are the best of the previous stage's candidates.
        cand_scores = np.take_along_axis(full, prev.ids, 1)
        order = np.lexsort((prev.ids, -cand_scores), axis=1)[:, : cur.stage.keep]
        np.testing.assert_array_equal(cur.ids, np.take_along_axis(prev.ids, order, 1))


@pytest.mark.parametrize("ties", [False, True])
def test_threshold_topk_equals_brute_force(ties):
    rng = np.random.default_rng(4)
    if ties:  # small integers: many equal scores, which must be ordered by row
        corpus = rng.integers(-2, 3, (3000, 6)).astype(np.float32)
        queries = rng.integers(-2, 3, (9, 6)).astype(np.float32)
    else:
        corpus, queries = prefix_data(3000, 9, seed=4)
    for k, block in ((100, 256), (700, 256), (5000, 1000)):
        scores, ids = threshold_topk(queries, corpus, k, corpus_block=block, max_block_elements=4 * block)
        ref_s, ref_i = brute_topk(queries, corpus, min(k, 3000))
        np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
        full = queries.astype(np.float64) @ corpus.T.astype(np.float64)
        np.testing.assert_allclose(scores, np.take_along_axis(full, ids, 1), rtol=1e-5, atol=1e-5)
        if ties:
            # Which of the rows tied at the k-th score make the cut is free (as in
            # exact_topk); the kept ones are distinct and listed by score, then row.
            assert all(len(set(row)) == len(row) for row in ids.tolist())
            assert all(sorted(zip(-s_row, i_row)) == list(zip(-s_row, i_row)) for s_row, i_row in zip(scores, ids))
        else:
            np.testing.assert_array_equal(ids, ref_i)


def test_ivf_threshold_topk_equals_brute_force_over_the_probed_lists():
    corpus, queries = prefix_data(4000, 40, seed=5)
    index = index_embeddings(build_index("ivfflat", 32, nlist=20, nprobe=5, use_gpu=False), corpus)
    # Reference: each row's list and each query's 5 best centroids, then brute force over
    # exactly the rows of those lists.
    centroids = index.centroids().astype(np.float64)
    row_list = np.argmax(corpus.astype(np.float64) @ centroids.T, axis=1)
    probed = np.argsort(-(queries.astype(np.float64) @ centroids.T), axis=1)[:, :5]
    for k, block in ((64, 7), (300, 40), (5000, 16)):
        scores, ids = ivf_threshold_topk(queries, index, k, query_block=block)
        assert scores.shape == ids.shape == (40, min(k, 4000))
        for q in range(40):
            members = np.nonzero(np.isin(row_list, probed[q]))[0]
            ref_s, ref_i = brute_topk(queries[q : q + 1], corpus[members], min(k, members.size))
            n = ref_i.shape[1]
            # The reference's scores, by distinct rows of the probed lists scored exactly
            # (rows of float32-equal scores may swap places, so rows are not compared in order).
            np.testing.assert_allclose(scores[q, :n], ref_s[0], rtol=1e-5, atol=1e-5)
            assert len(set(ids[q, :n].tolist())) == n and np.isin(ids[q, :n], members).all()
            exact = corpus[ids[q, :n]].astype(np.float64) @ queries[q].astype(np.float64)
            np.testing.assert_allclose(scores[q, :n], exact, rtol=1e-5, atol=1e-5)
            # Fewer rows in the probed lists than k: the rest are empty slots.
            assert (ids[q, n:] == -1).all() and np.isneginf(scores[q, n:]).all()
    # The same lists as faiss's own search of the index.
    f_s, _ = index.search(queries, 300)
    np.testing.assert_allclose(ivf_threshold_topk(queries, index, 300)[0], f_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_memmap", [False, True])
def test_rescoring_skips_empty_slots_and_reads_memmaps(tmp_path, as_memmap):
    corpus, queries = prefix_data(50, 4, seed=2)
    if as_memmap:
        np.save(tmp_path / "c.npy", corpus)
        corpus_in = np.load(tmp_path / "c.npy", mmap_mode="r")
    else:
        corpus_in = corpus
    cand = np.array([[3, -1, 7, 7], [-1, -1, -1, -1], [0, 1, 2, 3], [49, 10, -1, 5]], dtype=np.int64)
    scores, ids = rescore_candidates(queries, corpus_in, cand, keep=3, max_block_elements=40)
    dots = (queries.astype(np.float64)[:, None, :] * corpus[np.maximum(cand, 0)]).sum(-1)
    for row in range(4):
        valid = [(-dots[row, j], int(cand[row, j])) for j in range(4) if cand[row, j] >= 0]
        want = sorted(valid)[:3]
        got = [(float(-s), int(i)) for s, i in zip(scores[row], ids[row]) if i >= 0]
        assert [i for _, i in got] == [i for _, i in want]
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-5)
        assert (ids[row][len(want):] == -1).all() and np.isneginf(scores[row][len(want):]).all()


def test_the_cascade_spec_is_checked_when_the_config_loads_and_against_the_levels():
    spec = [{"dim": 64, "keep": 1000}, {"dim": 256, "keep": 100}, {"dim": 768, "keep": 20}]
    stages = RetrievalConfig(cascade=spec, top_k=20).cascade
    assert stages == [CascadeStage(64, 1000), CascadeStage(256, 100), CascadeStage(768, 20)]
    check_levels(stages, [64, 256, 768])
    assert RetrievalConfig(cascade=[]).cascade == []
    bad = [
        ([{"dim": 64}], "keys"),
        ([{"dim": 64, "keep": 0}], "positive"),
        ([{"dim": 256, "keep": 100}, {"dim": 64, "keep": 10}], "increasing"),
        ([{"dim": 64, "keep": 10}, {"dim": 256, "keep": 100}], "keep more"),
        ([{"dim": 128, "keep": 100}], "not levels"),
        ([{"dim": 64, "keep": 10}], "top_k"),
    ]
    for spec, words in bad:
        with pytest.raises(ConfigError, match=words) as err:
            check_levels(RetrievalConfig(cascade=spec, top_k=20).cascade, [64, 256, 768])
        assert "retrieval.cascade" in str(err.value)


def write_shards(tmp_path, corpus: np.ndarray, shard_size: int, ranks: int = 3) -> list:
    """Shards as inference's ranks write them: each rank a strided share, in scrambled order."""
    order = np.random.default_rng(5).permutation(corpus.shape[0])
    manifests = []
    for rank in range(ranks):
        writer = EmbeddingShardWriter(tmp_path, f"img-r{rank}", corpus.shape[1], shard_size)
        mine = order[rank::ranks]
        for start in range(0, mine.size, 7):
            writer.add(mine[start : start + 7], corpus[mine[start : start + 7]])
        manifests.append(writer.close())
    return manifests


def test_shard_sample_equals_the_in_memory_sample(tmp_path):
    corpus, _ = prefix_data(1000, 1)
    manifests = write_shards(tmp_path, corpus, shard_size=40)
    rows = train_sample_rows(1000, train_size=300, seed=3)
    assert rows.shape == (300,) and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(sample_from_shards(manifests, rows), corpus[rows])


def test_shard_built_flat_index_equals_in_memory_build(tmp_path):
    corpus, queries = prefix_data(1000, 12)
    manifests = write_shards(tmp_path, corpus, shard_size=40)  # 40 rows << 1,000
    built = index_shards(FlatIndex(32, use_gpu=False), manifests, 1000)
    memory = index_embeddings(FlatIndex(32, use_gpu=False), corpus)
    np.testing.assert_array_equal(built.vectors(), memory.vectors())
    np.testing.assert_array_equal(built.vectors(), corpus)
    _, i = built.search(queries, 10)
    np.testing.assert_array_equal(i, brute_topk(queries, corpus, 10)[1])


def test_shard_built_ivfpq_equals_in_memory_build(tmp_path):
    corpus, queries = prefix_data(3000, 30)
    manifests = write_shards(tmp_path, corpus, shard_size=50)
    params = {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 4, "use_gpu": False}
    built = index_shards(build_index("ivfpq", 32, **params), manifests, 3000, train_size=1500, seed=1)
    memory = index_embeddings(build_index("ivfpq", 32, **params), corpus, batch_size=333, train_size=1500, seed=1)
    assert built.ntotal == memory.ntotal == 3000
    s_b, i_b = built.search(queries, 20)
    s_m, i_m = memory.search(queries, 20)
    # Same quantiser and codes: the same scores; rows of equal score may be listed in any order.
    np.testing.assert_array_equal(s_b, s_m)
    for row in range(30):
        assert sorted(zip(-s_b[row], i_b[row])) == sorted(zip(-s_m[row], i_m[row]))


def test_shard_build_refuses_graph_indexes_and_missing_rows(tmp_path):
    corpus, _ = prefix_data(100, 1)
    manifests = write_shards(tmp_path, corpus, shard_size=30)
    with pytest.raises(ValueError, match="cannot be built from shards"):
        index_shards(build_index("hnsw", 32, m=8), manifests, 100)
    with pytest.raises(ValueError, match="in no shard"):
        index_shards(FlatIndex(32, use_gpu=False), manifests, 101)


# ---------------------------------------------------------------- inference.py with a hierarchical model


def brute_cascade(q_levels, c_levels, keeps) -> list[np.ndarray]:
    """Per stage the kept rows of a float64 cascade (equal scores by row)."""
    s = q_levels[0].astype(np.float64) @ c_levels[0].T.astype(np.float64)
    kept = [np.argsort(-s, axis=1, kind="stable")[:, : keeps[0]]]
    for q, c, keep in zip(q_levels[1:], c_levels[1:], keeps[1:]):
        prev = kept[-1]
        scores = np.einsum("qd,qkd->qk", q.astype(np.float64), c[prev].astype(np.float64))
        order = np.lexsort((prev, -scores), axis=1)[:, :keep]
        kept.append(np.take_along_axis(prev, order, 1))
    return kept


@pytest.fixture(scope="module")
def hier_run(workspace, tmp_path_factory):
    """inference.py on a tiny prefix-hierarchy checkpoint with a three-stage cascade."""
    root = tmp_path_factory.mktemp("hier")
    torch.manual_seed(3)
    model = build_biencoder(str(workspace.txt_config), str(workspace.img_config), project_dim=PROJECT_DIM,
                            hierarchy={"mode": "prefix", "dims": [4, 8, PROJECT_DIM]})
    randomize_(model, seed=3)  # distinct embeddings, so every query ranks differently
    ckpt = root / "hier.pt"
    save_checkpoint(model, ckpt, run_config={})
    config = yaml.safe_load(workspace.config.read_text())
    # 12 images: the stages keep every image for text queries, not every caption.
    config["retrieval"]["cascade"] = [{"dim": 4, "keep": 12}, {"dim": 8, "keep": 12}, {"dim": PROJECT_DIM, "keep": 10}]
    cfg_path = root / "cascade.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = root / "retrieval"
    inference.main(["--config", str(cfg_path), "--checkpoint", str(ckpt), "--output_dir", str(out)])
    return {"out": out, "config": cfg_path, "ckpt": ckpt}


def read(out, name):
    return np.load(out / name) if name.endswith(".npy") else json.loads((out / name).read_text())


def test_inference_writes_levels_and_cascade(workspace, hier_run):
    out = hier_run["out"]
    names = {p.name for p in out.iterdir()}
    for side in ("img", "txt"):
        assert {f"{side}_emb.npy", f"{side}_emb.d4.npy", f"{side}_emb.d8.npy", f"{side}.index", f"{side}.d4.index",
                f"{side}.d8.index"} <= names
    assert "shards" not in names
    img, txt = read(out, "img_emb.npy"), read(out, "txt_emb.npy")
    # Prefix mode: a level is the first dims of the full embedding.
    for d in (4, 8):
        np.testing.assert_array_equal(read(out, f"img_emb.d{d}.npy"), img[:, :d])
        np.testing.assert_array_equal(read(out, f"txt_emb.d{d}.npy"), txt[:, :d])
    ids = read(out, "ids.json")
    txt2img_raw = json.loads((Path(workspace.data["txt_db"]["test"]) / "txt2img.json").read_text())
    gt = [ids["img_ids"].index(txt2img_raw[t]) for t in ids["txt_ids"]]
    recall = read(out, "recall.json")
    # Top level: exact full-embedding recall, as without a cascade.
    full_ref = brute_force_recall((txt.astype(np.float64) @ img.T.astype(np.float64)).tolist(), gt, 12)
    assert recall["rsum"] == pytest.approx(full_ref["rsum"])
    assert set(recall["levels"]) == {"4", "8", str(PROJECT_DIM)}
    for d in (4, 8, PROJECT_DIM):
        ref = brute_force_recall((txt[:, :d].astype(np.float64) @ img[:, :d].T.astype(np.float64)).tolist(), gt, 12)
        for direction in ("text_to_image", "image_to_text"):
            for k in ("R@1", "R@5", "R@10"):
                assert recall["levels"][str(d)][direction][k] == pytest.approx(ref[direction][k])
        assert recall["levels"][str(d)]["seconds"] >= 0

    keeps = [12, 12, 10]
    levels_of = lambda x: [x[:, :4], x[:, :8], x]
    t2i = brute_cascade(levels_of(txt), levels_of(img), keeps)
    i2t = brute_cascade(levels_of(img), levels_of(txt), keeps)
    stages = recall["cascade"]["stages"]
    assert [(s["dim"], s["keep"]) for s in stages] == [(4, 12), (8, 12), (PROJECT_DIM, 10)]
    for stage, a, b in zip(stages, t2i, i2t):
        # Stage recall from its kept lists: a positive outside the list is a miss.
        for direction, kept, n_q in (("text_to_image", a, len(gt)), ("image_to_text", b, 12)):
            for k in (1, 5, 10):
                if direction == "text_to_image":
                    hits = [gt[q] in kept[q][:k] for q in range(n_q)]
                else:
                    hits = [any(gt[c] == q for c in kept[q][:k]) for q in range(n_q)]
                assert stage["recall"][direction][f"R@{k}"] == pytest.approx(100 * np.mean(hits))
        assert stage["seconds"] >= 0
    # topk.json holds the last stage's lists; text queries kept every image, so theirs is exact.
    topk = read(out, "topk.json")
    for q, row in enumerate(topk["text_to_image"].values()):
        assert [ids["img_ids"].index(c) for c, _ in row] == t2i[-1][q].tolist()
    exact = np.argsort(-(txt.astype(np.float64) @ img.T.astype(np.float64)), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(t2i[-1], exact)
    for q, row in enumerate(topk["image_to_text"].values()):
        assert [ids["txt_ids"].index(c) for c, _ in row] == i2t[-1][q].tolist()
        np.testing.assert_allclose([s for _, s in row], txt[i2t[-1][q]] @ img[q], rtol=1e-5, atol=1e-6)
    info = read(out, "info.json")
    assert info["level_dims"] == [4, 8, PROJECT_DIM]
    assert info["cascade"] == [{"dim": 4, "keep": 12}, {"dim": 8, "keep": 12}, {"dim": PROJECT_DIM, "keep": 10}]
    timing = info["timing"]
    assert {"cascade_stage1_d4_s", "cascade_stage2_d8_s", f"cascade_stage3_d{PROJECT_DIM}_s", "cascade_s"} <= set(timing)


def test_rerank_reads_a_cascade_retrieval_dir(workspace, hier_run, tmp_path):
    result = rerank.main(["--config", str(hier_run["config"]), "--retrieval_dir", str(hier_run["out"]),
                          "--reranker_checkpoint", str(workspace.our_cross_ckpt), "--output_dir", str(tmp_path),
                          "--top_m", "3"])
    saved = json.loads((tmp_path / "rerank.json").read_text())
    # "before" is the recall of the cascade's lists (the third stage's), re-ranking the fourth.
    stage3 = read(hier_run["out"], "recall.json")["cascade"]["stages"][-1]["recall"]
    for direction in ("text_to_image", "image_to_text"):
        assert saved["before"][direction]["R@1"] == pytest.approx(stage3[direction]["R@1"])
    scores = json.loads((tmp_path / "rerank_scores.json").read_text())
    assert all(len(rows) == 3 for rows in scores["text_to_image"].values())
    assert result["top_m"] == 3


@pytest.mark.parametrize("cascade, words", [
    ([{"dim": 5, "keep": 10}, {"dim": 16, "keep": 10}], r"dims \[5\] are not levels"),
    ([{"dim": 4, "keep": 12}, {"dim": 16, "keep": 5}], "below retrieval.top_k"),
])
def test_inference_refuses_a_cascade_that_does_not_fit(hier_run, tmp_path, cascade, words):
    config = yaml.safe_load(hier_run["config"].read_text())
    config["retrieval"]["cascade"] = cascade
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=words):
        inference.main(["--config", str(path), "--checkpoint", str(hier_run["ckpt"]), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_inference_heads_model_with_ivfpq_first_stage(workspace, tmp_path):
    """Heads mode, IVF-PQ built from the shards: the first stage is that index's search."""
    torch.manual_seed(4)
    model = build_biencoder(str(workspace.txt_config), str(workspace.img_config), project_dim=PROJECT_DIM,
                            hierarchy={"mode": "heads", "dims": [4, PROJECT_DIM]})
    randomize_(model, seed=4)
    ckpt = tmp_path / "heads.pt"
    save_checkpoint(model, ckpt, run_config={})
    config = yaml.safe_load(workspace.config.read_text())
    config["retrieval"]["index"] = {"type": "ivfpq", "nlist": 2, "m": 2, "nbits": 3, "nprobe": 2, "use_gpu": False}
    config["retrieval"]["cascade"] = [{"dim": 4, "keep": 30}, {"dim": PROJECT_DIM, "keep": 10}]
    config["retrieval"]["index_train_size"] = 50
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    inference.main(["--config", str(path), "--checkpoint", str(ckpt), "--output_dir", str(out), "--shard_size", "7"])
    txt4, img4 = read(out, "txt_emb.d4.npy"), read(out, "img_emb.d4.npy")
    txt, img = read(out, "txt_emb.npy"), read(out, "img_emb.npy")
    assert txt4.shape == (60, 4) and img4.shape == (12, 4)
    # Heads mode: the small level is its own vector, not a prefix of the full one.
    assert not np.allclose(txt4, txt[:, :4])
    # The index written from 7-row shards equals one built from the merged array (same sample).
    params = {k: v for k, v in config["retrieval"]["index"].items() if k != "type"}
    for side, emb in (("txt", txt4), ("img", img4)):
        memory = index_embeddings(build_index("ivfpq", 4, **params), emb, train_size=50)
        written = load_index(out / f"{side}.d4.index", use_gpu=False)
        s_w, i_w = written.search(img4 if side == "txt" else txt4, 30)
        s_m, i_m = memory.search(img4 if side == "txt" else txt4, 30)
        np.testing.assert_array_equal(s_w, s_m)
        for row in range(s_w.shape[0]):
            # 3-bit codes give equal scores; which rows tied with the last one make the cut is free.
            above_w, above_m = s_w[row] > s_w[row][-1], s_m[row] > s_m[row][-1]
            assert sorted(zip(-s_w[row][above_w], i_w[row][above_w])) == sorted(zip(-s_m[row][above_m], i_m[row][above_m]))
    # Final lists: the stage-1 candidates of the caption index, re-scored at the full level.
    ids = read(out, "ids.json")
    _, cand = load_index(out / "txt.d4.index", use_gpu=False).search(img4, 30)
    for q, row in enumerate(read(out, "topk.json")["image_to_text"].values()):
        valid = cand[q][cand[q] >= 0]
        full = txt[valid].astype(np.float64) @ img[q].astype(np.float64)
        want = valid[np.lexsort((valid, -full))][:10]
        assert [ids["txt_ids"].index(c) for c, _ in row] == want.tolist()
    assert read(out, "info.json")["index_type"] == "ivfpq" and "shards" not in {p.name for p in out.iterdir()}
