"""Losses against hand computations; the gathered contrastive loss on two gloo processes."""
from __future__ import annotations

import math
import os

import pytest
import torch

from model.losses import contrastive_loss, hinge_ranking_loss, softmax_ranking_loss
from tests.helpers import spawn_gloo
from utils.pipeline.pretrain_tasks.smrm import mrckl_loss, mrfr_loss
from utils.pipeline.pretrain_tasks.vmlm import mlm_loss

# S = TXT @ IMG.T = [[1, 0, 1], [0, 2, -1], [1, 2, 0]]
TXT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
IMG = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
e = math.exp


def nll(target_score: float, row: list[float]) -> float:
    return -math.log(e(target_score) / sum(e(s) for s in row))


def test_contrastive_hand_computed() -> None:
    t2i = (nll(1, [1, 0, 1]) + nll(2, [0, 2, -1]) + nll(0, [1, 2, 0])) / 3
    i2t = (nll(1, [1, 0, 1]) + nll(2, [0, 2, 2]) + nll(0, [1, -1, 0])) / 3
    out = contrastive_loss(TXT, IMG)
    assert out.loss.item() == pytest.approx(0.5 * t2i + 0.5 * i2t, abs=1e-6)
    assert out.loss_t2i.item() == pytest.approx(t2i, abs=1e-6)
    assert out.n_pos == 3
    # t2i argmax per row: 0 (tie 0/2 -> first), 1, 1 -> 2 correct; i2t: 0, 1 (tie 1/2), 0 -> 2.
    assert out.n_correct_t2i.item() == 2 and out.n_correct_i2t.item() == 2


def test_contrastive_duplicates_masked() -> None:
    keys = torch.tensor([10, 20, 10])  # image rows 0 and 2 are the same image
    t2i = (nll(1, [1, 0]) + nll(2, [0, 2, -1]) + nll(0, [2, 0])) / 3
    i2t = (nll(1, [1, 0]) + nll(2, [0, 2, 2]) + nll(0, [-1, 0])) / 3
    out = contrastive_loss(TXT, IMG, txt_img_keys=keys, img_keys=keys)
    assert out.loss.item() == pytest.approx(0.5 * t2i + 0.5 * i2t, abs=1e-6)
    unmasked = contrastive_loss(TXT, IMG, txt_img_keys=keys, img_keys=keys, mask_duplicates=False)
    assert unmasked.loss.item() == pytest.approx(contrastive_loss(TXT, IMG).loss.item(), abs=1e-7)


def test_contrastive_hard_negatives_only_add_columns() -> None:
    # Rows 0-1 are the pairs; text row 2 and image row 2 are hard negatives.
    t2i = (nll(1, [1, 0, 1]) + nll(2, [0, 2, -1])) / 2
    i2t = (nll(1, [1, 0, 1]) + nll(2, [0, 2, 2])) / 2
    out = contrastive_loss(TXT, IMG, num_pos=2)
    assert out.loss.item() == pytest.approx(0.5 * t2i + 0.5 * i2t, abs=1e-6)
    # Uneven sides: one extra image only.
    out = contrastive_loss(TXT[:2], IMG, num_pos=2)
    i2t_short = (nll(1, [1, 0]) + nll(2, [0, 2])) / 2
    assert out.loss.item() == pytest.approx(0.5 * t2i + 0.5 * i2t_short, abs=1e-6)
    with pytest.raises(ValueError, match="num_pos"):
        contrastive_loss(TXT[:2], IMG)


def test_contrastive_gradient_ignores_masked_columns() -> None:
    txt = TXT.clone().requires_grad_(True)
    img = IMG.clone().requires_grad_(True)
    keys = torch.tensor([10, 20, 10])
    contrastive_loss(txt, img, txt_img_keys=keys, img_keys=keys).loss.backward()
    assert torch.isfinite(txt.grad).all() and torch.isfinite(img.grad).all()


# ------------------------------------------------------------------ two processes

DIM = 6
# rank -> (positives, text hard negatives, image hard negatives, positive image keys)
SHARDS = {0: (3, 0, 2, [1, 2, 3]), 1: (2, 0, 1, [4, 1])}


