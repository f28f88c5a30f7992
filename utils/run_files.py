"""Names of the files and folders runs write: one place for writers and readers alike.

Plain strings, no imports, so reports and the demo driver can name outputs without loading
the model stack.
"""
from __future__ import annotations

# ---- a training run's output directory (every trainer)
CONFIG_FILE = "config.yaml"
CKPT_DIR = "ckpt"
STATE_DIR = "train_state"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# ---- train_itm.py
TEST_RESULTS_FILE = "test_results.json"
BIENCODER_BEST = "biencoder.best.pt"
BIENCODER_LAST = "biencoder.last.pt"

# ---- pretrain.py
PRETRAIN_FINAL = "model_final.pt"

# ---- rerank.py train
CROSS_ENCODER_BEST = "cross_encoder.best.pt"
CROSS_ENCODER_LAST = "cross_encoder.last.pt"
VAL_RESULTS_FILE = "val_results.json"

# ---- a retrieval directory (inference.py); info.json is written last and marks it complete
INFO_FILE = "info.json"
IDS_FILE = "ids.json"
TOPK_FILE = "topk.json"
RECALL_FILE = "recall.json"
IMG_EMB_FILE = "img_emb.npy"
TXT_EMB_FILE = "txt_emb.npy"
IMG_INDEX_FILE = "img.index"
TXT_INDEX_FILE = "txt.index"
SHARD_DIR = "shards"


def level_file(name: str, dim: int) -> str:
    """A hierarchy level's file beside a full-embedding one: `img_emb.npy`, 64 -> `img_emb.d64.npy`."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.d{dim}.{ext}" if dot else f"{name}.d{dim}"


# ---- rerank.py
RERANK_FILE = "rerank.json"
SCORES_FILE = "rerank_scores.json"

# ---- make demo
SUMMARY_FILE = "summary.json"

# ---- scripts/plots.py (PNGs under a run directory)
PLOTS_DIR = "plots"
TRAINING_PLOT_SUFFIX = "_training.png"
RECALL_PLOT = "recall_at_k.png"
