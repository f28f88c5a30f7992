"""Run-config builders for the training-script tests (tiny data, tiny models)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_bert_config(vocab_size: int, dropout: float = 0.0) -> dict[str, Any]:
    """A 2-layer, 2-head, hidden-32 BERT config.

    The larger-than-BERT initialiser range lets such a small model leave the uniform-score
    plateau of the contrastive loss within ~100 steps instead of several hundred.
    """
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "vocab_size": vocab_size,
    }


def itm_config(data: dict[str, Any], models: dict[str, str], **train: Any) -> dict[str, Any]:
    """A fine-tuning run config (our YAML layout) over the tiny data and models."""
    return {
        # Dropout off unless a test turns it on: runs are then functions of weights and data.
        "model": {"txt_model_config": models["txt"], "img_model_config": models["img"], "project_dim": 16,
                  "dropout": 0.0},
        "data": {
            "train_txt_dbs": [data["txt_db"]["train"]],
            "train_img_dbs": [data["img_db"]],
            "val_txt_db": data["txt_db"]["val"],
            "val_img_db": data["img_db"],
            "test_txt_db": data["txt_db"]["test"],
            "test_img_db": data["img_db"],
            "n_workers": 0,
        },
        "train": {
            "train_batch_size": 8,
            "val_batch_size": 64,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "num_train_steps": 6,
            "valid_steps": 3,
            "log_steps": 1,
            "seed": 7,
            "device": "cpu",
            **train,
        },
    }


def pretrain_config(
    data: dict[str, Any], models: dict[str, str], tasks: list[str], ratios: list[float], **train: Any
) -> dict[str, Any]:
    """A pre-training run config over the tiny data (train split to train, val split to validate)."""
    return {
        # Dropout off unless a test turns it on: runs are then functions of weights and data.
        "model": {"txt_model_config": models["txt"], "img_model_config": models["img"], "project_dim": 16,
                  "dropout": 0.0},
        "data": {
            "train_datasets": [
                {"name": "synth", "db": [data["txt_db"]["train"]], "img": [data["img_db"]],
                 "tasks": tasks, "mix_ratio": ratios},
            ],
            "val_datasets": [
                {"name": "synth", "db": [data["txt_db"]["val"]], "img": [data["img_db"]], "tasks": tasks},
            ],
            "n_workers": 0,
        },
        "train": {
            "train_batch_size": 8,
            "val_batch_size": 64,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "num_train_steps": 6,
            "valid_steps": 3,
            "log_steps": 1,
            "seed": 7,
            "device": "cpu",
            **train,
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> str:
    """Write a config as YAML; returns the path as a string."""
    path.write_text(yaml.safe_dump(config))
    return str(path)
