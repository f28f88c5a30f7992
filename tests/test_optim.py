"""optim/: weight-decay groups and learning-rate schedules against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optim.optimizer import build_optimizer, split_decay_groups
from optim.schedule import build_scheduler, lr_multiplier
from utils.config import TrainConfig


class _Block(nn.Module):
    """Names like a BERT layer: dense + LayerNorm, plus a custom-named norm and a frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.img_layer_norm = nn.LayerNorm(4)
        self.embed = nn.Embedding(10, 4)
        self.frozen = nn.Linear(4, 4)
        for p in self.frozen.parameters():
            p.requires_grad = False
        # Tied like the MLM decoder: the same Parameter under two names.
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.embed.weight


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_bias_and_layernorm():
    model = _Block()
    decay, no_decay = split_decay_groups(model)
    assert _names(model, decay) == {"dense.weight", "embed.weight"}
    assert _names(model, no_decay) == {
        "dense.bias", "LayerNorm.weight", "LayerNorm.bias", "img_layer_norm.weight", "img_layer_norm.bias",
    }
    opt = build_optimizer(model, TrainConfig(learning_rate=1e-3, weight_decay=0.1, betas=[0.9, 0.98]))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
    # The tied weight is optimised once; the frozen layer not at all.
    assert sum(len(g["params"]) for g in opt.param_groups) == 7


def test_weight_decay_really_skips_layernorm():
    """One step with zero gradients: only decayed tensors shrink (AdamW decoupled decay)."""
    model = _Block()
    opt = build_optimizer(model, TrainConfig(learning_rate=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if name in ("dense.weight", "embed.weight", "decoder.weight"):
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            torch.testing.assert_close(p, before[name])


def test_optimizer_rejects_unknown_optim_and_frozen_models():
    cfg = TrainConfig()
    cfg.optim = "sgd"
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer(_Block(), cfg)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, TrainConfig())


@pytest.mark.parametrize(
    "step, expected",
    [
        (1, 1 / 4),  # warm-up: n / warmup
        (2, 2 / 4),
        (3, 3 / 4),
        (4, 1.0),  # full rate at the last warm-up update
        (7, (10 - 7) / (10 - 4)),  # linear decay to 0 at total
        (10, 0.0),
        (12, 0.0),
    ],
)
def test_linear_warmup_decay_by_hand(step, expected):
    assert lr_multiplier(step, warmup_steps=4, total_steps=10, decay="linear") == pytest.approx(expected)


def test_constant_and_cosine_by_hand():
    assert lr_multiplier(2, 4, 10, "constant") == pytest.approx(0.5)
    assert lr_multiplier(9, 4, 10, "constant") == 1.0
    progress = (7 - 4) / 6
    assert lr_multiplier(7, 4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_multiplier(10, 4, 10, "cosine") == pytest.approx(0.0)
    assert lr_multiplier(1, 0, 10, "linear") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="decay"):
        lr_multiplier(1, 0, 10, "step")


def test_scheduler_applies_the_rate_of_each_update():
    """The n-th optimizer update runs at lr * f(n): read the lr the optimizer actually uses."""
    param = nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(learning_rate=5e-5, warmup_steps=3, decay="linear")
    opt = torch.optim.AdamW([param], lr=cfg.learning_rate)
    sched = build_scheduler(opt, cfg, total_steps=8)
    used = []
    for _ in range(8):
        used.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    expected = [5e-5 * f for f in (1 / 3, 2 / 3, 1.0, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0)]
    assert used == pytest.approx(expected)
    # The scheduler state round-trips (resume).
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched2 = build_scheduler(opt2, cfg, total_steps=8)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 8
