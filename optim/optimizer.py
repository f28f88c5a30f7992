"""Adam-family optimisers with the BERT convention: no weight decay on biases and LayerNorm weights."""
from __future__ import annotations

import logging

import torch
from torch import nn

from utils.config import TrainConfig

logger = logging.getLogger(__name__)

# Parameters whose name contains one of these are norm weights even when the module is not a
# torch.nn.LayerNorm subclass (custom norms in imported code keep the HF / UNITER names).
_NORM_NAME_PARTS = ("LayerNorm", "layer_norm")


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.RMSNorm)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def split_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed).

    Biases and normalisation weights are not decayed, as in BERT / UNITER / LightningDOT, nor
    scalar parameters (a learned temperature: decay would pull it towards 1, as CLIP avoids).
    Frozen parameters (`requires_grad=False`, e.g. `fix_img_encoder`) are left out; a
    parameter shared by two modules (tied decoder weights) appears once.

    Args:
        model: the module to optimise.

    Returns:
        The parameters to decay and the ones to keep undecayed, in `named_parameters` order.
    """
    norm_ids = _norm_parameter_ids(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = id(param) in norm_ids or any(part in name for part in _NORM_NAME_PARTS)
        if leaf == "bias" or leaf in ("gamma", "beta") or is_norm or param.ndim == 0:
            no_decay.append(param)
        else:
            decay.append(param)
    return decay, no_decay


# `adam` / `adamax` apply weight decay as an L2 term, as UNITER's choices of those names did.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """An Adam-family optimiser over the model's trainable parameters, two weight-decay groups.

    Args:
        model: the (unwrapped) module to optimise.
        cfg: the run's train section (`optim`, `learning_rate`, `betas`, `adam_eps`,
            `weight_decay`).

    Returns:
        The `optim` class of torch; AdamW / Adam fused when every parameter is on a CUDA device.
    """
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"train.optim must be one of {sorted(OPTIMIZERS)}, got {cfg.optim!r}")
    if len(cfg.betas) != 2:
        raise ValueError(f"train.betas must hold two numbers, got {cfg.betas!r}")
    decay, no_decay = split_decay_groups(model)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (are both towers frozen?)")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    optimizer_class = OPTIMIZERS[cfg.optim]
    fused = optimizer_class is not torch.optim.Adamax and all(p.device.type == "cuda" for p in params)
    logger.info(
        "%s: %d tensors with weight decay %g, %d without (bias / LayerNorm)%s",
        optimizer_class.__name__, len(decay), cfg.weight_decay, len(no_decay), ", fused" if fused else "",
    )
    options = {"fused": True} if fused else {}
    return optimizer_class(groups, lr=cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.adam_eps, **options)
