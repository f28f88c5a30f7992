"""The names of our own checkpoint formats (model/checkpoint.py writes, detects and reads them).

Apart from `model/checkpoint.py` so that every checkpointable model can name its format
(`checkpoint_format`) without importing the loaders.
"""
from __future__ import annotations

BIENCODER_FORMAT = "lightningdot-biencoder"
PRETRAIN_FORMAT = "lightningdot-pretrain"
CROSS_ENCODER_FORMAT = "lightningdot-cross-encoder"
OUR_FORMATS = (BIENCODER_FORMAT, PRETRAIN_FORMAT, CROSS_ENCODER_FORMAT)
FORMAT_VERSION = 1
