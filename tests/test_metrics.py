"""Recall (SPEC 7) against an independent brute-force reference written as plain loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import assert_same, brute_force_recall
from utils.search.metrics import (
    NO_POSITIVE,
    NOT_FOUND,
    candidate_rank,
    fold_image_ranges,
    fold_recall_from_embeddings,
    fold_recall_from_scores,
    image_to_text_ranks,
    ranks_from_embeddings,
    recall_from_candidates,
    recall_from_embeddings,
    recall_from_scores,
    text_to_image_ranks,
)


def random_split(rng: np.random.Generator, n_img: int, max_caps: int = 5) -> np.ndarray:
    """Caption -> image map with 1..max_caps captions per image, captions shuffled."""
    counts = rng.integers(1, max_caps + 1, size=n_img)
    txt2img = np.repeat(np.arange(n_img), counts)
    return rng.permutation(txt2img)


def test_hand_worked_case():
    # Images A, B, C; captions 0, 1 -> A, 2 -> B, 3 -> C.
    scores = np.array(
        [
            [0.9, 0.5, 0.1],  # A first: rank 0
            [0.2, 0.8, 0.2],  # B above A: rank 1
            [0.5, 0.5, 0.7],  # C above B; A ties B and does not count: rank 1
            [0.3, 0.3, 0.3],  # all tied: rank 0
        ],
        dtype=np.float32,
    )
    txt2img = [0, 0, 1, 2]
    assert text_to_image_ranks(scores, txt2img).tolist() == [0, 1, 1, 0]
    # A: best positive 0.9, nothing above. B: caption 1 (0.8) above 0.5. C: caption 2 above.
    assert image_to_text_ranks(scores, txt2img).tolist() == [0, 1, 1]
    got = recall_from_scores(scores, txt2img)
    assert got["text_to_image"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0}
    assert got["image_to_text"]["R@1"] == pytest.approx(100.0 / 3)
    assert got["image_to_text"]["R@5"] == 100.0
    assert got["rsum"] == pytest.approx(50 + 100 + 100 + 100 / 3 + 100 + 100)
    assert got["ar"] == pytest.approx(got["rsum"] / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_scores_match_brute_force(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    n_img = 23
    txt2img = random_split(rng, n_img)
    if ties:
        # Few distinct values: many exact ties, including with the positive.
        scores = rng.integers(0, 4, size=(len(txt2img), n_img)).astype(np.float32)
    else:
        scores = rng.standard_normal((len(txt2img), n_img)).astype(np.float32)
    ref = brute_force_recall(scores.tolist(), txt2img.tolist(), n_img)
    # Tiny blocks force many chunks in both directions.
    assert_same(recall_from_scores(scores, txt2img, block_elements=37), ref)
    assert_same(recall_from_scores(torch.from_numpy(scores), txt2img, block_elements=100), ref)
    assert_same(recall_from_scores(scores, txt2img), ref)


@pytest.mark.parametrize("seed", [3, 4])
def test_embeddings_match_brute_force_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    n_img = 17
    txt2img = random_split(rng, n_img)
    # Small integer embeddings: dot products are exact in fp32, so ties are real ties.
    img = rng.integers(-1, 2, size=(n_img, 4)).astype(np.float32)
    txt = rng.integers(-1, 2, size=(len(txt2img), 4)).astype(np.float32)
    scores = txt @ img.T
    ref = brute_force_recall(scores.tolist(), txt2img.tolist(), n_img)
    assert_same(recall_from_embeddings(txt, img, txt2img, block_elements=50), ref)
    assert_same(recall_from_embeddings(torch.from_numpy(txt), torch.from_numpy(img), txt2img), ref)
    ir, tr = ranks_from_embeddings(txt, img, txt2img, block_elements=19)
    assert ir.tolist() == text_to_image_ranks(scores, txt2img).tolist()
    assert tr.tolist() == image_to_text_ranks(scores, txt2img).tolist()


def test_never_exceeds_100_and_image_without_caption_is_skipped():
    # Every score equal: every query ranks first under the strict rule.
    txt2img = [0, 0, 2, 2, 2]  # image 1 has no caption (all filtered by max_txt_len)
    scores = np.zeros((5, 3), dtype=np.float32)
    tr = image_to_text_ranks(scores, txt2img)
    assert tr.tolist() == [0, NO_POSITIVE, 0]
    got = recall_from_scores(scores, txt2img)
    for direction in ("text_to_image", "image_to_text"):
        assert all(v == 100.0 for v in got[direction].values())
    assert got["rsum"] == 600.0


def test_bad_txt2img_is_refused():
    with pytest.raises(ValueError, match="image indices"):
        recall_from_scores(np.zeros((2, 2), np.float32), [0, 5])
    with pytest.raises(ValueError, match="entries"):
        recall_from_scores(np.zeros((3, 2), np.float32), [0, 1])


class RecordingMatrix:
    """A score matrix that records how much of itself each read touches."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.shape = data.shape
        self.largest = 0

    def __getitem__(self, key):
        block = self.data[key]
        self.largest = max(self.largest, block.size)
        return block


