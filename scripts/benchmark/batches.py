"""Synthetic in-memory batches with realistic shapes, for the benchmark and fast-path tests.

Items are built like the datasets' `__getitem__` and batched by the project's own collates
(`data/datasets.py`), so the layout is exactly the training one. Only the values are random.

Caption lengths follow a COCO-like distribution: BERT word pieces per caption plus [CLS] and
[SEP] average about 14 with a long thin tail, capped at `max_txt_len + 2` (62 by default,
the paper's `max_txt_len` 60).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data.datasets import (
    IGNORE_INDEX,
    mask_regions,
    mask_tokens,
    retrieval_collate,
    smrm_collate,
    vmlm_collate,
)
from utils.region_features import FEAT_DIM, NUM_LABELS

CLS_ID, SEP_ID, MASK_ID = 101, 102, 103
# First ordinary word-piece id of the BERT vocabularies (SPEC 1 v_range).
FIRST_WORD_ID = 999
# Minimum word pieces of a caption, and the gamma tail above it: 8 + Gamma(2, 2) has mean 12
# (14 with [CLS]/[SEP]) and a 99.9th percentile near 26, like COCO / Flickr30k captions.
_MIN_PIECES, _GAMMA_SHAPE, _GAMMA_SCALE = 8, 2.0, 2.0


def caption_lengths(n: int, rng: np.random.Generator, max_txt_len: int = 60) -> np.ndarray:
    """Word pieces per caption (without [CLS]/[SEP]): mean about 12, at most `max_txt_len`."""
    pieces = _MIN_PIECES + rng.gamma(_GAMMA_SHAPE, _GAMMA_SCALE, size=n)
    return np.clip(np.rint(pieces), 1, max_txt_len).astype(np.int64)


def _caption(length: int, vocab_size: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(min(FIRST_WORD_ID, vocab_size // 2), vocab_size, size=length).tolist()


def _image(num_bb: int, img_dim: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    feat = torch.from_numpy(rng.standard_normal((num_bb, img_dim), dtype=np.float32))
    x1y1 = rng.random((num_bb, 2), dtype=np.float32) * 0.5
    wh = rng.random((num_bb, 2), dtype=np.float32) * 0.5
    box = np.concatenate([x1y1, x1y1 + wh, wh, wh[:, :1] * wh[:, 1:]], axis=1)
    return feat, torch.from_numpy(box)


def retrieval_batch(
    batch_size: int,
    vocab_size: int,
    num_bb: int,
    rng: np.random.Generator,
    img_dim: int = FEAT_DIM,
    max_txt_len: int = 60,
) -> dict[str, Any]:
    """A CMR / fine-tuning batch of `batch_size` (caption, image) pairs, distinct images."""
    items = []
    for i, length in enumerate(caption_lengths(batch_size, rng, max_txt_len)):
        feat, pos = _image(num_bb, img_dim, rng)
        ids = torch.tensor([CLS_ID, *_caption(int(length), vocab_size, rng), SEP_ID])
        items.append(
            {"txt_id": str(i), "input_ids": ids, "img_name": f"img{i}.npz", "img_feat": feat,
             "img_pos": pos, "neg_imgs": [], "neg_txts": []}
        )
    return retrieval_collate(items)


def vmlm_batch(
    batch_size: int,
    vocab_size: int,
    num_bb: int,
    rng: np.random.Generator,
    img_dim: int = FEAT_DIM,
    max_txt_len: int = 60,
    mask_prob: float = 0.15,
) -> dict[str, Any]:
    """A VMLM batch: BERT-masked captions with `txt_labels`, and their images."""
    items = []
    v_range = (min(FIRST_WORD_ID, vocab_size // 2), vocab_size)
    for i, length in enumerate(caption_lengths(batch_size, rng, max_txt_len)):
        ids, labels = mask_tokens(_caption(int(length), vocab_size, rng), rng, mask_prob, MASK_ID, v_range)
        feat, pos = _image(num_bb, img_dim, rng)
        items.append(
            {"txt_id": str(i), "input_ids": torch.tensor([CLS_ID, *ids, SEP_ID]),
             "txt_labels": torch.tensor([IGNORE_INDEX, *labels, IGNORE_INDEX]),
             "img_name": f"img{i}.npz", "img_feat": feat, "img_pos": pos}
        )
    return vmlm_collate(items)


def smrm_batch(
    batch_size: int,
    vocab_size: int,
    num_bb: int,
    rng: np.random.Generator,
    img_dim: int = FEAT_DIM,
    max_txt_len: int = 60,
    mrm_prob: float = 0.15,
) -> dict[str, Any]:
    """An SMRM (MRFR / MRC-kl) batch: masked regions with feature and soft-label targets."""
    items = []
    for i, length in enumerate(caption_lengths(batch_size, rng, max_txt_len)):
        feat, pos = _image(num_bb, img_dim, rng)
        logits = rng.standard_normal((num_bb, NUM_LABELS), dtype=np.float32)
        soft = torch.softmax(torch.from_numpy(logits), dim=1)
        items.append(
            {"txt_id": str(i),
             "input_ids": torch.tensor([CLS_ID, *_caption(int(length), vocab_size, rng), SEP_ID]),
             "img_name": f"img{i}.npz", "img_feat": feat, "img_pos": pos, "soft_labels": soft,
             "img_masked": mask_regions(num_bb, rng, mrm_prob)}
        )
    return smrm_collate(items)


def task_batch(task: str, batch_size: int, vocab_size: int, num_bb: int, rng: np.random.Generator,
               img_dim: int = FEAT_DIM, max_txt_len: int = 60) -> dict[str, Any]:
    """The batch of one pre-training task (`itm` | `mlm` | `mrfr` | `mrckl`)."""
    if task == "itm":
        return retrieval_batch(batch_size, vocab_size, num_bb, rng, img_dim, max_txt_len)
    if task == "mlm":
        return vmlm_batch(batch_size, vocab_size, num_bb, rng, img_dim, max_txt_len)
    if task in ("mrfr", "mrckl"):
        return smrm_batch(batch_size, vocab_size, num_bb, rng, img_dim, max_txt_len)
    raise ValueError(f"unknown task {task!r}")


def batch_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a (nested) batch to `device`; other values stay."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: batch_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(batch_to(v, device, non_blocking) for v in batch)
    return batch
