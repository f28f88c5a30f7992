"""Every model the benchmark builds: the one place that calls the model-construction API.

Weights are random; each builder seeds torch first, so a section's model is the same in
every run with the same `--seed`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scripts.benchmark.context import Context, Sizes


def bert_config(s: Sizes) -> dict[str, Any]:
    """The BERT config of one tower (and of the cross-encoder) at the benchmark's sizes."""
    return {
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "intermediate_size": s.intermediate, "vocab_size": s.vocab, "max_position_embeddings": 512,
        "type_vocab_size": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    }


def build_pretrain_model(ctx: Context) -> torch.nn.Module:
    """The pre-training model (bi-encoder + VMLM / SMRM heads) on the run's device."""
    from model.biencoder import BiEncoderConfig
    from model.families import LIGHTNINGDOT
    from utils.pipeline.pretrain_tasks import pretrain_model

    torch.manual_seed(ctx.seed)
    cfg = bert_config(ctx.sizes)
    biencoder = LIGHTNINGDOT.build(BiEncoderConfig(cfg, dict(cfg), project_dim=ctx.sizes.project_dim, cls_concat="add"))
    return pretrain_model(biencoder).to(ctx.device)


def build_biencoder(ctx: Context) -> torch.nn.Module:
    """The bi-encoder of the pre-training model, in eval mode: the weights the train sections start from."""
    return build_pretrain_model(ctx).bert.eval()


def build_cross_encoder(ctx: Context) -> torch.nn.Module:
    """A UNITER cross-encoder at the benchmark's sizes on the run's device, in eval mode."""
    from model.cross_encoder import CrossEncoderConfig, cross_encoder_from_config

    torch.manual_seed(ctx.seed)
    return cross_encoder_from_config(CrossEncoderConfig(bert_config(ctx.sizes))).to(ctx.device).eval()


def build_demo_biencoder(config_dir: Path, seed: int) -> torch.nn.Module:
    """The demo's tiny bi-encoder (`txt_tiny.json`, `img_tiny.json`, project_dim 128), on CPU."""
    from model.biencoder import build_biencoder as build_from_tower_configs

    torch.manual_seed(seed)
    return build_from_tower_configs(str(config_dir / "txt_tiny.json"), str(config_dir / "img_tiny.json"), project_dim=128)
