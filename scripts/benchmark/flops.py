"""The FLOP model behind MFU: FLOPs the model needs on REAL tokens.

Padding is excluded, the last layer of a tower is counted for its [CLS] row only (the only
row its output uses), and backward is 2x forward (the train sections multiply by 3).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scripts.benchmark.context import Sizes
from utils.region_features import NUM_LABELS


def encoder_flops(lengths: Sequence[int], hidden: int, intermediate: int, layers: int, cls_only_last: bool) -> float:
    """Forward FLOPs of a BERT encoder over sequences of the given real lengths.

    Per token and layer: Q, K, V, O projections (8 H^2), feed-forward (4 H I), and attention
    scores plus weighted sum (4 L H for a sequence of length L). With `cls_only_last`, the
    last layer computes K, V for every token but the rest for the [CLS] row alone.
    """
    lengths_arr = np.asarray(lengths, dtype=np.float64)
    dense = 8 * hidden**2 + 4 * hidden * intermediate
    full_layer = float(np.sum(lengths_arr * dense + 4 * lengths_arr**2 * hidden))
    if not cls_only_last or layers == 0:
        return layers * full_layer
    last = float(np.sum(lengths_arr * 4 * hidden**2 + 4 * hidden**2 + 4 * hidden * intermediate + 4 * lengths_arr * hidden))
    return (layers - 1) * full_layer + last


def projection_flops(rows: int, hidden: int, project_dim: int) -> float:
    """Forward FLOPs of the towers' projection head (`encode_proj`) over `rows` [CLS] rows."""
    return 0.0 if project_dim <= 0 else 2.0 * rows * (hidden * 2 * hidden + 2 * hidden * project_dim)


def text_tower_flops(lengths: Sequence[int], s: Sizes, cls_only_last: bool = True, project: bool = True) -> float:
    """Forward FLOPs of the text tower over captions of the given token counts."""
    return encoder_flops(lengths, s.hidden, s.intermediate, s.layers, cls_only_last) + (
        projection_flops(len(lengths), s.hidden, s.project_dim) if project else 0.0
    )


def image_tower_flops(boxes: Sequence[int], s: Sizes, cls_only_last: bool = True, project: bool = True) -> float:
    """Forward FLOPs of the image tower over images of the given box counts (plus its [CLS] slot)."""
    boxes_arr = np.asarray(boxes, dtype=np.float64)
    embed = float(np.sum(boxes_arr)) * 2 * (s.img_dim * s.hidden + 7 * s.hidden)
    return embed + encoder_flops(boxes_arr + 1, s.hidden, s.intermediate, s.layers, cls_only_last) + (
        projection_flops(len(boxes), s.hidden, s.project_dim) if project else 0.0
    )


def task_forward_flops(task: str, batch: dict[str, Any], s: Sizes, padded: bool = False) -> float:
    """Forward FLOPs one pre-training task needs on this batch (padded: what is executed)."""
    txt_mask = batch["txt"]["attention_mask"]
    img_mask = batch["img"]["img_mask"]
    if padded:
        txt_lens = [txt_mask.shape[1]] * txt_mask.shape[0]
        boxes = [img_mask.shape[1]] * img_mask.shape[0]
    else:
        txt_lens = txt_mask.sum(1).tolist()
        boxes = img_mask.sum(1).tolist()
    cls_only = not padded
    if task == "itm":
        b = len(txt_lens)
        return (text_tower_flops(txt_lens, s, cls_only) + image_tower_flops(boxes, s, cls_only)
                + 2.0 * b * b * s.project_dim)
    if task == "mlm":
        masked = int((batch["txt_labels"] != -100).sum())
        head = 2.0 * masked * (s.hidden**2 + s.hidden * s.vocab)
        return (text_tower_flops(txt_lens, s, False, project=False)
                + image_tower_flops(boxes, s, cls_only, project=False) + head)
    masked = int(batch["img"]["img_masked"].sum())
    out_dim = s.img_dim if task == "mrfr" else NUM_LABELS
    head = 2.0 * masked * (s.hidden**2 + s.hidden * out_dim)
    return (text_tower_flops(txt_lens, s, cls_only, project=False)
            + image_tower_flops(boxes, s, False, project=False) + head)