def shard_tensors(rank: int) -> dict[str, torch.Tensor]:
    n_pos, n_txt_neg, n_img_neg, keys = SHARDS[rank]
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        "txt_pos": torch.randn(n_pos, DIM, generator=gen),
        "txt_neg": torch.randn(n_txt_neg, DIM, generator=gen),
        "img_pos": torch.randn(n_pos, DIM, generator=gen),
        "img_neg": torch.randn(n_img_neg, DIM, generator=gen),
        "txt_keys_pos": torch.tensor(keys),
        "txt_keys_neg": torch.arange(n_txt_neg) + 50 + 10 * rank,
        "img_keys_pos": torch.tensor(keys),
        "img_keys_neg": torch.arange(n_img_neg) + 70 + 10 * rank,
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        s = shard_tensors(rank)
        txt = torch.cat([s["txt_pos"], s["txt_neg"]]).requires_grad_(True)
        img = torch.cat([s["img_pos"], s["img_neg"]]).requires_grad_(True)
        out = contrastive_loss(
            txt,
            img,
            num_pos=s["txt_pos"].shape[0],
            txt_img_keys=torch.cat([s["txt_keys_pos"], s["txt_keys_neg"]]),
            img_keys=torch.cat([s["img_keys_pos"], s["img_keys_neg"]]),
        )
        out.loss.backward()
        torch.save(
            {"loss": out.loss.detach(), "txt_grad": txt.grad, "img_grad": img.grad, "n_pos": out.n_pos},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_loss_equals_single_process_loss(tmp_path) -> None:
    world = 2
    spawn_gloo(_worker, world, tmp_path)

    shards = [shard_tensors(r) for r in range(world)]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([s[f"{name}_pos"] for s in shards] + [s[f"{name}_neg"] for s in shards])

    txt = cat("txt").requires_grad_(True)
    img = cat("img").requires_grad_(True)
    n_pos = sum(s["txt_pos"].shape[0] for s in shards)
    single = contrastive_loss(
        txt, img, num_pos=n_pos, txt_img_keys=cat("txt_keys"), img_keys=cat("img_keys"), gather=False
    )
    single.loss.backward()
    # Key 1 appears on both ranks: masking must act on the global batch.
    assert single.loss.item() != pytest.approx(
        contrastive_loss(txt, img, num_pos=n_pos, gather=False).loss.item()
    )

    pos_start, txt_neg_start, img_neg_start = 0, n_pos, n_pos
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        n, n_txt_neg, n_img_neg, _ = SHARDS[rank]
        assert got["n_pos"] == n_pos
        torch.testing.assert_close(got["loss"], single.loss.detach(), atol=1e-6, rtol=0)
        # The gather's backward sums the ranks' (identical) gradients; DDP then averages.
        want_txt = torch.cat(
            [txt.grad[pos_start : pos_start + n], txt.grad[txt_neg_start : txt_neg_start + n_txt_neg]]
        )
        want_img = torch.cat(
            [img.grad[pos_start : pos_start + n], img.grad[img_neg_start : img_neg_start + n_img_neg]]
        )
        torch.testing.assert_close(got["txt_grad"] / world, want_txt, atol=1e-6, rtol=0)
        torch.testing.assert_close(got["img_grad"] / world, want_img, atol=1e-6, rtol=0)
        pos_start += n
        txt_neg_start += n_txt_neg
        img_neg_start += n_img_neg


# ------------------------------------------------------------------ other losses


def test_mlm_loss_manual() -> None:
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 10, 5])
    want = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    torch.testing.assert_close(mlm_loss(logits, labels), want)
    padded = torch.tensor([3, -100, 0, 10, 5])
    torch.testing.assert_close(mlm_loss(torch.cat([logits[:1], logits[:1], logits[1:]]), padded), want)


def test_mrfr_loss_manual() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 2048, generator=gen), torch.randn(3, 2048, generator=gen)
    torch.testing.assert_close(mrfr_loss(pred, target), ((pred - target) ** 2).sum() / pred.numel())


def test_mrckl_loss_manual() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1601, generator=gen)
    soft = torch.rand(3, 1601, generator=gen)
    soft[:, ::3] = 0.0  # zero targets contribute nothing
    soft = soft / soft.sum(-1, keepdim=True)
    log_q = logits - torch.logsumexp(logits, -1, keepdim=True)
    terms = torch.where(soft > 0, soft * (torch.log(soft.clamp_min(1e-30)) - log_q), torch.zeros(()))
    torch.testing.assert_close(mrckl_loss(logits, soft), terms.sum() / (3 * 1601))


def test_ranking_losses_manual() -> None:
    scores = torch.tensor([2.0, 1.0, 2.5, -1.0, 0.0, 0.5])  # two groups of 1 + 2
    sig = torch.sigmoid(scores).tolist()
    hinge = [max(0.0, 0.2 + sig[1] - sig[0]), max(0.0, 0.2 + sig[2] - sig[0]),
             max(0.0, 0.2 + sig[4] - sig[3]), max(0.0, 0.2 + sig[5] - sig[3])]
    assert hinge_ranking_loss(scores, 3, margin=0.2).item() == pytest.approx(sum(hinge) / 4, abs=1e-6)
    raw = [max(0.0, 0.2 + 1.0 - 2.0), max(0.0, 0.2 + 2.5 - 2.0), max(0.0, 0.2 + 0.0 + 1.0), max(0.0, 0.2 + 0.5 + 1.0)]
    assert hinge_ranking_loss(scores, 3, 0.2, sigmoid=False).item() == pytest.approx(sum(raw) / 4, abs=1e-6)
    ce = (nll(2.0, [2.0, 1.0, 2.5]) + nll(-1.0, [-1.0, 0.0, 0.5])) / 2
    assert softmax_ranking_loss(scores, 3).item() == pytest.approx(ce, abs=1e-6)
    with pytest.raises(ValueError, match="groups"):
        softmax_ranking_loss(scores, 4)
