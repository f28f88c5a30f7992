"""The shared losses: contrastive (CMR and fine-tuning of every family) and ranking (cross-encoder).

The pre-training tasks' own losses (VMLM, MRFR, MRC-kl) live with their tasks
(`utils/pipeline/pretrain_tasks/`).

The contrastive loss gathers embeddings from all ranks with gradient, so negatives are global
under DDP / Horovod (the original only used local negatives when fine-tuning on many GPUs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from utils.distributed import all_gather_with_grad


@dataclass
class ContrastiveOutput:
    """Result of `contrastive_loss`; counts are over the global positives."""

    loss: torch.Tensor
    loss_t2i: torch.Tensor
    loss_i2t: torch.Tensor
    n_correct_t2i: torch.Tensor
    n_correct_i2t: torch.Tensor
    n_pos: int


def _gather_pos_neg(x: torch.Tensor, num_pos: int) -> tuple[torch.Tensor, int]:
    """Gather positives and hard negatives separately; return [all positives; all negatives].

    Separate gathers keep global rows 0..P-1 the positive pairs of every rank, in rank order,
    on both sides. Every rank calls both gathers (even with no negatives) so the collectives
    stay matched.
    """
    pos = all_gather_with_grad(x[:num_pos])
    neg = all_gather_with_grad(x[num_pos:])
    return torch.cat([pos, neg], dim=0), pos.shape[0]


def contrastive_loss(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    num_pos: int | None = None,
    txt_img_keys: torch.Tensor | None = None,
    img_keys: torch.Tensor | None = None,
    mask_duplicates: bool = True,
    gather: bool = True,
    temperature: float = 1.0,
) -> ContrastiveOutput:
    """In-batch bidirectional contrastive loss (SPEC 5 CMR, SPEC 6).

    With S = txt @ img.T over the (gathered) batch, rows 0..P-1 of both sides are the
    positive pairs: loss = 0.5 * CE(rows of S[:P], diagonal) + 0.5 * CE(rows of S.T[:P],
    diagonal). Rows beyond P (hard negatives, either side) only add negative columns.

    Args:
        txt_emb: (T, D) text embeddings, rows 0..num_pos-1 paired with image rows 0..num_pos-1.
        img_emb: (I, D) image embeddings.
        num_pos: number of positive pairs; None means all rows (T must equal I).
        txt_img_keys: (T,) int64 image key of each caption's image.
        img_keys: (I,) int64 image key of each image.
        mask_duplicates: with keys given, a column holding the same image as the row's
            positive (another caption of that image, or the same image again) is removed
            from that row's negatives instead of counting as one.
        gather: gather both sides over all ranks with gradient (identity in one process).
            Every rank then computes the same global loss; the gather's backward sums the
            ranks' gradients, which DDP / Horovod averaging turns into exactly the gradient
            of one process on the concatenated batch.
        temperature: the logits are S / temperature (1.0: LightningDOT's plain dot product;
            VLDeformer uses cosine scores at 0.005).

    Returns:
        A `ContrastiveOutput`; `loss` is a scalar float32 tensor.
    """
    if num_pos is None:
        if txt_emb.shape[0] != img_emb.shape[0]:
            raise ValueError(
                f"num_pos is required when the sides differ in size ({txt_emb.shape[0]} texts, "
                f"{img_emb.shape[0]} images)"
            )
        num_pos = txt_emb.shape[0]
    num_pos = int(num_pos)
    if num_pos > min(txt_emb.shape[0], img_emb.shape[0]):
        raise ValueError(
            f"num_pos={num_pos} exceeds the batch ({txt_emb.shape[0]} texts, {img_emb.shape[0]} images)"
        )
    if (txt_img_keys is None) != (img_keys is None):
        raise ValueError("give both txt_img_keys and img_keys, or neither")
    use_keys = mask_duplicates and txt_img_keys is not None
    if use_keys:
        # Keys must sit with the embeddings: NCCL gathers only device tensors.
        txt_img_keys = txt_img_keys.to(txt_emb.device)
        img_keys = img_keys.to(txt_emb.device)

    if gather:
        txt_emb, n_pos = _gather_pos_neg(txt_emb, num_pos)
        img_emb, _ = _gather_pos_neg(img_emb, num_pos)
        if use_keys:
            txt_img_keys, _ = _gather_pos_neg(txt_img_keys, num_pos)
            img_keys, _ = _gather_pos_neg(img_keys, num_pos)
    else:
        n_pos = num_pos

    # float32 logits: fp16 dot products of 768-d embeddings overflow softmax easily.
    scores = txt_emb.float() @ img_emb.float().t()
    if temperature != 1.0:
        scores = scores / temperature
    t2i = scores[:n_pos]
    i2t = scores[:, :n_pos].t()
    target = torch.arange(n_pos, device=scores.device)
    if use_keys:
        not_diag_t2i = torch.ones_like(t2i, dtype=torch.bool)
        not_diag_t2i[target, target] = False
        not_diag_i2t = torch.ones_like(i2t, dtype=torch.bool)
        not_diag_i2t[target, target] = False
        same_t2i = (txt_img_keys[:n_pos, None] == img_keys[None, :]) & not_diag_t2i
        same_i2t = (img_keys[:n_pos, None] == txt_img_keys[None, :]) & not_diag_i2t
        t2i = t2i.masked_fill(same_t2i, float("-inf"))
        i2t = i2t.masked_fill(same_i2t, float("-inf"))
    loss_t2i = F.cross_entropy(t2i, target)
    loss_i2t = F.cross_entropy(i2t, target)
    with torch.no_grad():
        n_correct_t2i = (t2i.argmax(dim=1) == target).sum()
        n_correct_i2t = (i2t.argmax(dim=1) == target).sum()
    return ContrastiveOutput(
        loss=0.5 * loss_t2i + 0.5 * loss_i2t,
        loss_t2i=loss_t2i,
        loss_i2t=loss_i2t,
        n_correct_t2i=n_correct_t2i,
        n_correct_i2t=n_correct_i2t,
        n_pos=n_pos,
    )


def hierarchical_contrastive_loss(
    txt_levels: Sequence[torch.Tensor],
    img_levels: Sequence[torch.Tensor],
    weights: Sequence[float],
    **contrastive_kwargs: Any,
) -> ContrastiveOutput:
    """Weighted sum of `contrastive_loss` over the levels of a hierarchical embedding.

    Every level is its own in-batch contrastive problem over the same rows, so with
    `gather` each level sees the same global negatives across ranks.

    Args:
        txt_levels: (T, dims[i]) text embeddings per level, the full embedding last.
        img_levels: (I, dims[i]) image embeddings per level, in the same order.
        weights: loss weight of each level.
        **contrastive_kwargs: passed to `contrastive_loss` for every level as given.

    Returns:
        `loss`, `loss_t2i`, `loss_i2t`: the weighted sums over the levels; the accuracy
        counts and `n_pos` are those of the full (last) level.
    """
    if not (len(txt_levels) == len(img_levels) == len(weights)) or not weights:
        raise ValueError(
            f"one text level, image level and weight per level: got {len(txt_levels)}, "
            f"{len(img_levels)}, {len(weights)}"
        )
    outs = [contrastive_loss(t, i, **contrastive_kwargs) for t, i in zip(txt_levels, img_levels)]

    def weighted(name: str) -> torch.Tensor:
        # Starting from the first term (not 0) keeps one level of weight 1 bit-identical.
        total = weights[0] * getattr(outs[0], name)
        for w, out in zip(weights[1:], outs[1:]):
            total = total + w * getattr(out, name)
        return total

    full = outs[-1]
    return ContrastiveOutput(
        loss=weighted("loss"),
        loss_t2i=weighted("loss_t2i"),
        loss_i2t=weighted("loss_i2t"),
        n_correct_t2i=full.n_correct_t2i,
        n_correct_i2t=full.n_correct_i2t,
        n_pos=full.n_pos,
    )


def hinge_ranking_loss(
    scores: torch.Tensor, group_size: int, margin: float = 0.2, sigmoid: bool = True
) -> torch.Tensor:
    """UNITER's triplet loss over groups of `group_size` rows, the positive first.

    loss = mean over (group, negative) of max(0, margin + s_neg - s_pos), with s the
    sigmoid of the raw scores as in UNITER (set `sigmoid=False` for raw scores).
    """
    grouped = _grouped(scores, group_size)
    if sigmoid:
        grouped = torch.sigmoid(grouped)
    return torch.clamp(margin + grouped[:, 1:] - grouped[:, :1], min=0).mean()


def softmax_ranking_loss(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Cross-entropy over each group of `group_size` rows, the positive first."""
    grouped = _grouped(scores, group_size)
    target = torch.zeros(grouped.shape[0], dtype=torch.long, device=grouped.device)
    return F.cross_entropy(grouped, target)


def _grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = scores.float().reshape(-1)
    if group_size < 2 or flat.numel() % group_size:
        raise ValueError(
            f"{flat.numel()} scores cannot form groups of {group_size} (1 positive + >= 1 negative)"
        )
    return flat.view(-1, group_size)
