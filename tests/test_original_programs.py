"""Original flat configs mean what the original programs made of them (docs/reproduce.md, section 7).

The expected values below are written by hand from the original sources (LightningDOT
`dvl/options.py`, `train_itm.py`, `pretrain.py`, UNITER `train_itm.py` and `optim/`), not
read from `utils/original_programs.py`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import inference
import pretrain
import train_itm
from data.synthetic import SyntheticConfig, generate, vocabulary
from optim.optimizer import build_optimizer
from optim.schedule import build_scheduler, resolve_run_length
from tests.helpers import tiny_bert_config
from utils.config import TrainConfig, load_config
from utils.engine.metrics_log import read_metrics
from utils.errors import ConfigError
from utils.original_programs import UNITER_TRAIN_ITM

ITM_FLAT = {"txt_model_config": "txt", "img_model_config": "img", "train_txt_dbs": ["a.db"],
            "train_img_dbs": ["img"], "output_dir": "out"}


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_train_itm_fills_what_the_file_leaves_out(tmp_path, caplog):
    path = _write_json(tmp_path / "ft.json", {**ITM_FLAT, "num_train_epochs": 3, "warmup_steps": 100})
    cfg = load_config(path, program=train_itm.LIGHTNINGDOT_TRAIN_ITM)
    t = cfg.train
    assert (t.train_batch_size, t.val_batch_size, t.learning_rate, t.grad_norm) == (80, 80, 1e-5, 2.0)
    assert (t.optim, t.betas, t.adam_eps, t.weight_decay) == ("adamw", [0.9, 0.999], 1e-8, 0.0)
    assert (t.warmup_ratio, t.warmup_from_zero, t.decay, t.valid_steps, t.num_train_steps) == (
        0.1, True, "linear", 0, 0)
    assert t.precision == "fp32" and t.batch_size_unit == "examples"
    assert (cfg.data.max_txt_len, cfg.data.pin_mem, cfg.data.n_workers) == (64, False, 2)
    assert cfg.model.project_dim == 0
    # The file's warm-up had no effect in the original: said once, naming the key.
    assert "warmup_steps has no effect" in caplog.text
    # A command-line override beats the original's rule.
    cfg = load_config(path, ["train.warmup_ratio=0", "betas=[0.9,0.98]"], program=train_itm.LIGHTNINGDOT_TRAIN_ITM)
    assert (cfg.train.warmup_ratio, cfg.train.warmup_steps, cfg.train.betas) == (0.0, 100, [0.9, 0.98])


def test_our_yaml_keeps_our_defaults(tmp_path):
    path = tmp_path / "ours.yaml"
    path.write_text(yaml.safe_dump({"train": {"num_train_epochs": 3}}))
    for program in (train_itm.LIGHTNINGDOT_TRAIN_ITM, pretrain.LIGHTNINGDOT_PRETRAIN, UNITER_TRAIN_ITM,
                    inference.LIGHTNINGDOT_EVAL_ITM):
        t = load_config(path, program=program).train
        assert (t.warmup_steps, t.warmup_ratio, t.betas, t.weight_decay, t.adam_eps) == (100, 0.0, [0.9, 0.98], 0.01, 1e-8)
        assert (t.warmup_from_zero, t.valid_steps, t.optim) == (False, 500, "adamw")


def test_pretrain_fills_what_the_file_leaves_out(tmp_path):
    flat = {"txt_model_config": "txt", "img_model_config": "img", "output_dir": "out",
            "train_datasets": [{"name": "coco", "db": ["a.db"], "img": ["img"], "tasks": ["itm", "mlm"],
                                "mix_ratio": [1, 1]}]}
    cfg = load_config(_write_json(tmp_path / "pt.json", flat), program=pretrain.LIGHTNINGDOT_PRETRAIN)
    t = cfg.train
    assert (t.batch_size_unit, t.train_batch_size, t.val_batch_size, t.gradient_accumulation_steps) == (
        "tokens", 4096, 4096, 16)
    assert (t.learning_rate, t.num_train_steps, t.warmup_steps, t.valid_steps) == (3e-5, 100000, 10000, 1000)
    assert (t.optim, t.betas, t.adam_eps, t.weight_decay, t.grad_norm) == ("adamw", [0.9, 0.98], 1e-6, 0.01, 2.0)
    assert (t.warmup_ratio, t.warmup_from_zero) == (0.0, False)
    assert (cfg.model.project_dim, cfg.model.cls_concat, cfg.model.dropout) == (0, "none", 0.1)
    assert (cfg.data.max_txt_len, cfg.data.mrm_prob, cfg.data.pin_mem, cfg.data.n_workers) == (60, 0.15, False, 4)
    # UNITER's `adam` is torch's Adam, whose eps is torch's default.
    adam = load_config(_write_json(tmp_path / "pt2.json", {**flat, "optim": "adam"}),
                       program=pretrain.LIGHTNINGDOT_PRETRAIN)
    assert (adam.train.optim, adam.train.adam_eps) == ("adam", 1e-8)


def test_rerank_train_fills_what_the_file_leaves_out(tmp_path):
    flat = {"model_config": "uniter.json", "checkpoint": "uniter.pt", "train_txt_dbs": ["a.db"],
            "train_img_dbs": ["img"], "output_dir": "out"}
    cfg = load_config(_write_json(tmp_path / "itm.json", flat), program=UNITER_TRAIN_ITM)
    t = cfg.train
    assert (t.train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (128, 16, 3e-5)
    assert (t.optim, t.betas, t.adam_eps, t.weight_decay, t.grad_norm) == ("adam", [0.9, 0.98], 1e-8, 0.01, 0.25)
    assert (t.num_train_steps, t.warmup_steps, t.valid_steps, t.batch_size_unit) == (100000, 4000, 1000, "examples")
    assert (cfg.cross_encoder.rank_loss, cfg.cross_encoder.negative_size, cfg.cross_encoder.margin) == ("hinge", 1, 0.2)
    assert (cfg.model.dropout, cfg.data.max_txt_len) == (0.1, 60)


def test_eval_fills_what_the_file_leaves_out(tmp_path):
    flat = {"txt_model_config": "txt", "img_model_config": "img", "test_txt_db": "t.db", "test_img_db": "img",
            "inf_minibatch_size": 32, "output_dir": "out"}
    cfg = load_config(_write_json(tmp_path / "eval.json", flat), program=inference.LIGHTNINGDOT_EVAL_ITM)
    assert (cfg.model.project_dim, cfg.data.max_txt_len, cfg.train.val_batch_size) == (0, 64, 80)
    assert cfg.retrieval.inf_minibatch_size == 400


def test_run_length_resolution():
    t = resolve_run_length(TrainConfig(num_train_epochs=44, warmup_ratio=0.1, valid_steps=0), updates_per_epoch=5)
    assert (t.num_train_steps, t.warmup_steps, t.valid_steps) == (220, 22, 5)
    t = resolve_run_length(TrainConfig(num_train_steps=30, warmup_steps=7, valid_steps=10), updates_per_epoch=None)
    assert (t.num_train_steps, t.warmup_steps, t.valid_steps) == (30, 7, 10)
    with pytest.raises(ConfigError, match="num_train_steps or num_train_epochs"):
        resolve_run_length(TrainConfig(), updates_per_epoch=5)
    with pytest.raises(ConfigError, match="valid_steps"):
        resolve_run_length(TrainConfig(num_train_steps=5, valid_steps=0), updates_per_epoch=None)


def _lrs(cfg: TrainConfig, total: int, updates: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.learning_rate)
    scheduler = build_scheduler(optimizer, cfg, total)
    seen = []
    for _ in range(updates):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_original_train_itm_schedule_starts_at_zero():
    # The original: LambdaLR(lambda s: s / W if s < W else max(0, (T - s) / (T - W))), stepped
    # after each update, so update n (from 1) runs at lambda(n - 1).
    total, warmup = 10, 4
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=warmup, warmup_from_zero=True)
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert _lrs(cfg, total, total) == pytest.approx(expected)
    # UNITER's convention: update n runs at n.
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=warmup)
    assert _lrs(cfg, total, total) == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


@pytest.mark.parametrize(("optim", "cls", "decoupled"), [("adamw", torch.optim.AdamW, True),
                                                         ("adam", torch.optim.Adam, False),
                                                         ("adamax", torch.optim.Adamax, False)])
def test_optimizer_choices(optim, cls, decoupled):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, TrainConfig(optim=optim, betas=[0.8, 0.9], adam_eps=1e-6, weight_decay=0.1))
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.9), 1e-6, 0.1)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert group.get("decoupled_weight_decay", cls is torch.optim.AdamW) is decoupled


# ---------------------------------------------------------------- learning from an original config


@pytest.fixture(scope="module")
def sixteen_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """16 training images x 5 captions: at batch 16, 5 updates an epoch."""
    root = tmp_path_factory.mktemp("synthetic16") / "data"
    return generate(str(root), SyntheticConfig(num_train=16, num_val=8, num_test=8), progress=False)


def _original_finetuning(data: dict[str, Any], folder: Path, seed: int) -> tuple[dict, list[float]]:
    """Fine-tune from an ORIGINAL flat config: tiny towers, dropout 0.1, init 0.02, 44 epochs."""
    tower = tiny_bert_config(len(vocabulary()), hidden_size=64, intermediate_size=128, dropout=0.1,
                             initializer_range=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    tower_path = _write_json(folder / "tower.json", tower)
    flat = {"txt_model_config": str(tower_path), "img_model_config": str(tower_path), "project_dim": 16,
            "dropout": 0.1, "train_txt_dbs": [data["txt_db"]["train"]], "train_img_dbs": [data["img_db"]],
            "val_txt_db": data["txt_db"]["val"], "val_img_db": data["img_db"], "train_batch_size": 16,
            "learning_rate": 1e-3, "num_train_epochs": 44, "warmup_steps": 100, "seed": seed, "n_workers": 0,
            "output_dir": str(folder / "run")}
    config = _write_json(folder / "ft.json", flat)
    train_itm.main(["--config", str(config), "device=cpu", "log_steps=5"])
    losses = [r["loss"] for r in read_metrics(folder / "run", "train")]
    return yaml.safe_load((folder / "run" / "config.yaml").read_text()), losses


def _learned(losses: list[float]) -> bool:
    """Left the ln(16) = 2.77 plateau of in-batch contrastive loss by the end."""
    return sum(losses[-4:]) / 4 < 2.0


def test_original_config_finetuning_learns_with_original_warmup(sixteen_images, tmp_path):
    saved, losses = _original_finetuning(sixteen_images, tmp_path, seed=4)
    t = saved["train"]
    # The run directory shows what ran: 16 captions x 5 / 16 = 5 updates an epoch, 44 epochs.
    assert (t["num_train_steps"], t["warmup_steps"], t["valid_steps"]) == (220, 22, 5)
    assert (t["betas"], t["weight_decay"], t["warmup_from_zero"]) == ([0.9, 0.999], 0.0, True)
    assert _learned(losses), losses[-4:]


@pytest.mark.slow
def test_original_config_finetuning_learns_in_most_seeds(sixteen_images, tmp_path):
    learned = []
    for seed in range(1, 7):
        _, losses = _original_finetuning(sixteen_images, tmp_path / f"seed{seed}", seed)
        learned.append(_learned(losses))
    assert sum(learned) >= 3, learned


def test_original_keys_without_effect_warn_and_unsupported_values_fail(tmp_path, caplog):
    flat = {**ITM_FLAT, "txt_model_type": "bert-base", "itm_global_file": "meta.json",
            "retrieval_mode": "both", "caption_score_weight": 0.0}
    load_config(_write_json(tmp_path / "ok.json", flat))
    assert "txt_model_type" in caplog.text and "itm_global_file" in caplog.text
    with pytest.raises(ConfigError, match=r"retrieval_mode='img_only' is not supported .* only 'both'"):
        load_config(_write_json(tmp_path / "img_only.json", {**flat, "retrieval_mode": "img_only"}))
    with pytest.raises(ConfigError, match="caption_score_weight"):
        load_config(_write_json(tmp_path / "csw.json", {**flat, "caption_score_weight": 0.5}))
    # The same keys inside our nested sections.
    path = tmp_path / "ours.yaml"
    path.write_text(yaml.safe_dump({"model": {"txt_model_type": "bert-base"}, "retrieval": {"retrieval_mode": "both"}}))
    caplog.clear()
    load_config(path)
    assert "'txt_model_type' has no effect" in caplog.text
