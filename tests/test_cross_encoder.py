"""UNITER cross-encoder: score against an independent computation, padding, training."""
from __future__ import annotations

import pytest
import torch

from model.cross_encoder import CrossEncoderConfig, UniterCrossEncoder
from tests import helpers as ref
from tests.helpers import TINY_BERT

V = TINY_BERT["vocab_size"]


def tiny_cross(rank_loss: str = "hinge", seed: int = 0) -> UniterCrossEncoder:
    model = UniterCrossEncoder(CrossEncoderConfig(dict(TINY_BERT), rank_loss=rank_loss))
    ref.randomize_(model, seed)
    model.tie_rank_output()
    return model.eval()


def pairs(n: int = 3, seed: int = 0):
    ids, mask = ref.random_text(n, [4, 2, 6][:n], V, seed=seed)
    feat, pos, img_mask = ref.random_boxes(n, [3, 5, 2][:n], seed=seed + 1)
    return ids, mask, feat, pos, img_mask


def test_score_matches_reference() -> None:
    model = tiny_cross()
    ids, mask, feat, pos, img_mask = pairs()
    with torch.no_grad():
        got = model.score(ids, mask, feat, pos, img_mask)
        want = ref.uniter_score(ids, mask, feat, pos, img_mask, model.state_dict(), TINY_BERT)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_padding_between_text_and_image_does_not_matter() -> None:
    model = tiny_cross()
    ids, mask, feat, pos, img_mask = pairs()
    wide_ids, wide_mask = ref.random_text(3, [4, 2, 6], V, seed=0, pad_to=14)
    wide_ids[wide_mask == 0] = 9
    wide_feat, wide_pos, wide_img_mask = ref.random_boxes(3, [3, 5, 2], seed=7, pad_to=8)
    wide_feat[:, :5], wide_pos[:, :5] = feat, pos
    with torch.no_grad():
        torch.testing.assert_close(
            model.score(ids, mask, feat, pos, img_mask),
            model.score(wide_ids, wide_mask, wide_feat, wide_pos, wide_img_mask),
            atol=1e-5,
            rtol=0,
        )


def test_rank_output_is_row_1_of_itm_output() -> None:
    model = tiny_cross()
    with torch.no_grad():
        model.itm_output.weight[1].add_(0.5)
        model.rank_output.weight.zero_()
    model.tie_rank_output()
    torch.testing.assert_close(model.rank_output.weight[0], model.itm_output.weight[1])
    torch.testing.assert_close(model.rank_output.bias[0], model.itm_output.bias[1])
    assert not model.rank_output.weight.requires_grad


def test_score_batched_pairs_one_query_with_many_candidates() -> None:
    model = tiny_cross()
    ids, mask, feat, pos, img_mask = pairs()
    with torch.no_grad():
        want = model.score(ids[:1].expand(3, -1), mask[:1].expand(3, -1), feat, pos, img_mask)
    got = model.score_batched(ids[:1], mask[:1], feat, pos, img_mask, batch_size=2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot pair"):
        model.score_batched(ids[:2], mask[:2], feat, pos, img_mask)


@pytest.mark.parametrize("rank_loss", ["hinge", "softmax"])
def test_training_step_on_groups(rank_loss: str) -> None:
    model = tiny_cross(rank_loss).train()
    ids, mask = ref.random_text(4, [3, 4, 2, 5], V, seed=2)
    feat, pos, img_mask = ref.random_boxes(4, [2, 3, 4, 2], seed=3)
    batch = {
        "txt": {"input_ids": ids, "attention_mask": mask},
        "img": {"img_feat": feat, "img_pos": pos, "img_mask": img_mask},
        "group_size": 2,
    }
    out = model(batch)
    s = out["scores"].detach()
    if rank_loss == "hinge":
        sig = torch.sigmoid(s).view(2, 2)
        want = torch.clamp(0.2 + sig[:, 1] - sig[:, 0], min=0).mean()
    else:
        want = torch.nn.functional.cross_entropy(s.view(2, 2), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out["loss"].detach(), want, atol=1e-6, rtol=0)
    out["loss"].backward()
    grad = model.itm_output.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0
    assert model.rank_output.weight.grad is None
