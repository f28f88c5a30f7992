"""Sizes of the region features every img_db holds (SPEC 2), shared by data/ and model/.

Bottom-up-attention Faster R-CNN: a 2048-d feature per box, a 7-d box position fed to the
model (`[x1, y1, x2, y2, w, h, w*h]`), and a soft label over 1600 Visual Genome classes plus
background.
"""
from __future__ import annotations

FEAT_DIM = 2048
BOX_DIM = 7
NUM_LABELS = 1601