def test_reads_are_bounded_by_the_block_size():
    rng = np.random.default_rng(5)
    txt2img = random_split(rng, 40)
    scores = rng.standard_normal((len(txt2img), 40)).astype(np.float32)
    recorder = RecordingMatrix(scores)
    got = recall_from_scores(recorder, txt2img, block_elements=200)
    assert recorder.largest <= 200 + max(scores.shape)
    assert_same(got, recall_from_scores(scores, txt2img))


def test_candidate_rank_rules():
    assert candidate_rank([4, 7, 9], [0.5, 0.9, 0.5], {9}) == 1  # tie with 4 does not count
    assert candidate_rank([4, 7, 9], [0.5, 0.9, 0.5], {7, 9}) == 0  # best positive counts
    assert candidate_rank([4, 7], [0.5, 0.9], {3}) == NOT_FOUND
    assert candidate_rank([4, 7], [0.5, 0.9], set()) == NO_POSITIVE


def _topm_lists(scores: np.ndarray, m: int) -> tuple[list, list]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :m]
    return order.tolist(), np.take_along_axis(scores, order, 1).tolist()


@pytest.mark.parametrize("ties", [False, True])
def test_candidates_with_full_lists_match_full_matrix(ties: bool):
    rng = np.random.default_rng(6)
    n_img = 19
    txt2img = random_split(rng, n_img)
    if ties:
        scores = rng.integers(0, 3, size=(len(txt2img), n_img)).astype(np.float32)
    else:
        scores = rng.standard_normal((len(txt2img), n_img)).astype(np.float32)
    t2i_c, t2i_s = _topm_lists(scores, n_img)
    i2t_c, i2t_s = _topm_lists(scores.T.copy(), len(txt2img))
    got = recall_from_candidates(t2i_c, t2i_s, i2t_c, i2t_s, txt2img)
    assert_same(got, brute_force_recall(scores.tolist(), txt2img.tolist(), n_img))


def test_candidates_top_m_equal_full_recall_for_k_up_to_m():
    rng = np.random.default_rng(7)
    n_img = 30
    txt2img = random_split(rng, n_img)
    scores = rng.standard_normal((len(txt2img), n_img)).astype(np.float32)
    t2i_c, t2i_s = _topm_lists(scores, 10)
    i2t_c, i2t_s = _topm_lists(scores.T.copy(), 10)
    got = recall_from_candidates(t2i_c, t2i_s, i2t_c, i2t_s, txt2img)
    assert_same(got, recall_from_scores(scores, txt2img))
    # The list order does not matter: ranks come from the scores.
    shuffled = [rng.permutation(len(c)) for c in t2i_c]
    t2i_c2 = [[c[j] for j in p] for c, p in zip(t2i_c, shuffled)]
    t2i_s2 = [[s[j] for j in p] for s, p in zip(t2i_s, shuffled)]
    assert_same(recall_from_candidates(t2i_c2, t2i_s2, i2t_c, i2t_s, txt2img), got)


def test_fold_ranges_and_fold_recall_match_brute_force():
    assert fold_image_ranges(5000, 5) == [(i * 1000, (i + 1) * 1000) for i in range(5)]
    rng = np.random.default_rng(8)
    n_img = 20
    txt2img = random_split(rng, n_img)
    txt = rng.standard_normal((len(txt2img), 8)).astype(np.float32)
    img = rng.standard_normal((n_img, 8)).astype(np.float32)
    scores = txt @ img.T
    folds = []
    for start in range(0, n_img, 4):
        rows = [t for t in range(len(txt2img)) if start <= txt2img[t] < start + 4]
        sub = [[scores[t][j] for j in range(start, start + 4)] for t in rows]
        folds.append(brute_force_recall(sub, [int(txt2img[t]) - start for t in rows], 4))
    ref = {
        d: {k: float(np.mean([f[d][k] for f in folds])) for k in folds[0][d]}
        for d in ("text_to_image", "image_to_text")
    }
    ref["rsum"] = float(np.mean([f["rsum"] for f in folds]))
    ref["ar"] = ref["rsum"] / 6
    assert_same(fold_recall_from_embeddings(txt, img, txt2img, n_folds=5), ref)
    assert_same(fold_recall_from_scores(scores, txt2img, n_folds=5), ref)
